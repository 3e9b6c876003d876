package ploop

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/vhostdm/vhostdm/mapper"
)

// On-disk format of a ploop1 image (Parallels "expanded" image), all
// little-endian. These constants are part of the format.
//
//	off  size  field
//	  0    16  signature: "WithouFreSpacExt" (v2) or "WithoutFreeSpace" (v1)
//	 16     4  version: 2
//	 20     4  heads (geometry only)
//	 24     4  cylinders (geometry only)
//	 28     4  sectors per cluster (QEMU's "tracks")
//	 32     4  BAT entries: virtual size in clusters
//	 36     8  virtual size in sectors (v1: 4 bytes and 4 unused)
//	 44     4  in-use flag: inUseMagic while open read-write, else 0
//	 48     4  first data sector (v2: cluster-aligned)
//	 52     4  flags (bit 0 empty, bit 1 format version convert)
//	 56     8  format extension offset (0: none)
//	 64   4·N  BAT: u32 per virtual cluster, 0 = not allocated; v2 in
//	           clusters, v1 in sectors, from the start of the file
const (
	headerSize = 64
	sigV2      = "WithouFreSpacExt"
	sigV1      = "WithoutFreeSpace"
	version    = 2
	inUseMagic = 0x746F6E59
	batNone    = 0xFFFFFFFF // never valid on disk (dm-ploop's in-memory "none")
	geomHeads  = 16
)

// header is the decoded first 64 bytes of an image.
type header struct {
	v1         bool
	heads      uint32
	cylinders  uint32
	cluSectors uint32 // sectors per cluster
	batEntries uint32
	sectors    uint64 // virtual size
	inUse      uint32
	dataOff    uint32 // sectors
	flags      uint32
	extOff     uint64
}

// decodeHeader decodes and checks the header; syntax and relations only.
func decodeHeader(p []byte) (header, error) {
	var h header
	if len(p) < headerSize {
		return h, fmt.Errorf("header is %d bytes, want %d", len(p), headerSize)
	}
	switch string(p[:16]) {
	case sigV2:
	case sigV1:
		h.v1 = true
	default:
		return h, fmt.Errorf("signature %q: not a ploop1 image", bytes.TrimRight(p[:16], "\x00"))
	}
	le := binary.LittleEndian
	if v := le.Uint32(p[16:]); v != version {
		return h, fmt.Errorf("version %d: want %d", v, version)
	}
	h.heads = le.Uint32(p[20:])
	h.cylinders = le.Uint32(p[24:])
	h.cluSectors = le.Uint32(p[28:])
	h.batEntries = le.Uint32(p[32:])
	if h.v1 {
		h.sectors = uint64(le.Uint32(p[36:]))
	} else {
		h.sectors = le.Uint64(p[36:])
	}
	h.inUse = le.Uint32(p[44:])
	h.dataOff = le.Uint32(p[48:])
	h.flags = le.Uint32(p[52:])
	h.extOff = le.Uint64(p[56:])
	if h.cluSectors == 0 || h.cluSectors&(h.cluSectors-1) != 0 {
		return h, fmt.Errorf("cluster size %d sectors: not a power of two", h.cluSectors)
	}
	if h.sectors > uint64(h.batEntries)*uint64(h.cluSectors) {
		return h, fmt.Errorf("size %d sectors: more than %d BAT entries of %d sectors", h.sectors, h.batEntries, h.cluSectors)
	}
	if uint64(h.dataOff)*mapper.SectorSize < headerSize+4*uint64(h.batEntries) {
		return h, fmt.Errorf("first data sector %d: inside the BAT of %d entries", h.dataOff, h.batEntries)
	}
	return h, nil
}

// encode returns the 64-byte header.
func (h *header) encode() []byte {
	p := make([]byte, headerSize)
	le := binary.LittleEndian
	if h.v1 {
		copy(p, sigV1)
		le.PutUint32(p[36:], uint32(h.sectors))
	} else {
		copy(p, sigV2)
		le.PutUint64(p[36:], h.sectors)
	}
	le.PutUint32(p[16:], version)
	le.PutUint32(p[20:], h.heads)
	le.PutUint32(p[24:], h.cylinders)
	le.PutUint32(p[28:], h.cluSectors)
	le.PutUint32(p[32:], h.batEntries)
	le.PutUint32(p[44:], h.inUse)
	le.PutUint32(p[48:], h.dataOff)
	le.PutUint32(p[52:], h.flags)
	le.PutUint64(p[56:], h.extOff)
	return p
}

// newHeader returns the header of a new v2 image of size sectors, laid out
// as ploop's generate_pvd_header does: the BAT padded to whole clusters.
func newHeader(sectors, cluSectors uint64) header {
	n := (sectors + cluSectors - 1) / cluSectors
	clu := cluSectors * mapper.SectorSize
	dataOff := (headerSize + 4*n + clu - 1) / clu * cluSectors
	return header{heads: geomHeads, cylinders: uint32(max(1, sectors/(geomHeads*cluSectors))),
		cluSectors: uint32(cluSectors), batEntries: uint32(n), sectors: sectors, dataOff: uint32(dataOff)}
}

// delta is one image of the stack.
type delta struct {
	b        mapper.Backend
	own      bool // opened by a message: the stack closes it
	writable bool // the top of a read-write stack
	h        header
	unit     uint64   // bytes per BAT unit: the cluster for v2, a sector for v1
	bat      []uint32 // in memory; for the top, ahead of the disk until a flush
}

// name returns the name the image was opened by.
func (d *delta) name() string { return d.b.Name() }

// loc returns the byte offset of virtual cluster c in d, or false.
func (d *delta) loc(c uint64) (uint64, bool) {
	if c >= uint64(len(d.bat)) || d.bat[c] == 0 {
		return 0, false
	}
	return uint64(d.bat[c]) * d.unit, true
}

// isZero reports whether p is all zeros.
func isZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// openDelta reads and checks an image's header and BAT. A writable image
// whose first cluster is all zeros (an empty file) is formatted as a new
// image of fmtSectors sectors, if fmtSectors is not 0.
func openDelta(b mapper.Backend, cluSectors uint64, writable bool, fmtSectors uint64) (*delta, error) {
	p := make([]byte, headerSize)
	if err := b.ReadAt([][]byte{p}, 0); err != nil {
		return nil, err
	}
	if isZero(p) && writable && fmtSectors != 0 {
		first := make([]byte, cluSectors*mapper.SectorSize)
		if err := b.ReadAt([][]byte{first}, 0); err != nil {
			return nil, err
		}
		if isZero(first) {
			return formatDelta(b, fmtSectors, cluSectors)
		}
	}
	h, err := decodeHeader(p)
	if err != nil {
		return nil, mapper.WithClass(fmt.Errorf("image %s: %w", b.Name(), err), mapper.ErrCorrupt)
	}
	if uint64(h.cluSectors) != cluSectors {
		return nil, fmt.Errorf("image %s has clusters of %d sectors, the table says %d", b.Name(), h.cluSectors, cluSectors)
	}
	if writable && h.extOff != 0 {
		return nil, mapper.Errorf(mapper.ErrUnsupported, "image %s: format extension at %d: not supported in a writable image", b.Name(), h.extOff)
	}
	d := &delta{b: b, writable: writable, h: h, unit: cluSectors * mapper.SectorSize}
	if h.v1 {
		d.unit = mapper.SectorSize
	}
	size, err := b.Size()
	if err != nil {
		return nil, err
	}
	if headerSize+4*uint64(h.batEntries) > uint64(size) {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "image %s: BAT of %d entries beyond the end %d", b.Name(), h.batEntries, size)
	}
	raw := make([]byte, 4*uint64(h.batEntries))
	if err := b.ReadAt([][]byte{raw}, headerSize); err != nil {
		return nil, err
	}
	d.bat = make([]uint32, h.batEntries)
	for i := range d.bat {
		d.bat[i] = binary.LittleEndian.Uint32(raw[4*i:])
	}
	return d, nil
}

// formatDelta writes a new empty v2 image over b, in use, and returns it.
// The header clusters are written in full: ploop check refuses sparse ones.
func formatDelta(b mapper.Backend, sectors, cluSectors uint64) (*delta, error) {
	h := newHeader(sectors, cluSectors)
	h.inUse = inUseMagic
	area := make([]byte, uint64(h.dataOff)*mapper.SectorSize)
	copy(area, h.encode())
	if err := b.WriteAt([][]byte{area}, 0); err != nil {
		return nil, err
	}
	if err := b.Flush(); err != nil {
		return nil, err
	}
	return &delta{b: b, writable: true, h: h, unit: cluSectors * mapper.SectorSize, bat: make([]uint32, h.batEntries)}, nil
}

// check validates the BAT against the image size. With repair (an image
// that was not closed cleanly) entries beyond the end are cleared, as
// qemu-img check -r does: their data never became durable.
func (d *delta) check(repair bool) error {
	size, err := d.b.Size()
	if err != nil {
		return err
	}
	clu := uint64(d.h.cluSectors) * mapper.SectorSize
	first := uint64(d.h.dataOff) * mapper.SectorSize
	seen := make(map[uint32]uint64)
	for c, e := range d.bat {
		if e == 0 {
			continue
		}
		off := uint64(e) * d.unit
		switch {
		case e == batNone || off < first:
			return mapper.Errorf(mapper.ErrCorrupt, "image %s: BAT entry %d: bad cluster offset %d", d.name(), c, off)
		case off+clu > uint64(size) && repair:
			d.bat[c] = 0
			continue
		case off >= uint64(size):
			return mapper.Errorf(mapper.ErrCorrupt, "image %s: BAT entry %d: cluster at %d beyond the end %d", d.name(), c, off, size)
		}
		if prev, dup := seen[e]; dup {
			return mapper.Errorf(mapper.ErrCorrupt, "image %s: BAT entries %d and %d share cluster at %d", d.name(), prev, c, off)
		}
		seen[e] = uint64(c)
	}
	return nil
}

// dataEnd returns the byte offset where the next cluster is allocated:
// after the header area and after every cluster the BAT uses.
func (d *delta) dataEnd() uint64 {
	clu := uint64(d.h.cluSectors) * mapper.SectorSize
	end := uint64(d.h.dataOff) * mapper.SectorSize
	for _, e := range d.bat {
		if e != 0 {
			end = max(end, uint64(e)*d.unit+clu)
		}
	}
	return (end + clu - 1) / clu * clu
}

// batSector returns the 512 bytes of header and BAT at sector i as they
// are in memory.
func (d *delta) batSector(i uint64) []byte {
	p := make([]byte, mapper.SectorSize)
	lo := i * mapper.SectorSize
	if i == 0 {
		copy(p, d.h.encode())
	}
	for off := max(lo, headerSize); off < lo+mapper.SectorSize; off += 4 {
		c := (off - headerSize) / 4
		if c >= uint64(len(d.bat)) {
			break
		}
		binary.LittleEndian.PutUint32(p[off-lo:], d.bat[c])
	}
	return p
}

// writeBATSectors writes the given sectors of header and BAT (sorted),
// merging neighbours into one write.
func (d *delta) writeBATSectors(secs []uint64) error {
	slices.Sort(secs)
	secs = slices.Compact(secs)
	for i := 0; i < len(secs); {
		j := i + 1
		for j < len(secs) && secs[j] == secs[j-1]+1 {
			j++
		}
		bufs := make([][]byte, 0, j-i)
		for _, s := range secs[i:j] {
			bufs = append(bufs, d.batSector(s))
		}
		if err := d.b.WriteAt(bufs, int64(secs[i]*mapper.SectorSize)); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// setInUse writes the in-use flag and makes it durable.
func (d *delta) setInUse(on bool) error {
	d.h.inUse = 0
	if on {
		d.h.inUse = inUseMagic
	}
	if err := d.writeBATSectors([]uint64{0}); err != nil {
		return err
	}
	return d.b.Flush()
}

// densify rewrites the header clusters in full: qemu-img leaves them
// sparse, which ploop check refuses.
func (d *delta) densify() error {
	area := make([]byte, uint64(d.h.dataOff)*mapper.SectorSize)
	if err := d.b.ReadAt([][]byte{area}, 0); err != nil {
		return err
	}
	return d.b.WriteAt([][]byte{area}, 0)
}

// entrySector returns the sector of header and BAT holding BAT entry c.
func entrySector(c uint64) uint64 { return (headerSize + 4*c) / mapper.SectorSize }

// repair makes a writable image that was not closed cleanly consistent:
// entries pointing beyond the end are cleared, unused clusters between
// used ones are filled by moving the last used clusters down, and the
// file is cut after the last used cluster, so that qemu-img check and
// ploop check find no leaked clusters.
func (d *delta) repair() error {
	if err := d.check(true); err != nil {
		return err
	}
	clu := uint64(d.h.cluSectors) * mapper.SectorSize
	first := (uint64(d.h.dataOff)*mapper.SectorSize + clu - 1) / clu * clu
	owner := map[uint64]int{} // byte offset -> virtual cluster
	for c, e := range d.bat {
		if e != 0 {
			owner[uint64(e)*d.unit] = c
		}
	}
	buf := make([]byte, clu)
	hole := first
	for {
		for _, used := owner[hole]; used; _, used = owner[hole] {
			hole += clu
		}
		last := uint64(0)
		for off := range owner {
			last = max(last, off)
		}
		if len(owner) == 0 || last < hole || last%clu != 0 {
			break
		}
		// Copy, make the copy durable, then point the entry at it.
		c := owner[last]
		if err := d.b.ReadAt([][]byte{buf}, int64(last)); err != nil {
			return err
		}
		if err := d.b.WriteAt([][]byte{buf}, int64(hole)); err != nil {
			return err
		}
		if err := d.b.Flush(); err != nil {
			return err
		}
		d.bat[c] = uint32(hole / d.unit)
		if err := d.writeBATSectors([]uint64{entrySector(uint64(c))}); err != nil {
			return err
		}
		if err := d.b.Flush(); err != nil {
			return err
		}
		delete(owner, last)
		owner[hole] = c
	}
	return truncate(d.b, int64(d.dataEnd()))
}

// truncate cuts a regular file to size. The Backend interface has no
// truncate, so it works on backends named by an absolute path to a
// regular file and leaves other storage (block devices, memory) as is.
func truncate(b mapper.Backend, size int64) error {
	if t, ok := b.(mapper.Truncater); ok {
		if cur, err := b.Size(); err != nil || cur <= size {
			return err
		}
		return t.Truncate(size)
	}
	name := b.Name()
	if !filepath.IsAbs(name) {
		return nil
	}
	st, err := os.Stat(name)
	if err != nil || !st.Mode().IsRegular() || st.Size() <= size {
		return nil
	}
	f, err := os.OpenFile(name, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("truncate %s: %w", name, err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("truncate %s to %d: %w", name, size, err)
	}
	return f.Sync()
}
