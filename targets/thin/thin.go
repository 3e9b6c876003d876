package thin

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/vhostdm/vhostdm/mapper"
)

// thinTarget is one thin table line: a thin device of a pool.
type thinTarget struct {
	p        *pool
	id       uint64
	dev      *device
	poolDev  mapper.Backend
	origin   mapper.Backend // external origin, or nil
	originSz uint64         // sectors
	length   uint64
}

func newThin(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) < 2 || len(args) > 3 {
		return nil, fmt.Errorf("want <pool dev> <dev id> [<external origin dev>], got %d argument(s)", len(args))
	}
	id, err := mapper.ParseUint("device id", args[1], 0, maxDevID)
	if err != nil {
		return nil, err
	}
	poolDev, err := c.Open(args[0])
	if err != nil {
		return nil, err
	}
	t := &thinTarget{id: id, poolDev: poolDev, length: c.Length}
	if len(args) == 3 {
		if t.origin, err = c.Open(args[2]); err != nil {
			return nil, err
		}
		size, err := t.origin.Size()
		if err != nil {
			return nil, err
		}
		t.originSz = uint64(size) / mapper.SectorSize
	}
	reg := registryOf(c)
	reg.mu.Lock()
	p := reg.byName[strings.TrimPrefix(args[0], mapper.MapperDir)]
	if p != nil {
		p.refs++
	}
	reg.mu.Unlock()
	if p == nil {
		return nil, mapper.Errorf(mapper.ErrNotFound, "pool device %s: no thin-pool is active on it", args[0])
	}
	p.mu.Lock()
	d := p.md.devs[id]
	if d != nil {
		d.open++
	}
	p.mu.Unlock()
	if d == nil {
		p.release()
		return nil, mapper.Errorf(mapper.ErrNotFound, "couldn't open thin internal device %d: %w", id, errNoDevice)
	}
	t.p, t.dev = p, d
	return t, nil
}

// Map serves I/O block by block: reads of unmapped blocks return zeros
// (or the external origin), the first write to a block provisions it,
// a write to a shared block copies it, and discards unmap whole blocks.
// Discards implements mapper.Discarder: not with the pool's
// ignore_discard feature.
func (t *thinTarget) Discards() bool {
	t.p.mu.Lock()
	defer t.p.mu.Unlock()
	return !t.p.feat.ignoreDiscard
}

// WritesZeroes implements mapper.Discarder.
func (t *thinTarget) WritesZeroes() bool { return true }

func (t *thinTarget) Map(r *mapper.Request) error {
	switch r.Op {
	case mapper.OpFlush:
		return t.p.flush()
	case mapper.OpDiscard:
		t.p.mu.Lock()
		ignore := t.p.feat.ignoreDiscard
		t.p.mu.Unlock()
		if ignore {
			return nil
		}
	}
	bs := t.p.blockSize
	var err error
	for s, off := r.Sector, 0; s < r.Sector+r.Sectors && err == nil; {
		vb, in := s/bs, s%bs
		n := min(bs-in, r.Sector+r.Sectors-s)
		var bufs [][]byte
		if r.Data != nil {
			bufs = mapper.SliceBufs(nil, r.Data, off, int(n*mapper.SectorSize))
		}
		switch r.Op {
		case mapper.OpRead:
			err = t.read(vb, in, n, bufs)
		case mapper.OpWrite:
			err = t.write(vb, in, n, bufs, false)
		case mapper.OpWriteZeroes:
			err = t.write(vb, in, n, nil, r.Unmap)
		case mapper.OpDiscard:
			if in == 0 && n == bs {
				err = t.discard(vb)
			}
		default:
			err = mapper.Errorf(mapper.ErrUnsupported, "%s", r.Op)
		}
		s += n
		off += int(n * mapper.SectorSize)
	}
	if err == nil && r.FUA && r.Op.IsWrite() {
		err = t.p.flush()
	}
	return err
}

// lookup returns vb's data block, whether it is mapped, and whether it is
// shared (mapped before the device's last snapshot, as the kernel judges).
func (t *thinTarget) lookup(vb uint64) (pb uint64, mapped, shared bool, err error) {
	p := t.p
	if p.failed != nil {
		return 0, false, false, p.failed
	}
	pb, tm, ok, err := p.md.lookup(t.dev, vb)
	if err != nil {
		p.fail(err)
		return 0, false, false, p.failed
	}
	return pb, ok, ok && tm < t.dev.snapshottedTime, nil
}

func (t *thinTarget) read(vb, in, n uint64, bufs [][]byte) error {
	p := t.p
	p.mu.Lock()
	pb, ok, _, err := t.lookup(vb)
	data := p.data
	p.mu.Unlock()
	switch {
	case err != nil:
		return err
	case ok:
		return data.ReadAt(bufs, t.dataOff(pb, in))
	default:
		return t.readOrigin(vb*p.blockSize+in, n, bufs)
	}
}

func (t *thinTarget) dataOff(pb, in uint64) int64 {
	return int64((pb*t.p.blockSize + in) * mapper.SectorSize)
}

// readOrigin reads virtual sectors [s, s+n) of an unmapped block: the
// external origin where it reaches, zeros elsewhere.
func (t *thinTarget) readOrigin(s, n uint64, bufs [][]byte) error {
	if t.origin == nil || s >= t.originSz {
		mapper.ZeroBufs(bufs)
		return nil
	}
	k := min(n, t.originSz-s)
	if err := t.origin.ReadAt(mapper.SliceBufs(nil, bufs, 0, int(k*mapper.SectorSize)), int64(s*mapper.SectorSize)); err != nil {
		return err
	}
	if k < n {
		mapper.ZeroBufs(mapper.SliceBufs(nil, bufs, int(k*mapper.SectorSize), int((n-k)*mapper.SectorSize)))
	}
	return nil
}

// write writes bufs (or zeros when bufs is nil) to sectors [in, in+n) of
// virtual block vb.
func (t *thinTarget) write(vb, in, n uint64, bufs [][]byte, unmap bool) error {
	p := t.p
	unlock := p.lockBlock(blockKey{t.id, vb})
	defer unlock()
	p.mu.Lock()
	// A read-only pool still takes writes to blocks mapped and not
	// shared, as the kernel's process_bio_read_only; alloc refuses new
	// blocks.
	pb, ok, shared, err := t.lookup(vb)
	data := p.data
	if err != nil {
		p.mu.Unlock()
		return err
	}
	if bufs == nil && !ok && t.origin == nil {
		p.mu.Unlock()
		return nil // an unmapped block already reads as zeros
	}
	if bufs == nil && unmap && in == 0 && n == p.blockSize && !p.readOnly() {
		p.mu.Unlock()
		return t.discardLocked(vb)
	}
	if ok && !shared {
		p.mu.Unlock()
		return t.put(data, t.dataOff(pb, in), n, bufs)
	}
	nb, err := p.alloc()
	data = p.data
	zero := !p.feat.skipZeroing
	p.mu.Unlock()
	if err != nil {
		return err
	}
	// The new block's mapping goes in only once its data has landed: a
	// failed fill or write releases the block and fails the request.
	err = t.fill(data, vb, pb, ok, nb, in, n, zero)
	if err == nil {
		err = t.put(data, t.dataOff(nb, in), n, bufs)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err == nil && p.failed == nil {
		if err = p.md.insert(t.id, t.dev, vb, nb); err != nil {
			p.fail(err)
			err = p.failed
		}
	}
	if err != nil {
		p.md.data.Release(nb)
	}
	return err
}

func (t *thinTarget) put(data mapper.Backend, off int64, n uint64, bufs [][]byte) error {
	if bufs == nil {
		return data.WriteZeroes(off, int64(n*mapper.SectorSize), false)
	}
	return data.WriteAt(bufs, off)
}

// copyChunk bounds the buffer used to copy a shared block.
const copyChunk = 1 << 20

// fill prepares new data block nb for virtual block vb, outside the
// sectors [in, in+n) about to be written: a copy of the shared block pb,
// the external origin, or zeros (unless skip_block_zeroing).
func (t *thinTarget) fill(data mapper.Backend, vb, pb uint64, shared bool, nb, in, n uint64, zero bool) error {
	bs := t.p.blockSize
	for _, r := range [2][2]uint64{{0, in}, {in + n, bs}} {
		for s := r[0]; s < r[1]; {
			k := min(r[1]-s, copyChunk/mapper.SectorSize)
			var err error
			switch {
			case shared:
				buf := make([]byte, k*mapper.SectorSize)
				if err = data.ReadAt([][]byte{buf}, t.dataOff(pb, s)); err == nil {
					err = data.WriteAt([][]byte{buf}, t.dataOff(nb, s))
				}
			case t.origin != nil && vb*bs+s < t.originSz:
				buf := make([]byte, k*mapper.SectorSize)
				if err = t.readOrigin(vb*bs+s, k, [][]byte{buf}); err == nil {
					err = data.WriteAt([][]byte{buf}, t.dataOff(nb, s))
				}
			case zero:
				err = data.WriteZeroes(t.dataOff(nb, s), int64(k*mapper.SectorSize), false)
			}
			if err != nil {
				return err
			}
			s += k
		}
	}
	return nil
}

func (t *thinTarget) discard(vb uint64) error {
	unlock := t.p.lockBlock(blockKey{t.id, vb})
	defer unlock()
	return t.discardLocked(vb)
}

// discardLocked unmaps vb; a data block nobody maps any more is
// discarded on the data device when the pool passes discards down.
func (t *thinTarget) discardLocked(vb uint64) error {
	p := t.p
	p.mu.Lock()
	if p.failed != nil {
		p.mu.Unlock()
		return p.failed
	}
	if p.readOnly() {
		// The kernel completes discards to a read-only pool without
		// unmapping anything (process_cell_success).
		p.mu.Unlock()
		return nil
	}
	if _, err := p.md.remove(t.id, t.dev, vb); err != nil {
		p.fail(err)
		p.mu.Unlock()
		return p.failed
	}
	pend, data := p.takePending(), p.data
	p.mu.Unlock()
	p.passdown(pend, data)
	return nil
}

// Status returns INFO "<mapped sectors> <highest mapped sector|->" or
// TABLE "<pool dev> <dev id>[ <external origin>]".
func (t *thinTarget) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusTable {
		s := t.poolDev.Name() + " " + strconv.FormatUint(t.id, 10)
		if t.origin != nil {
			s += " " + t.origin.Name()
		}
		return s
	}
	p := t.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failed != nil {
		return "Fail"
	}
	hi, ok, err := p.md.highest(t.dev)
	if err != nil {
		p.fail(err)
		return "Fail"
	}
	s := strconv.FormatUint(t.dev.mapped*p.blockSize, 10) + " "
	if !ok {
		return s + "-"
	}
	return s + strconv.FormatUint((hi+1)*p.blockSize-1, 10)
}

// Close closes the thin device in the pool.
func (t *thinTarget) Close() error {
	t.p.mu.Lock()
	t.dev.open--
	t.p.mu.Unlock()
	return t.p.release()
}

// Allocation reports unmapped blocks as holes, zero unless an external
// origin backs them; a run extends over blocks of the same state.
func (t *thinTarget) Allocation(sector, sectors uint64) (uint64, mapper.AllocState, error) {
	p := t.p
	bs := p.blockSize
	state := func(vb uint64) (mapper.AllocState, error) {
		p.mu.Lock()
		_, ok, _, err := t.lookup(vb)
		p.mu.Unlock()
		switch {
		case err != nil:
			return 0, err
		case ok:
			return 0, nil
		case t.origin != nil && vb*bs < t.originSz:
			return mapper.AllocHole, nil
		}
		return mapper.AllocHole | mapper.AllocZero, nil
	}
	first, err := state(sector / bs)
	if err != nil {
		return 0, 0, err
	}
	n := min(sectors, bs-sector%bs)
	// Bounded: at most 1024 blocks per answer keeps the pool lock free
	// for I/O between lookups and a reply small.
	for k := 0; n < sectors && k < 1024; k++ {
		st, err := state((sector + n) / bs)
		if err != nil || st != first {
			break
		}
		n = min(sectors, n+bs)
	}
	return n, first, nil
}
