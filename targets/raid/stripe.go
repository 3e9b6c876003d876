package raid

import (
	"fmt"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// seg is the part of one data chunk of a stripe that a request covers:
// chunk-relative sectors [lo, hi) of data chunk k, and its data.
type seg struct {
	k      int
	lo, hi uint64
	bufs   [][]byte
}

// stripes runs a read or write over raid4/5/6, stripe by stripe.
func (r *raid) stripes(sector, n uint64, data [][]byte, write bool) error {
	g := r.geo
	d := uint64(g.d)
	off := 0
	var segs []seg
	for n > 0 {
		s := sector / r.chunk / d
		segs = segs[:0]
		for n > 0 && sector/r.chunk/d == s {
			in := sector % r.chunk
			k := min(n, r.chunk-in)
			bytes := int(k << mapper.SectorShift)
			segs = append(segs, seg{k: int(sector / r.chunk % d), lo: in, hi: in + k,
				bufs: mapper.SliceBufs(nil, data, off, bytes)})
			sector, n, off = sector+k, n-k, off+bytes
		}
		var err error
		if write {
			err = r.writeStripe(s, segs)
		} else {
			err = r.readStripe(s, segs)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// devOffset returns the byte offset on a device of chunk-relative sector
// in of stripe s.
func (r *raid) devOffset(s, in uint64) int64 {
	return int64((s*r.chunk + in) << mapper.SectorShift)
}

// readStripe reads segs of stripe s: straight from their devices, or by
// reconstruction when a device is out of service or fails.
func (r *raid) readStripe(s uint64, segs []seg) error {
	m := r.geo.stripe(s)
	end := (s + 1) * r.chunk
	for _, sg := range segs {
		dev := m.data[sg.k]
		if r.readable(dev, end) {
			err := r.devs[dev].dev.ReadAt(sg.bufs, r.devOffset(s, sg.lo))
			if err == nil {
				continue
			}
			r.fail(dev, err)
		}
		l := r.lock(s)
		l.Lock()
		need := make([]bool, r.geo.n)
		need[dev] = true
		rows, err := r.loadRows(s, m, sg.lo, sg.hi, need)
		l.Unlock()
		if err != nil {
			return err
		}
		scatter(sg.bufs, rows[dev])
	}
	return nil
}

// loadRows returns chunk-relative rows [lo, hi) of stripe s for the
// devices in need (other entries may be nil). Devices out of service or
// failing are reconstructed from the others. The stripe lock is held.
func (r *raid) loadRows(s uint64, m *stripeMap, lo, hi uint64, need []bool) ([][]byte, error) {
	n := r.geo.n
	size := int((hi - lo) << mapper.SectorShift)
	end := (s + 1) * r.chunk
	rows := make([][]byte, n)
	bad := make([]bool, n)
	var mu sync.Mutex
	read := func(which []bool) bool { // reads in parallel; reports a missing one
		var wg sync.WaitGroup
		for i := range n {
			if !which[i] || rows[i] != nil || bad[i] {
				continue
			}
			if !r.readable(i, end) {
				bad[i] = true
				continue
			}
			rows[i] = make([]byte, size)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := r.devs[i].dev.ReadAt([][]byte{rows[i]}, r.devOffset(s, lo)); err != nil {
					r.fail(i, err)
					mu.Lock()
					bad[i] = true
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		for i := range n {
			if which[i] && bad[i] {
				return true
			}
		}
		return false
	}
	if !read(need) {
		return rows, nil
	}
	all := make([]bool, n)
	for i := range all {
		all[i] = true
	}
	read(all)
	var missing []int
	for i := range n {
		if bad[i] {
			rows[i] = make([]byte, size)
			missing = append(missing, i)
		}
	}
	if err := r.geo.reconstruct(m, rows, missing); err != nil {
		return nil, mapper.Errorf(mapper.ErrIO, "stripe %d: %v", s, err)
	}
	return rows, nil
}

// writeStripe writes segs of stripe s with their parity, by
// read-modify-write or reconstruct-write, whichever reads less.
func (r *raid) writeStripe(s uint64, segs []seg) error {
	g := r.geo
	m := g.stripe(s)
	l := r.lock(s)
	l.Lock()
	defer l.Unlock()
	if r.bm != nil {
		if err := r.bm.startWrite(r, s*r.chunk, (s+1)*r.chunk); err != nil {
			return err
		}
		defer r.bm.endWrite(s*r.chunk, (s+1)*r.chunk)
	}
	if r.cache != nil {
		return r.writeStripeCached(s, m, segs)
	}
	lo, hi := segs[0].lo, segs[0].hi
	for _, sg := range segs {
		lo, hi = min(lo, sg.lo), max(hi, sg.hi)
	}
	end := (s + 1) * r.chunk
	width := hi - lo
	rmw := r.readable(m.pd, end) && (m.qd < 0 || r.readable(m.qd, end))
	var rmwCost, rcwCost uint64
	covered := make([]bool, g.d)
	for _, sg := range segs {
		rmw = rmw && r.readable(m.data[sg.k], end)
		rmwCost += sg.hi - sg.lo
		covered[sg.k] = sg.lo == lo && sg.hi == hi
	}
	rmwCost += width * uint64(r.typ.parity())
	for k := range g.d {
		if !covered[k] {
			rcwCost += width
		}
	}
	var rows [][]byte
	if rmw && rmwCost < rcwCost {
		rows = r.readModify(s, m, lo, hi, segs)
	}
	if rows == nil {
		need := make([]bool, g.n)
		for k, dev := range m.data {
			need[dev] = !covered[k]
		}
		var err error
		if rows, err = r.loadRows(s, m, lo, hi, need); err != nil {
			return err
		}
		size := int(width << mapper.SectorShift)
		for _, sg := range segs {
			dev := m.data[sg.k]
			if rows[dev] == nil {
				rows[dev] = make([]byte, size)
			}
			gather(rows[dev][(sg.lo-lo)<<mapper.SectorShift:], sg.bufs)
		}
		rows[m.pd] = make([]byte, size)
		if m.qd >= 0 {
			rows[m.qd] = make([]byte, size)
		}
		g.parity(m, rows)
	}
	// Data goes out from the request's buffers, parity from rows.
	var mw memberWrites
	for _, sg := range segs {
		mw.write(r, m.data[sg.k], sg.bufs, r.devOffset(s, sg.lo))
	}
	mw.write(r, m.pd, [][]byte{rows[m.pd]}, r.devOffset(s, lo))
	if m.qd >= 0 {
		mw.write(r, m.qd, [][]byte{rows[m.qd]}, r.devOffset(s, lo))
	}
	mw.wait()
	return r.survives()
}

// memberWrites writes to members in parallel, skipping those out of
// service; a failed write takes its member out of service (raid.fail).
type memberWrites struct{ wg sync.WaitGroup }

// write starts writing bufs at off of member dev.
func (w *memberWrites) write(r *raid, dev int, bufs [][]byte, off int64) {
	if r.devs[dev].faulty.Load() {
		return
	}
	w.wg.Go(func() {
		if err := r.devs[dev].dev.WriteAt(bufs, off); err != nil {
			r.fail(dev, err)
		}
	})
}

// wait waits for every write started.
func (w *memberWrites) wait() { w.wg.Wait() }

// readModify computes new parity rows [lo, hi) of stripe s from the old
// parity and the old and new data of segs. It returns nil if a read
// failed (the device is then out of service and the caller reconstructs).
func (r *raid) readModify(s uint64, m *stripeMap, lo, hi uint64, segs []seg) [][]byte {
	size := int((hi - lo) << mapper.SectorShift)
	rows := make([][]byte, r.geo.n)
	old := make([][]byte, len(segs))
	var wg sync.WaitGroup
	var failed bool
	var mu sync.Mutex
	rd := func(dev int, buf []byte, off int64) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.devs[dev].dev.ReadAt([][]byte{buf}, off); err != nil {
				r.fail(dev, err)
				mu.Lock()
				failed = true
				mu.Unlock()
			}
		}()
	}
	rows[m.pd] = make([]byte, size)
	rd(m.pd, rows[m.pd], r.devOffset(s, lo))
	if m.qd >= 0 {
		rows[m.qd] = make([]byte, size)
		rd(m.qd, rows[m.qd], r.devOffset(s, lo))
	}
	for i, sg := range segs {
		old[i] = make([]byte, (sg.hi-sg.lo)<<mapper.SectorShift)
		rd(m.data[sg.k], old[i], r.devOffset(s, sg.lo))
	}
	wg.Wait()
	if failed {
		return nil
	}
	for i, sg := range segs {
		delta := old[i]
		for _, b := range sg.bufs { // delta = old ^ new
			xorInto(delta[:len(b)], b)
			delta = delta[len(b):]
		}
		at := (sg.lo - lo) << mapper.SectorShift
		xorInto(rows[m.pd][at:at+uint64(len(old[i]))], old[i])
		if m.qd >= 0 {
			mulXorInto(rows[m.qd][at:at+uint64(len(old[i]))], old[i], m.coef[sg.k])
		}
	}
	return rows
}

// parity computes P (and Q) of rows from its data rows.
func (g *geometry) parity(m *stripeMap, rows [][]byte) {
	p := rows[m.pd]
	clear(p)
	for _, dev := range m.data {
		xorInto(p, rows[dev])
	}
	if m.qd >= 0 {
		q := rows[m.qd]
		clear(q)
		for k, dev := range m.data {
			mulXorInto(q, rows[dev], m.coef[k])
		}
	}
}

// reconstruct fills rows of the missing devices from the others.
func (g *geometry) reconstruct(m *stripeMap, rows [][]byte, missing []int) error {
	isMissing := make([]bool, g.n)
	for _, i := range missing {
		isMissing[i] = true
	}
	var lost []int // data chunk indexes
	for k, dev := range m.data {
		if isMissing[dev] {
			lost = append(lost, k)
		}
	}
	pLost := isMissing[m.pd]
	qLost := m.qd >= 0 && isMissing[m.qd]
	haveQ := m.qd >= 0 && !qLost
	switch {
	case len(lost) == 0:
	case len(lost) == 1 && !pLost:
		x := rows[m.data[lost[0]]]
		copy(x, rows[m.pd])
		for k, dev := range m.data {
			if k != lost[0] {
				xorInto(x, rows[dev])
			}
		}
	case len(lost) == 1 && haveQ:
		// Q ^ Σ others = c·D.
		x := rows[m.data[lost[0]]]
		copy(x, rows[m.qd])
		for k, dev := range m.data {
			if k != lost[0] {
				mulXorInto(x, rows[dev], m.coef[k])
			}
		}
		mulInPlace(x, gfInv(m.coef[lost[0]]))
	case len(lost) == 2 && !pLost && haveQ:
		// Pxy = Dx ^ Dy; Qxy = cx·Dx ^ cy·Dy; so Dx = (Qxy ^ cy·Pxy)/(cx ^ cy).
		a, b := lost[0], lost[1]
		dx, dy := rows[m.data[a]], rows[m.data[b]]
		copy(dy, rows[m.pd])
		copy(dx, rows[m.qd])
		for k, dev := range m.data {
			if k != a && k != b {
				xorInto(dy, rows[dev])
				mulXorInto(dx, rows[dev], m.coef[k])
			}
		}
		mulXorInto(dx, dy, m.coef[b])
		mulInPlace(dx, gfInv(m.coef[a]^m.coef[b]))
		xorInto(dy, dx)
	default:
		return fmt.Errorf("%w: %d data and %d parity chunks lost", errTooManyFailed, len(lost), btoi(pLost)+btoi(qLost))
	}
	if pLost || qLost {
		p, q := rows[m.pd], []byte(nil)
		if m.qd >= 0 {
			q = rows[m.qd]
		}
		keepP, keepQ := append([]byte(nil), p...), append([]byte(nil), q...)
		g.parity(m, rows)
		if !pLost {
			copy(p, keepP)
		}
		if !qLost && q != nil {
			copy(q, keepQ)
		}
	}
	return nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// gather copies bufs into dst.
func gather(dst []byte, bufs [][]byte) {
	for _, b := range bufs {
		dst = dst[copy(dst, b):]
	}
}

// scatter copies src into bufs.
func scatter(bufs [][]byte, src []byte) {
	for _, b := range bufs {
		src = src[copy(b, src):]
	}
}
