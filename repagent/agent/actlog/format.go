package actlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
)

// On-disk constants; see the package documentation.
const (
	headerMagic    = "VDMACTLG"
	formatVersion  = 1
	blockSize      = 4096
	slotMagic      = 0x58544c41
	slotHeaderSize = 40
	updateSize     = 12
	entrySize      = 8
	updatesPerTxn  = 64
	contextPerTxn  = (blockSize - slotHeaderSize - updatesPerTxn*updateSize) / entrySize

	kindUpdate = 1
	kindClean  = 2

	// emptyEntry marks an element that holds no extent.
	emptyEntry = ^uint64(0)
	// extentBits is the width of the extent number in an entry.
	extentBits = 48
	extentMask = 1<<extentBits - 1

	// MaxExtents is the largest al-extents value.
	MaxExtents = 65534
	// MaxVolumes is the largest number of volumes in one log.
	MaxVolumes = 255
	// DefaultExtents is al-extents when [Config.Extents] is 0 (DRBD's default).
	DefaultExtents = 1237
	// DefaultExtentSize is the extent size when [Config.ExtentSize] is 0.
	DefaultExtentSize = 4 << 20

	minExtentSize = 4096
	maxExtentSize = 1 << 30
	minSlots      = 8

	flagFullResync = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrUntrusted is wrapped by [VolumeRecovery.Reason]'s error when the log's
// content cannot be trusted and the volume needs a full resync.
var ErrUntrusted = errors.New("activity log cannot be trusted")

func entry(vol int, ext uint64) uint64 { return uint64(vol)<<extentBits | ext }

func entryVol(e uint64) int { return int(e >> extentBits) }

func entryExt(e uint64) uint64 { return e & extentMask }

// geometry is the shape of a log file.
type geometry struct {
	extentSize uint64
	shift      uint
	extents    int
	slots      int
}

func newGeometry(extentSize uint64, extents int) (geometry, error) {
	if extentSize < minExtentSize || extentSize > maxExtentSize || extentSize&(extentSize-1) != 0 {
		return geometry{}, fmt.Errorf("extent size %d: must be a power of two between %d and %d", extentSize, minExtentSize, maxExtentSize)
	}
	if extents < 1 || extents > MaxExtents {
		return geometry{}, fmt.Errorf("al-extents %d: must be between 1 and %d", extents, MaxExtents)
	}
	return geometry{
		extentSize: extentSize,
		shift:      uint(bits.TrailingZeros64(extentSize)),
		extents:    extents,
		slots:      slotsFor(extents),
	}, nil
}

// window is the number of consecutive transactions whose contexts name
// every element.
func window(extents int) int { return (extents + contextPerTxn - 1) / contextPerTxn }

func slotsFor(extents int) int { return max(minSlots, 2*window(extents)+2) }

func (g geometry) fileSize() int64 { return int64(blockSize) * int64(1+g.slots) }

func slotOffset(seq uint64, slots int) int64 {
	return int64(blockSize) * (1 + int64(seq%uint64(slots)))
}

// volumeHeader is one volume as the header records it.
type volumeHeader struct {
	name  string
	size  uint64
	flags uint8
}

// header is the decoded header block.
type header struct {
	epoch uint64
	geo   geometry
	vols  []volumeHeader
}

func crcBlock(b []byte, at int) uint32 {
	var zero [4]byte
	c := crc32.Update(0, castagnoli, b[:at])
	c = crc32.Update(c, castagnoli, zero[:])
	return crc32.Update(c, castagnoli, b[at+4:])
}

func encodeHeader(h header) ([]byte, error) {
	b := make([]byte, blockSize)
	copy(b, headerMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], formatVersion)
	le.PutUint64(b[16:], h.epoch)
	le.PutUint64(b[24:], h.geo.extentSize)
	le.PutUint32(b[32:], uint32(h.geo.extents))
	le.PutUint32(b[36:], uint32(h.geo.slots))
	le.PutUint32(b[40:], blockSize)
	le.PutUint32(b[44:], contextPerTxn)
	le.PutUint32(b[48:], updatesPerTxn)
	if len(h.vols) > MaxVolumes {
		return nil, fmt.Errorf("%d volumes: at most %d", len(h.vols), MaxVolumes)
	}
	le.PutUint32(b[52:], uint32(len(h.vols)))
	p := 56
	for _, v := range h.vols {
		if len(v.name) == 0 || len(v.name) > 255 {
			return nil, fmt.Errorf("volume name %q: length must be 1..255", v.name)
		}
		if p+10+len(v.name) > blockSize {
			return nil, fmt.Errorf("%d volume names do not fit in the %d-byte header", len(h.vols), blockSize)
		}
		le.PutUint64(b[p:], v.size)
		b[p+8] = v.flags
		b[p+9] = byte(len(v.name))
		copy(b[p+10:], v.name)
		p += 10 + len(v.name)
	}
	le.PutUint32(b[12:], crcBlock(b, 12))
	return b, nil
}

func decodeHeader(b []byte) (header, error) {
	if len(b) < blockSize {
		return header{}, fmt.Errorf("header: short (%d bytes)", len(b))
	}
	b = b[:blockSize]
	if string(b[:8]) != headerMagic {
		return header{}, fmt.Errorf("header: wrong magic %q", b[:8])
	}
	le := binary.LittleEndian
	if v := le.Uint32(b[8:]); v != formatVersion {
		return header{}, fmt.Errorf("header: unsupported version %d", v)
	}
	if got, want := le.Uint32(b[12:]), crcBlock(b, 12); got != want {
		return header{}, fmt.Errorf("header: CRC %#08x, computed %#08x", got, want)
	}
	geo, err := newGeometry(le.Uint64(b[24:]), int(le.Uint32(b[32:])))
	if err != nil {
		return header{}, fmt.Errorf("header: geometry: %w", err)
	}
	if s := int(le.Uint32(b[36:])); s != geo.slots {
		return header{}, fmt.Errorf("header: geometry: %d slots, want %d for %d extents", s, geo.slots, geo.extents)
	}
	if s := le.Uint32(b[40:]); s != blockSize {
		return header{}, fmt.Errorf("header: geometry: slot size %d, want %d", s, blockSize)
	}
	if c, u := le.Uint32(b[44:]), le.Uint32(b[48:]); c != contextPerTxn || u != updatesPerTxn {
		return header{}, fmt.Errorf("header: geometry: %d context and %d update entries per transaction, want %d and %d", c, u, contextPerTxn, updatesPerTxn)
	}
	n := int(le.Uint32(b[52:]))
	if n > MaxVolumes {
		return header{}, fmt.Errorf("header: %d volumes, at most %d", n, MaxVolumes)
	}
	h := header{epoch: le.Uint64(b[16:]), geo: geo, vols: make([]volumeHeader, 0, n)}
	p := 56
	for i := 0; i < n; i++ {
		if p+10 > blockSize {
			return header{}, fmt.Errorf("header: volume %d runs past the header", i)
		}
		l := int(b[p+9])
		if l == 0 || p+10+l > blockSize {
			return header{}, fmt.Errorf("header: volume %d: bad name length %d", i, l)
		}
		h.vols = append(h.vols, volumeHeader{size: le.Uint64(b[p:]), flags: b[p+8], name: string(b[p+10 : p+10+l])})
		p += 10 + l
	}
	return h, nil
}

// update is one element's new content.
type update struct {
	elem  uint32
	entry uint64
}

// txn is a decoded transaction slot.
type txn struct {
	seq      uint64
	kind     uint16
	updates  []update
	ctxStart uint32
	context  []uint64
}

// encodeSlot writes t into b (blockSize bytes, reused: no allocation).
func encodeSlot(b []byte, epoch uint64, t *txn) {
	clear(b[:blockSize])
	le := binary.LittleEndian
	le.PutUint32(b[0:], slotMagic)
	le.PutUint64(b[8:], epoch)
	le.PutUint64(b[16:], t.seq)
	le.PutUint16(b[24:], t.kind)
	le.PutUint16(b[26:], uint16(len(t.updates)))
	le.PutUint32(b[28:], t.ctxStart)
	le.PutUint32(b[32:], uint32(len(t.context)))
	p := slotHeaderSize
	for _, u := range t.updates {
		le.PutUint32(b[p:], u.elem)
		le.PutUint64(b[p+4:], u.entry)
		p += updateSize
	}
	p = slotHeaderSize + updatesPerTxn*updateSize
	for _, e := range t.context {
		le.PutUint64(b[p:], e)
		p += entrySize
	}
	le.PutUint32(b[4:], crcBlock(b[:blockSize], 4))
}

// decodeSlot decodes and checks the slot at ring position pos. It returns
// nil and the reason when the slot is not a valid transaction of this log.
func decodeSlot(b []byte, h *header, pos int) (*txn, error) {
	le := binary.LittleEndian
	if m := le.Uint32(b[0:]); m != slotMagic {
		return nil, fmt.Errorf("wrong magic %#08x", m)
	}
	if got, want := le.Uint32(b[4:]), crcBlock(b[:blockSize], 4); got != want {
		return nil, fmt.Errorf("CRC %#08x, computed %#08x", got, want)
	}
	if e := le.Uint64(b[8:]); e != h.epoch {
		return nil, fmt.Errorf("epoch %d, log's is %d", e, h.epoch)
	}
	t := &txn{seq: le.Uint64(b[16:]), kind: le.Uint16(b[24:]), ctxStart: le.Uint32(b[28:])}
	if t.seq == 0 || t.seq%uint64(h.geo.slots) != uint64(pos) {
		return nil, fmt.Errorf("transaction %d does not belong in slot %d", t.seq, pos)
	}
	if t.kind != kindUpdate && t.kind != kindClean {
		return nil, fmt.Errorf("unknown kind %d", t.kind)
	}
	nu, nc := int(le.Uint16(b[26:])), int(le.Uint32(b[32:]))
	if nu > updatesPerTxn {
		return nil, fmt.Errorf("%d updates, at most %d", nu, updatesPerTxn)
	}
	if nc != min(contextPerTxn, h.geo.extents) || int(t.ctxStart) >= h.geo.extents {
		return nil, fmt.Errorf("context of %d entries at %d does not fit %d extents", nc, t.ctxStart, h.geo.extents)
	}
	valid := func(e uint64) bool { return e == emptyEntry || entryVol(e) < len(h.vols) }
	p := slotHeaderSize
	for range nu {
		u := update{elem: le.Uint32(b[p:]), entry: le.Uint64(b[p+4:])}
		if int(u.elem) >= h.geo.extents || !valid(u.entry) {
			return nil, fmt.Errorf("update of element %d to %#x out of range", u.elem, u.entry)
		}
		t.updates = append(t.updates, u)
		p += updateSize
	}
	p = slotHeaderSize + updatesPerTxn*updateSize
	for range nc {
		e := le.Uint64(b[p:])
		if !valid(e) {
			return nil, fmt.Errorf("context entry %#x out of range", e)
		}
		t.context = append(t.context, e)
		p += entrySize
	}
	return t, nil
}
