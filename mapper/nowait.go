package mapper

import (
	"errors"
	"fmt"
)

// ErrWouldBlock is returned by the non-blocking attempts (TryMapper.TryMap,
// NowaitBackend, Table.TryMap, Device.TrySubmit) when a request cannot
// complete without waiting: data not in the page cache, a target that
// sleeps or takes locks held by slow work, an operation that has no
// non-blocking form. The caller then performs the request with the
// blocking call (Map, Submit), which redoes it whole: a read may have
// filled part of its buffers and a write may have reached part of its
// range, both harmless since the blocking call rewrites them with the same
// data.
var ErrWouldBlock = errors.New("operation would block")

// TryMapper is a target that can perform some requests without blocking,
// so that a submitter can run them to completion on its own goroutine
// (vhost's ring goroutine) instead of handing them to a worker. Targets
// that only remap (linear, striped, zero, error) implement it; a target
// that may sleep, wait for another request or do work proportional to
// something other than the request does not, and its requests always take
// the blocking path.
type TryMapper interface {
	// TryMap performs r, as Map does, if it can without blocking, and
	// otherwise returns ErrWouldBlock (see there for what may have been
	// done). Any other error is the request's result.
	TryMap(r *Request) error
}

// Passthrough is a target that maps its whole range onto one range of one
// backend, sector for sector, for every request and whatever its state
// (linear): Table.TryMap then performs its reads and writes on the
// backend itself, as TryMapBackend, from a compact per-line entry of the
// table, without calling the target. It must be a TryMapper whose TryMap
// is exactly that.
type Passthrough interface {
	// Passthrough returns the backend and the backend sector that the
	// target's first sector maps to.
	Passthrough() (b Backend, bsector uint64)
}

// NowaitBackend is a Backend that can try reads and writes without
// blocking: the page cache serves them or they fail with ErrWouldBlock.
// resident is the request's Request.Resident: bufs are memory that faults
// in without disk I/O, so the backend may make its non-blocking system
// calls raw.
type NowaitBackend interface {
	// TryReadAt is ReadAt, or ErrWouldBlock when the data is not all
	// in memory.
	TryReadAt(bufs [][]byte, off int64, resident bool) error
	// TryWriteAt is WriteAt, or ErrWouldBlock when the write would wait
	// (for memory, for writeback throttling, for a lock) or the storage
	// has no non-blocking writes.
	TryWriteAt(bufs [][]byte, off int64, resident bool) error
}

// TryMapBackend is MapBackend without blocking: reads and writes go to
// a NowaitBackend's Try methods (with r.Resident); a FUA write, a flush, a
// discard, a write-zeroes and any request to another Backend return
// ErrWouldBlock.
func TryMapBackend(b Backend, sector uint64, r *Request) error {
	nb, ok := b.(NowaitBackend)
	if !ok {
		return ErrWouldBlock
	}
	off := int64(sector << SectorShift)
	switch {
	case r.Op == OpRead:
		return nb.TryReadAt(r.Data, off, r.Resident)
	case r.Op == OpWrite && !r.FUA:
		return nb.TryWriteAt(r.Data, off, r.Resident)
	}
	return ErrWouldBlock
}

// TryMap is Map without blocking: every target the request touches must
// be a TryMapper and complete its part without blocking, else the result
// is ErrWouldBlock. Flushes always return ErrWouldBlock.
func (t *Table) TryMap(r *Request) error {
	if r.Op == OpFlush {
		return ErrWouldBlock
	}
	if r.Op.IsWrite() && t.readOnly {
		return ErrReadOnly
	}
	if t.whole != nil {
		// A request inside one bucket that one Passthrough line
		// covers: the bucket's entry has all that it needs.
		if b := r.Sector >> t.shift; b < uint64(len(t.whole)) && (r.Sector+r.Sectors-1)>>t.shift == b {
			if p := &t.whole[b]; p.b != nil {
				return TryMapBackend(p.b, r.Sector+p.delta, r)
			}
		}
	}
	i := t.Find(r.Sector)
	if t.pass != nil {
		if p := &t.pass[i]; p.b != nil && r.Sector+r.Sectors <= p.end {
			return TryMapBackend(p.b, r.Sector+p.delta, r)
		}
	}
	var start uint64
	if i > 0 {
		start = t.ends[i-1]
	}
	if r.Sector+r.Sectors <= t.ends[i] {
		tm, ok := t.targets[i].(TryMapper)
		if !ok {
			return ErrWouldBlock
		}
		r.Sector -= start
		err := tm.TryMap(r)
		r.Sector += start
		return err
	}
	// Split: every part must go through without blocking. Errors of
	// parts that ran are kept only if no later part would block (then
	// Map redoes the whole request and reports its own errors).
	sector, left := r.Sector, r.Sectors
	off := 0
	var errs []error
	var vec [8][]byte
	for left > 0 {
		tm, ok := t.targets[i].(TryMapper)
		if !ok {
			return ErrWouldBlock
		}
		n := min(left, t.ends[i]-sector)
		part := Request{Op: r.Op, Sector: sector - t.lines[i].Start, Sectors: n, Unmap: r.Unmap, FUA: r.FUA, Resident: r.Resident}
		if r.Data != nil {
			part.Data = SliceBufs(vec[:0], r.Data, off, int(n<<SectorShift))
		}
		if err := tm.TryMap(&part); err != nil {
			if errors.Is(err, ErrWouldBlock) {
				return ErrWouldBlock
			}
			errs = append(errs, err)
		}
		sector += n
		left -= n
		off += int(n << SectorShift)
		i++
	}
	return errors.Join(errs...)
}

// TrySubmit is Submit without blocking: it performs a read or write on the
// live table when every target it touches can complete it without
// blocking, and returns ErrWouldBlock otherwise (the device is suspended,
// a target or backend would wait, the operation is not a read or write);
// the caller then performs r with Submit. Errors for a bad request are the
// same as Submit's.
func (d *Device) TrySubmit(r *Request) error {
	d.inflight.Add(1)
	defer d.exit()
	if d.suspended.Load() {
		return ErrWouldBlock
	}
	t := d.live.Load()
	if t == nil {
		return fmt.Errorf("%s: %w", d.name, ErrNoTable)
	}
	if r.Op != OpRead && r.Op != OpWrite {
		return ErrWouldBlock
	}
	if err := d.check(t, r); err != nil {
		return err
	}
	if r.Op == OpWrite {
		sector, sectors := r.Sector, r.Sectors
		err := t.TryMap(r)
		// Recorded even when the attempt would block: part of the
		// range may have been written already.
		d.recordWrite(sector, sectors)
		return err
	}
	return t.TryMap(r)
}
