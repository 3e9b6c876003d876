package mapper

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// AllocState is what base:allocation (NBD's block status) says of a run
// of sectors: allocated data (0), or a hole, and whether it reads as zeros.
type AllocState uint8

// Allocation flags, NBD's NBD_STATE_HOLE and NBD_STATE_ZERO.
const (
	AllocHole AllocState = 1 << iota // not allocated: storage is not consumed
	AllocZero                        // reads return zeros
)

// Allocator is a target that knows which of its sectors are allocated
// (thin, ploop, zero, error). Targets without it report data.
type Allocator interface {
	// Allocation returns the state of the run of sectors starting at
	// sector (relative to the target) and its length n, 1 <= n <= sectors.
	Allocation(sector, sectors uint64) (n uint64, st AllocState, err error)
}

// BackendAllocator is a Backend that knows its holes (sparse files by
// SEEK_DATA and SEEK_HOLE, mapper devices by their tables).
type BackendAllocator interface {
	// Allocation returns the state of the run of bytes starting at off
	// and its length n, 1 <= n <= length.
	Allocation(off, length int64) (n int64, st AllocState, err error)
}

// BackendAllocation is the allocation of sectors of backend b from
// sector: pass-through targets (linear, striped) answer with it.
func BackendAllocation(b Backend, sector, sectors uint64) (uint64, AllocState, error) {
	ba, ok := b.(BackendAllocator)
	if !ok {
		return sectors, 0, nil
	}
	n, st, err := ba.Allocation(int64(sector<<SectorShift), int64(sectors<<SectorShift))
	if err != nil {
		return 0, 0, err
	}
	ns := uint64(n) >> SectorShift
	if ns == 0 { // a run shorter than a sector: round to one, as data
		return 1, 0, nil
	}
	return min(ns, sectors), st, nil
}

// Allocation returns the state of the run of sectors from sector (relative
// to the device), at most sectors long and inside one target.
func (d *Device) Allocation(sector, sectors uint64) (n uint64, st AllocState, err error) {
	t := d.enter()
	defer d.exit()
	if t == nil {
		return 0, 0, fmt.Errorf("%s: %w", d.name, ErrNoTable)
	}
	size := t.Size()
	if sectors == 0 || sector >= size || sectors > size-sector {
		return 0, 0, Errorf(ErrInvalid, "%s: allocation of %d sectors at %d: outside device of %d sectors", d.name, sectors, sector, size)
	}
	i := t.Find(sector)
	start, end := t.lines[i].Start, t.ends[i]
	sectors = min(sectors, end-sector)
	a, ok := t.targets[i].(Allocator)
	if !ok {
		return sectors, 0, nil
	}
	n, st, err = a.Allocation(sector-start, sectors)
	if err != nil {
		return 0, 0, err
	}
	if n == 0 || n > sectors {
		n = sectors
	}
	return n, st, nil
}

// Allocation implements BackendAllocator for a device used as a backend.
func (b *deviceBackend) Allocation(off, length int64) (int64, AllocState, error) {
	n, st, err := b.d.Allocation(uint64(off)>>SectorShift, uint64(length)>>SectorShift)
	return int64(n) << SectorShift, st, err
}

// Allocation implements BackendAllocator for regular files with
// SEEK_DATA and SEEK_HOLE: holes and the range past the end read as zeros.
// Block devices report data.
func (f *fileBackend) Allocation(off, length int64) (int64, AllocState, error) {
	if f.block {
		return length, 0, nil
	}
	data, err := unix.Seek(f.fd, off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) { // no data at or after off
		return length, AllocHole | AllocZero, nil
	}
	if err != nil {
		return length, 0, nil // no SEEK_DATA here: say data, which is safe
	}
	if data > off {
		return min(data-off, length), AllocHole | AllocZero, nil
	}
	hole, err := unix.Seek(f.fd, off, unix.SEEK_HOLE)
	if err != nil || hole <= off {
		return length, 0, nil
	}
	return min(hole-off, length), 0, nil
}
