package targets

import (
	"errors"
	"fmt"
	"math/bits"
	"strings"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/mapper"
)

// striped spreads the device over stripes in chunks (RAID-0).
//
//	striped <#stripes> <chunk_size> [<dev_path> <offset>]{#stripes}
//
// INFO:  "2 /img/a /img/b 1 AA" (#stripes, devices, 1, A or D per stripe:
// D once I/O to that stripe has failed).
// TABLE: "2 128 /img/a 0 /img/b 0".
//
// The chunk size must be a power of two of at least 8 sectors (4 KiB) and
// the target length a multiple of chunk size × stripes, as the kernel's
// documentation states; kernel 6.1 itself also accepts other chunk sizes,
// which vhostdm refuses.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "striped", Version: [3]int{1, 6, 0}, New: newStriped})
}

const maxStripes = 1024

type stripe struct {
	dev    mapper.Backend
	offset uint64 // sectors into dev
	errors atomic.Uint32
}

type striped struct {
	stripes    []stripe
	chunk      uint64 // sectors
	chunkShift uint
	width      uint64 // sectors per stripe
	event      mapper.EventRaiser
}

func newStriped(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) < 2 {
		return nil, fmt.Errorf("want at least 2 arguments <#stripes> <chunk_size>, got %d", len(args))
	}
	a := mapper.NewArgs(args)
	n, err := a.Uint("stripe count", 1, maxStripes)
	if err != nil {
		return nil, err
	}
	chunk, err := a.Uint("chunk size", 8, 1<<30)
	if err != nil {
		return nil, err
	}
	if chunk&(chunk-1) != 0 {
		return nil, fmt.Errorf("chunk size %d: not a power of two", chunk)
	}
	if c.Length%n != 0 {
		return nil, fmt.Errorf("target length %d not divisible by stripe count %d", c.Length, n)
	}
	width := c.Length / n
	if width%chunk != 0 {
		return nil, fmt.Errorf("target length %d not divisible by chunk size %d × stripe count %d", c.Length, chunk, n)
	}
	if uint64(a.Len()) != 2*n {
		return nil, fmt.Errorf("want %d device and offset pairs for %d stripes, got %d arguments", n, n, a.Len())
	}
	t := &striped{stripes: make([]stripe, n), chunk: chunk, chunkShift: uint(bits.TrailingZeros64(chunk)), width: width, event: c.Event()}
	for i := range t.stripes {
		path, _ := a.Next("device")
		off, err := a.Sector(fmt.Sprintf("stripe %d offset", i))
		if err != nil {
			return nil, err
		}
		if off+width > mapper.MaxSector {
			return nil, fmt.Errorf("stripe %d offset %d: beyond the largest device", i, off)
		}
		dev, err := c.Open(path)
		if err != nil {
			return nil, fmt.Errorf("stripe %d: %w", i, err)
		}
		t.stripes[i].dev, t.stripes[i].offset = dev, off
	}
	return t, nil
}

// locate maps a target sector to its stripe and the sector on that
// stripe's device (before the stripe's offset is added).
func (t *striped) locate(sector uint64) (int, uint64) {
	chunk := sector >> t.chunkShift
	n := uint64(len(t.stripes))
	return int(chunk % n), (chunk/n)<<t.chunkShift + sector&(t.chunk-1)
}

func (t *striped) Map(r *mapper.Request) error {
	switch r.Op {
	case mapper.OpFlush:
		return t.Flush()
	case mapper.OpDiscard, mapper.OpWriteZeroes:
		return t.mapRange(r)
	}
	// Reads and writes go chunk by chunk.
	sector, left, off := r.Sector, r.Sectors, 0
	if left <= t.chunk-sector&(t.chunk-1) { // one chunk: no split
		i, dsec := t.locate(sector)
		return t.note(i, mapper.MapBackend(t.stripes[i].dev, t.stripes[i].offset+dsec, r))
	}
	var vec [8][]byte
	var errs []error
	for left > 0 {
		n := min(left, t.chunk-sector&(t.chunk-1))
		i, dsec := t.locate(sector)
		part := mapper.Request{Op: r.Op, Sector: sector, Sectors: n, FUA: r.FUA, Resident: r.Resident,
			Data: mapper.SliceBufs(vec[:0], r.Data, off, int(n<<mapper.SectorShift))}
		if err := t.note(i, mapper.MapBackend(t.stripes[i].dev, t.stripes[i].offset+dsec, &part)); err != nil {
			errs = append(errs, err)
		}
		sector += n
		left -= n
		off += int(n << mapper.SectorShift)
	}
	return errors.Join(errs...)
}

// TryMap implements mapper.TryMapper for reads and writes: striped only
// remaps. A part that would block makes the whole request would-block
// (Map then redoes it); other errors count against their stripe as in Map.
func (t *striped) TryMap(r *mapper.Request) error {
	if r.Op != mapper.OpRead && r.Op != mapper.OpWrite {
		return mapper.ErrWouldBlock
	}
	sector, left, off := r.Sector, r.Sectors, 0
	if left <= t.chunk-sector&(t.chunk-1) {
		i, dsec := t.locate(sector)
		return t.noteTry(i, mapper.TryMapBackend(t.stripes[i].dev, t.stripes[i].offset+dsec, r))
	}
	var vec [8][]byte
	var errs []error
	for left > 0 {
		n := min(left, t.chunk-sector&(t.chunk-1))
		i, dsec := t.locate(sector)
		part := mapper.Request{Op: r.Op, Sector: sector, Sectors: n, FUA: r.FUA, Resident: r.Resident,
			Data: mapper.SliceBufs(vec[:0], r.Data, off, int(n<<mapper.SectorShift))}
		if err := t.noteTry(i, mapper.TryMapBackend(t.stripes[i].dev, t.stripes[i].offset+dsec, &part)); err != nil {
			if errors.Is(err, mapper.ErrWouldBlock) {
				return err
			}
			errs = append(errs, err)
		}
		sector += n
		left -= n
		off += int(n << mapper.SectorShift)
	}
	return errors.Join(errs...)
}

// noteTry is note for TryMap: would-block is not a stripe failure.
func (t *striped) noteTry(i int, err error) error {
	if errors.Is(err, mapper.ErrWouldBlock) {
		return err
	}
	return t.note(i, err)
}

// mapRange sends a discard or write-zeroes as one contiguous range per
// stripe, the kernel's stripe_map_range.
func (t *striped) mapRange(r *mapper.Request) error {
	var errs []error
	for i := range t.stripes {
		begin := t.rangeSector(r.Sector, i)
		end := t.rangeSector(r.Sector+r.Sectors, i)
		if begin >= end {
			continue
		}
		part := mapper.Request{Op: r.Op, Sector: begin, Sectors: end - begin, Unmap: r.Unmap}
		if err := t.note(i, mapper.MapBackend(t.stripes[i].dev, t.stripes[i].offset+begin, &part)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// rangeSector returns where on stripe target's device the range boundary
// at target sector lies: the mapped sector if sector falls on that stripe,
// else the start of that stripe's next chunk at or after the boundary.
func (t *striped) rangeSector(sector uint64, target int) uint64 {
	if sector == t.width*uint64(len(t.stripes)) { // the end of the target
		return t.width
	}
	i, dsec := t.locate(sector)
	if i == target {
		return dsec
	}
	dsec &^= t.chunk - 1
	if target < i {
		dsec += t.chunk
	}
	return dsec
}

// note marks stripe i failed on an I/O error and raises an event the
// first time, as the kernel's stripe_end_io does.
func (t *striped) note(i int, err error) error {
	if err != nil && t.stripes[i].errors.Add(1) == 1 {
		t.event("stripe_failed", map[string]any{"stripe": i, "device": t.stripes[i].dev.Name()})
	}
	return err
}

// Flush flushes every stripe's device.
func (t *striped) Flush() error {
	var errs []error
	for i := range t.stripes {
		if err := t.note(i, t.stripes[i].dev.Flush()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (t *striped) Status(kind mapper.StatusKind) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d", len(t.stripes))
	if kind == mapper.StatusTable {
		fmt.Fprintf(&b, " %d", t.chunk)
		for i := range t.stripes {
			fmt.Fprintf(&b, " %s %d", t.stripes[i].dev.Name(), t.stripes[i].offset)
		}
		return b.String()
	}
	for i := range t.stripes {
		b.WriteString(" " + t.stripes[i].dev.Name())
	}
	b.WriteString(" 1 ")
	for i := range t.stripes {
		if t.stripes[i].errors.Load() > 0 {
			b.WriteByte('D')
		} else {
			b.WriteByte('A')
		}
	}
	return b.String()
}

func (t *striped) Close() error { return nil }

// Areas lists each stripe's area of its device.
func (t *striped) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	for i := range t.stripes {
		if err := fn(t.stripes[i].dev, t.stripes[i].offset, t.width); err != nil {
			return err
		}
	}
	return nil
}

// Allocation asks the backend of the chunk holding sector.
func (t *striped) Allocation(sector, sectors uint64) (uint64, mapper.AllocState, error) {
	n := min(sectors, t.chunk-sector&(t.chunk-1))
	i, dsec := t.locate(sector)
	return mapper.BackendAllocation(t.stripes[i].dev, t.stripes[i].offset+dsec, n)
}
