package raid

import (
	"bytes"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/mapper"
)

// raid10 keeps copies of every chunk on several devices, where md's
// raid10 personality puts them (drivers/md/raid10.c, as dm-raid 1.15 sets
// it up from raid10_copies and raid10_format):
//
//   - near: the array's chunk c is copy-chunk c*copies of a row-major
//     walk over the devices, and its copies are the next copies-1
//     positions of the walk (wrapping to the next chunk row after the
//     last device);
//   - far: every device is cut into copies parts of stride chunks; the
//     first part holds chunk c on device c mod n, row c div n (raid0);
//     part f holds it again on the next device of its far set (dm-raid
//     asks for md's "use_far_sets" layout: sets of copies devices, the
//     last set taking the devices left over), f*stride chunks further;
//   - offset: as far, but the copies of a chunk row are the next
//     copies-1 chunk rows (stride 1), so the rows of the first part are
//     copies rows apart.
//
// The array is synced, its bitmap kept and its recovery checkpointed in
// array (virtual) sectors, as md's raid10 resyncs and marks its bitmap by
// array address; units are chunks, locked by array chunk number.

// Bits of md's raid10 layout word as dm-raid writes it.
const (
	r10FarShift   = 8       // far copies in the second byte
	r10Offset     = 1 << 16 // "offset": far copies in the next rows
	r10UseFarSets = 1 << 18 // far sets of near*far devices (md layout version 2)
)

// r10geo is the layout of a raid10 array.
type r10geo struct {
	n         int // devices
	near, far int // near and far copies; one of them is 1
	offset    bool
	format    string // near, far or offset
	setSize   int    // devices per far set
	chunk     uint64 // sectors
	stride    uint64 // chunks between a chunk's far copies
}

// r10loc is one copy of a chunk: a device and the chunk's number on it.
type r10loc struct {
	dev   int
	chunk uint64
}

// newR10 sets up the layout of copies in format over n devices of
// devSectors (a multiple of chunk, and of chunk*copies for far).
func newR10(n, copies int, format string, chunk, devSectors uint64) *r10geo {
	g := &r10geo{n: n, near: 1, far: 1, format: format, chunk: chunk, setSize: n}
	switch format {
	case "near":
		g.near = copies
	default:
		g.far = copies
		g.offset = format == "offset"
		g.setSize = copies
	}
	g.stride = 1
	if !g.offset {
		g.stride = devSectors / chunk / uint64(g.far)
	}
	return g
}

// copies returns the number of copies of every chunk.
func (g *r10geo) copies() int { return g.near * g.far }

// mdLayout is md's layout word for the array, as dm-raid records it in
// its superblocks.
func (g *r10geo) mdLayout() uint32 {
	l := uint32(g.near) | uint32(g.far)<<r10FarShift
	if g.far > 1 {
		l |= r10UseFarSets
	}
	if g.offset {
		l |= r10Offset
	}
	return l
}

// infoName is the raid type INFO reports, as dm-raid derives it from the
// layout: raid10 for near, raid10_far, raid10_offset.
func (g *r10geo) infoName() string {
	if g.format == "near" {
		return "raid10"
	}
	return "raid10_" + g.format
}

// locate returns the copies of array chunk c, the first copy first.
func (g *r10geo) locate(c uint64) []r10loc {
	n := uint64(g.n)
	lastStart := (g.n/g.setSize - 1) * g.setSize
	lastSize := g.setSize + g.n%g.setSize
	pos := c * uint64(g.near)
	row, dev := pos/n, int(pos%n)
	if g.offset {
		row *= uint64(g.far)
	}
	out := make([]r10loc, 0, g.copies())
	for range g.near {
		d, at := dev, row
		out = append(out, r10loc{d, at})
		for f := 1; f < g.far; f++ {
			set := d / g.setSize
			d += g.near
			if g.n%g.setSize != 0 && d > lastStart {
				d = (d-lastStart)%lastSize + lastStart
			} else {
				d = d%g.setSize + g.setSize*set
			}
			at += g.stride
			out = append(out, r10loc{d, at})
		}
		dev++
		if dev >= g.n {
			dev = 0
			row++
		}
	}
	return out
}

// lost reports whether some chunk has every copy on a device in bad. The
// devices of a chunk's copies depend only on where its first copy is,
// which the first n chunks cover.
func (g *r10geo) lost(bad func(int) bool) bool {
	for c := range uint64(g.n) {
		all := true
		for _, l := range g.locate(c) {
			all = all && bad(l.dev)
		}
		if all {
			return true
		}
	}
	return false
}

// chunks calls fn for each chunk piece of array sectors [sector,
// sector+n): array chunk c, chunk-relative sectors [in, in+k), and its
// part of data (nil without data).
func (r *raid) chunks(sector, n uint64, data [][]byte, fn func(c, in, k uint64, bufs [][]byte) error) error {
	off := 0
	for n > 0 {
		c, in := sector/r.chunk, sector%r.chunk
		k := min(n, r.chunk-in)
		var bufs [][]byte
		if data != nil {
			bufs = mapper.SliceBufs(nil, data, off, int(k<<mapper.SectorShift))
		}
		if err := fn(c, in, k, bufs); err != nil {
			return err
		}
		sector, n, off = sector+k, n-k, off+int(k<<mapper.SectorShift)
	}
	return nil
}

// r0IO reads, writes or discards raid0's striped chunks: chunk c on
// device c mod n at device chunk c div n (md's raid0 with one strip zone,
// as dm-raid's equal-size devices make it). A failing device fails the
// request; raid0 has nothing to take it out of service for.
func (r *raid) r0IO(op mapper.Op, sector, n uint64, data [][]byte) error {
	nd := uint64(len(r.devs))
	return r.chunks(sector, n, data, func(c, in, k uint64, bufs [][]byte) error {
		m := r.devs[c%nd]
		off := int64(((c/nd)*r.chunk + in) << mapper.SectorShift)
		var err error
		switch op {
		case mapper.OpRead:
			err = m.dev.ReadAt(bufs, off)
		case mapper.OpWrite:
			err = m.dev.WriteAt(bufs, off)
		case mapper.OpDiscard:
			err = m.dev.Discard(off, int64(k<<mapper.SectorShift))
		}
		if err != nil {
			return mapper.Errorf(mapper.ErrIO, "raid0 device %d (%s): %v", c%nd, m.name, err)
		}
		return nil
	})
}

// r10Offset is the byte offset of chunk-relative sector in of copy l.
func (r *raid) r10Offset(l r10loc, in uint64) int64 {
	return int64((l.chunk*r.chunk + in) << mapper.SectorShift)
}

// r10Read reads each chunk from one copy that holds valid data, taking
// the copies in turn and trying the next when one fails.
func (r *raid) r10Read(sector, n uint64, data [][]byte) error {
	return r.chunks(sector, n, data, func(c, in, k uint64, bufs [][]byte) error {
		locs := r.r10.locate(c)
		end := (c + 1) * r.chunk
		start := int(r.rr.Add(1))
		for j := range locs {
			l := locs[(start+j)%len(locs)]
			if !r.readable(l.dev, end) {
				continue
			}
			err := r.devs[l.dev].dev.ReadAt(bufs, r.r10Offset(l, in))
			if err == nil {
				return nil
			}
			r.fail(l.dev, err)
		}
		return mapper.Errorf(mapper.ErrIO, "read of array chunk %d: no copy can be read", c)
	})
}

// r10Write writes (or discards) every copy of each chunk on the devices in
// service, under the chunk's lock and with its bitmap region marked; a
// chunk none of whose copies could be written fails the request.
func (r *raid) r10Write(op mapper.Op, sector, n uint64, data [][]byte) error {
	return r.chunks(sector, n, data, func(c, in, k uint64, bufs [][]byte) error {
		l := r.lock(c)
		l.Lock()
		defer l.Unlock()
		lo := c*r.chunk + in
		if r.bm != nil {
			if err := r.bm.startWrite(r, lo, lo+k); err != nil {
				return err
			}
			defer r.bm.endWrite(lo, lo+k)
		}
		var wg sync.WaitGroup
		var ok atomic.Int32
		for _, loc := range r.r10.locate(c) {
			m := r.devs[loc.dev]
			if m.faulty.Load() {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				var err error
				if op == mapper.OpDiscard {
					err = m.dev.Discard(r.r10Offset(loc, in), int64(k<<mapper.SectorShift))
				} else {
					err = m.dev.WriteAt(bufs, r.r10Offset(loc, in))
				}
				if err != nil {
					r.fail(loc.dev, err)
					return
				}
				ok.Add(1)
			}()
		}
		wg.Wait()
		if ok.Load() == 0 {
			return mapper.Errorf(mapper.ErrIO, "%s of array chunk %d: no copy could be written", op, c)
		}
		return nil
	})
}

// syncR10Unit runs one step of action on array chunk c: resync copies the
// first readable copy to the others, recover to the copies on devices
// being recovered; check counts mismatches between the first copy and
// each other (in 4 KiB rows) and repair rewrites them.
func (r *raid) syncR10Unit(action string, c uint64) (uint64, error) {
	l := r.lock(c)
	l.Lock()
	defer l.Unlock()
	end := (c + 1) * r.chunk
	size := int(r.chunk << mapper.SectorShift)
	locs := r.r10.locate(c)
	src := -1
	for j, loc := range locs {
		if r.devs[loc.dev].inSync.Load() && r.readable(loc.dev, end) {
			src = j
			break
		}
	}
	if src < 0 {
		return 0, mapper.Errorf(mapper.ErrIO, "array chunk %d: no copy in sync", c)
	}
	data := make([]byte, size)
	sl := locs[src]
	if err := r.devs[sl.dev].dev.ReadAt([][]byte{data}, r.r10Offset(sl, 0)); err != nil {
		r.fail(sl.dev, err)
		return 0, err
	}
	var mism uint64
	for j, loc := range locs {
		m := r.devs[loc.dev]
		if j == src || m.faulty.Load() {
			continue
		}
		write := false
		switch action {
		case "resync":
			write = true
		case "recover":
			write = !r.readable(loc.dev, end)
		case "check", "repair":
			if !r.readable(loc.dev, end) {
				continue
			}
			other := make([]byte, size)
			if err := m.dev.ReadAt([][]byte{other}, r.r10Offset(loc, 0)); err != nil {
				r.fail(loc.dev, err)
				continue
			}
			if k := countMismatches(data, other, min(r.chunk, r10SyncSectors)); k > 0 {
				mism += k
				write = action == "repair"
			}
		}
		if write {
			if err := m.dev.WriteAt([][]byte{data}, r.r10Offset(loc, 0)); err != nil {
				r.fail(loc.dev, err)
			}
		}
	}
	return mism, nil
}

// r10SyncSectors is the most md's raid10 syncs in one request (its
// RESYNC_PAGES, 64 KiB); a request never crosses a chunk.
const r10SyncSectors = 128

// countMismatches returns the sectors of the pieces of unit sectors where
// a and b differ. md's raid10 counts a whole sync request (a chunk, at
// most r10SyncSectors) for each copy that differs from the first.
func countMismatches(a, b []byte, unit uint64) uint64 {
	row := int(unit << mapper.SectorShift)
	var mism uint64
	for o := 0; o < len(a); o += row {
		e := min(o+row, len(a))
		if !bytes.Equal(a[o:e], b[o:e]) {
			mism += uint64(e-o) >> mapper.SectorShift
		}
	}
	return mism
}

// r10Check validates the raid10 geometry of a table: the kernel's
// raid10_copies bound, the device size dm-raid derives, and vhostdm's
// whole-chunk requirements.
func r10Check(length uint64, n, copies int, format string, chunk uint64) (devSectors uint64, err error) {
	if copies < 2 || copies > n {
		return 0, fmt.Errorf("raid10_copies %d: must be 2..%d, the device count (dm-raid: Bad value for 'raid10_copies')", copies, n)
	}
	if length*uint64(copies)%uint64(n) != 0 {
		return 0, fmt.Errorf("target length %d times %d copies not divisible by %d devices (dm-raid: Target length not divisible by number of data devices)", length, copies, n)
	}
	devSectors = length * uint64(copies) / uint64(n)
	unit := chunk
	if format == "far" {
		unit *= uint64(copies)
	}
	if length%chunk != 0 || devSectors%unit != 0 {
		return 0, fmt.Errorf("target length %d (%d sectors per device): must be a multiple of chunk size %d, and the device size of %d", length, devSectors, chunk, unit)
	}
	return devSectors, nil
}
