package raid

import (
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// raid1 keeps every leg identical. I/O goes in units of raid1Unit sectors
// under the unit's lock so that recovery, which copies units, never
// overwrites a newer write.

// mirrorUnits calls fn for each raid1 unit piece of [sector, sector+n).
func (r *raid) mirrorUnits(sector, n uint64, data [][]byte, fn func(unit, sector, n uint64, bufs [][]byte) error) error {
	off := 0
	for n > 0 {
		k := min(n, raid1Unit-sector%raid1Unit)
		var bufs [][]byte
		if data != nil {
			bufs = mapper.SliceBufs(nil, data, off, int(k<<mapper.SectorShift))
		}
		if err := fn(sector/raid1Unit, sector, k, bufs); err != nil {
			return err
		}
		sector, n, off = sector+k, n-k, off+int(k<<mapper.SectorShift)
	}
	return nil
}

// mirrorRead reads from one in-sync leg, trying the next when one fails.
// Write-mostly legs are read only when no other leg can be.
func (r *raid) mirrorRead(sector, n uint64, data [][]byte) error {
	end := (sector + n + raid1Unit - 1) / raid1Unit * raid1Unit
	start := int(r.rr.Add(1))
	for pass := 0; pass < 2; pass++ {
		for j := range r.devs {
			i := (start + j) % len(r.devs)
			m := r.devs[i]
			if m.writeMostly != (pass == 1) || !r.readable(i, end) {
				continue
			}
			if r.behindLeg(i) {
				r.drainBehind(i)
			}
			err := m.dev.ReadAt(data, int64(sector<<mapper.SectorShift))
			if err == nil {
				return nil
			}
			r.fail(i, err)
		}
	}
	return mapper.Errorf(mapper.ErrIO, "read of %d sectors at %d: no leg can be read", n, sector)
}

// mirrorWrite writes to every leg in service.
func (r *raid) mirrorWrite(sector, n uint64, data [][]byte) error {
	return r.mirrorUnits(sector, n, data, func(unit, sector, n uint64, bufs [][]byte) error {
		l := r.lock(unit)
		l.Lock()
		defer l.Unlock()
		if r.bm != nil {
			if err := r.bm.startWrite(r, sector, sector+n); err != nil {
				return err
			}
			defer r.bm.endWrite(sector, sector+n)
		}
		r.eachLeg(func(i int, m *member) error {
			if r.behindLeg(i) {
				r.queueBehind(i, sector, n, bufs)
				return nil
			}
			return m.dev.WriteAt(bufs, int64(sector<<mapper.SectorShift))
		})
		if r.behind != nil && !r.primaryInService() {
			r.drainBehind(-1) // no other leg holds it: not behind
		}
		return r.survives()
	})
}

// mirrorDiscard discards on every leg in service.
func (r *raid) mirrorDiscard(sector, n uint64) error {
	return r.mirrorUnits(sector, n, nil, func(unit, sector, n uint64, _ [][]byte) error {
		l := r.lock(unit)
		l.Lock()
		defer l.Unlock()
		r.drainBehind(-1)
		r.eachLeg(func(i int, m *member) error {
			return m.dev.Discard(int64(sector<<mapper.SectorShift), int64(n<<mapper.SectorShift))
		})
		return r.survives()
	})
}

// eachLeg runs fn on every device in service in parallel; a device whose
// fn fails leaves service.
func (r *raid) eachLeg(fn func(i int, m *member) error) {
	var wg sync.WaitGroup
	for i, m := range r.devs {
		if m.faulty.Load() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(i, m); err != nil {
				r.fail(i, err)
			}
		}()
	}
	wg.Wait()
}
