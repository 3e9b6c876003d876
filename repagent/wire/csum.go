package wire

import (
	"crypto/sha256"
)

// Checksums of regions: online verify and checksum resync (protocol
// level 2, see PROTOCOL.md). The hub asks for the checksums of a run of
// regions with CSUM_REQ; the agent reads the run under the same range
// lock as the guest's writes, notes its next mirror sequence number (the
// point), hashes each region and answers with CSUM_RES after every frame
// it queued before that point.

// Checksum algorithms.
const (
	// AlgSHA256 is SHA-256 of each region's bytes. A guest controls the
	// data, so the checksum must resist collisions: a guest that could
	// make a changed region hash like the replica's old content would
	// keep a checksum resync from copying it. SHA-256 is in Go's standard
	// library and uses the CPU's SHA extensions where they exist.
	AlgSHA256 uint8 = 1
)

// CsumSize is the size of one region's checksum on the wire.
const CsumSize = sha256.Size

// MaxCsumRegions bounds the regions of one CSUM_REQ: MaxIOSectors at the
// smallest region size.
const MaxCsumRegions = MaxIOSectors / 8

// CsumReq asks the agent for the checksums of the regions of
// [Sector, Sector+Sectors) of a volume, RegionSectors at a time (the last
// region may be short: it ends with the range).
type CsumReq struct {
	ID            uint64 // request id, > 0
	Volume        uint64
	Sector        uint64 // a multiple of RegionSectors
	Sectors       uint32 // 1 to MaxIOSectors
	RegionSectors uint32 // a power of two from 8 to 1<<21
	Alg           uint8  // AlgSHA256
}

// Regions returns the number of checksums the request asks for.
func (m *CsumReq) Regions() int {
	return int((uint64(m.Sectors) + uint64(m.RegionSectors) - 1) / uint64(m.RegionSectors))
}

// CsumRes answers a CsumReq.
type CsumRes struct {
	ID     uint64
	Volume uint64
	Status int32 // StatusOK, StatusIOError or StatusDenied; no checksums unless OK
	Alg    uint8
	// Point is the agent's next mirror sequence number when it read the
	// regions: they hold every mirrored write with a lower number and
	// none with this number or above. Every frame with a lower number is
	// sent before this answer.
	Point uint64
	// Sums holds one checksum per region, CsumSize bytes each.
	Sums [][CsumSize]byte
	// Dirty marks regions (by index) that changed without being mirrored
	// yet (in the agent's dirty bitmap): their checksum says nothing
	// about what the hub should hold.
	Dirty []bool
}

// Cmd implements Message.
func (*CsumReq) Cmd() Cmd { return CmdCsumReq }

// Cmd implements Message.
func (*CsumRes) Cmd() Cmd { return CmdCsumRes }

func (m *CsumReq) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint64(b, m.Volume)
	b = le.AppendUint64(b, m.Sector)
	b = le.AppendUint32(b, m.Sectors)
	b = le.AppendUint32(b, m.RegionSectors)
	b = append(b, m.Alg, 0, 0, 0)
	return b, 0, m.ID, nil
}

func (m *CsumRes) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint64(b, m.Volume)
	b = le.AppendUint32(b, uint32(m.Status))
	b = append(b, m.Alg, 0, 0, 0)
	b = le.AppendUint64(b, m.Point)
	b = le.AppendUint32(b, uint32(len(m.Sums)))
	for i := range m.Sums {
		b = append(b, m.Sums[i][:]...)
	}
	bits := make([]byte, (len(m.Sums)+7)/8)
	for i, d := range m.Dirty {
		if d && i < len(m.Sums) {
			bits[i/8] |= 1 << (i % 8)
		}
	}
	return append(b, bits...), 0, m.ID, nil
}

func decodeCsumReq(f Frame, d *dec) (Message, error) {
	m := &CsumReq{ID: f.Seq, Volume: d.u64("volume"), Sector: d.u64("sector"), Sectors: d.u32("sectors"), RegionSectors: d.u32("region size")}
	alg := d.bytes(4, "algorithm")
	if d.err != nil {
		return nil, d.err
	}
	m.Alg = alg[0]
	if alg[1]|alg[2]|alg[3] != 0 {
		return nil, Malformed("%s: padding % x not zero", f.Cmd, alg[1:])
	}
	if m.Alg != AlgSHA256 {
		return nil, Malformed("%s: unknown checksum algorithm %d", f.Cmd, m.Alg)
	}
	if err := checkRange(f.Cmd, m.Volume, m.Sector, uint64(m.Sectors)); err != nil {
		return nil, err
	}
	if m.Sectors > MaxIOSectors {
		return nil, Malformed("%s: %d sectors, more than %d", f.Cmd, m.Sectors, MaxIOSectors)
	}
	if rs := m.RegionSectors; rs < 8 || rs > 1<<21 || rs&(rs-1) != 0 {
		return nil, Malformed("%s: region size %d sectors: must be a power of two from 8 to %d", f.Cmd, rs, 1<<21)
	}
	if m.Sector%uint64(m.RegionSectors) != 0 {
		return nil, Malformed("%s: sector %d is not at a region boundary (%d sectors)", f.Cmd, m.Sector, m.RegionSectors)
	}
	return m, d.end()
}

func decodeCsumRes(f Frame, d *dec) (Message, error) {
	m := &CsumRes{ID: f.Seq, Volume: d.u64("volume"), Status: int32(d.u32("status"))}
	alg := d.bytes(4, "algorithm")
	m.Point = d.u64("point")
	n := d.u32("count")
	if d.err != nil {
		return nil, d.err
	}
	m.Alg = alg[0]
	if alg[1]|alg[2]|alg[3] != 0 {
		return nil, Malformed("%s: padding % x not zero", f.Cmd, alg[1:])
	}
	if m.Volume == 0 {
		return nil, Malformed("%s: volume id 0", f.Cmd)
	}
	if m.Alg != AlgSHA256 {
		return nil, Malformed("%s: unknown checksum algorithm %d", f.Cmd, m.Alg)
	}
	if n > MaxCsumRegions {
		return nil, Malformed("%s: %d checksums, more than %d", f.Cmd, n, MaxCsumRegions)
	}
	if m.Status != StatusOK && n != 0 {
		return nil, Malformed("%s: %d checksums with status %d", f.Cmd, n, m.Status)
	}
	if m.Status == StatusOK && (n == 0 || m.Point == 0) {
		return nil, Malformed("%s: no checksums or point 0 with status ok", f.Cmd)
	}
	if want := uint64(n)*CsumSize + (uint64(n)+7)/8; uint64(len(d.p)) != want {
		return nil, Malformed("%s: %d checksums in %d bytes, want %d", f.Cmd, n, len(d.p), want)
	}
	m.Sums = make([][CsumSize]byte, n)
	for i := range m.Sums {
		copy(m.Sums[i][:], d.bytes(CsumSize, "checksum"))
	}
	bits := d.bytes(int(n+7)/8, "dirty bits")
	if n%8 != 0 && bits[len(bits)-1]>>(n%8) != 0 {
		return nil, Malformed("%s: dirty bits set past the %d checksums", f.Cmd, n)
	}
	m.Dirty = make([]bool, n)
	for i := range m.Dirty {
		m.Dirty[i] = bits[i/8]&(1<<(i%8)) != 0
	}
	return m, d.end()
}

// Checksum returns the SHA-256 checksum of b.
func Checksum(b []byte) [CsumSize]byte { return sha256.Sum256(b) }
