package raid

import (
	"container/list"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/mapper"
)

// The stripe cache (raid4/5/6) keeps recently written stripe rows in
// memory so that small writes to the same stripe do read-modify-write
// without reading the members again, as md's raid456 stripe cache does in
// spirit. An entry is one row of md's STRIPE_SIZE (4 KiB, rowSectors)
// across every member of a stripe — what md calls a stripe_head — so the
// entry count means what the kernel's stripe_cache means and the memory
// is bounded by entries × members × 4 KiB (256 entries of a 5-member
// array: 5 MiB).
//
// Entries are write-through: a write puts the data and the new P/Q on the
// members and in the entry, so the cache never holds anything the members
// do not (a member out of service or recovering may have its row
// reconstructed in an entry: its logical contents). Each member's part of
// an entry has its own valid flag: read-modify-write fills only the rows
// it reads (old data, P, Q), reconstruct-write the data rows it reads.
//
// Coherence: an entry's contents are read and changed only under its
// stripe's lock. The cache's own mutex guards only the index and the LRU
// list, so an entry evicted or dropped while a writer holds it is simply
// orphaned: the writer finishes with it and nobody finds it again. The
// cache is dropped whole when a member fails (any I/O error), when a sync
// action (resync, recover, check, repair) starts and ends, and on suspend
// and resume; each sync step drops the entries of its stripe under the
// stripe lock, since it rewrites parity or rebuilt rows. Reads go to the
// members as before (healthy members hold what the cache holds).

// rowSectors is md's STRIPE_SECTORS: the height of a stripe cache entry.
const rowSectors = mismatchUnit

// defaultStripeCache is md's NR_STRIPES, dm-raid's stripe_cache default.
const defaultStripeCache = 256

// md's raid5_set_cache_size bounds: a size must be above 16 and at most
// 32768.
const (
	minStripeCache = 17
	maxStripeCache = 32768
)

// testCacheEntries, when positive, overrides the entry count of new
// arrays (tests force evictions with 1..4 entries, below md's minimum);
// testNoCache makes new arrays run without a stripe cache.
var (
	testCacheEntries int
	testNoCache      bool
)

// stripeCacheEntries returns the entry count dm-raid 1.15 sets up for a
// raid4/5/6 array (rs_set_raid456_stripe_cache): the stripe_cache given
// (-1: not given, 256), raised to chunk/2 if smaller; a size other than
// md's 256 must be within md's bounds (17..32768).
func stripeCacheEntries(given int64, chunk uint64) (int, error) {
	nr := int64(defaultStripeCache)
	if given >= 0 {
		nr = given
	}
	if m := int64(chunk / 2); nr < m {
		nr = m
	}
	if nr != defaultStripeCache && (nr < minStripeCache || nr > maxStripeCache) {
		if given >= 0 && nr != given {
			return 0, fmt.Errorf("stripe_cache %d: raised to %d for chunk size %d, outside %d..%d", given, nr, chunk, minStripeCache, maxStripeCache)
		}
		return 0, fmt.Errorf("stripe_cache %d: outside %d..%d", nr, minStripeCache, maxStripeCache)
	}
	return int(nr), nil
}

// cacheRow is one entry: row j of a stripe across the n members.
type cacheRow struct {
	key   uint64   // stripe*rowsPerChunk + row
	data  [][]byte // per member, rowSectors long; nil until filled
	valid []bool   // data[i] holds member i's current contents
}

// stripeCache is a bounded LRU of cacheRows.
type stripeCache struct {
	max, n int

	mu    sync.Mutex
	index map[uint64]*list.Element // of *cacheRow
	lru   list.List                // front: most recently used

	misses atomic.Uint64 // member rows read into entries (for tests)
}

func newStripeCache(entries, n int) *stripeCache {
	return &stripeCache{max: entries, n: n, index: map[uint64]*list.Element{}}
}

// get returns the entry of key, creating (and evicting the least recently
// used) as needed. The caller holds the entry's stripe lock.
func (c *stripeCache) get(key uint64) *cacheRow {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.index[key]; ok {
		c.lru.MoveToFront(e)
		return e.Value.(*cacheRow)
	}
	row := &cacheRow{key: key, data: make([][]byte, c.n), valid: make([]bool, c.n)}
	c.index[key] = c.lru.PushFront(row)
	for c.lru.Len() > c.max {
		old := c.lru.Back()
		c.lru.Remove(old)
		delete(c.index, old.Value.(*cacheRow).key)
	}
	return row
}

// peek returns the entry of key without creating it or touching the LRU
// order; nil if there is none.
func (c *stripeCache) peek(key uint64) *cacheRow {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.index[key]; ok {
		return e.Value.(*cacheRow)
	}
	return nil
}

// drop forgets the entries with keys in [from, to).
func (c *stripeCache) drop(from, to uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if to-from > uint64(c.lru.Len()) {
		for e := c.lru.Front(); e != nil; {
			next := e.Next()
			if k := e.Value.(*cacheRow).key; k >= from && k < to {
				c.lru.Remove(e)
				delete(c.index, k)
			}
			e = next
		}
		return
	}
	for k := from; k < to; k++ {
		if e, ok := c.index[k]; ok {
			c.lru.Remove(e)
			delete(c.index, k)
		}
	}
}

// clear forgets every entry.
func (c *stripeCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.index)
	c.lru.Init()
}

// len returns the number of entries held.
func (c *stripeCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

// invalidate drops the whole stripe cache, if there is one.
func (r *raid) invalidate() {
	if r.cache != nil {
		r.cache.clear()
	}
}

// invalidateStripe drops the entries of stripe s; its lock is held.
func (r *raid) invalidateStripe(s uint64) {
	if r.cache != nil {
		rpc := r.chunk / rowSectors
		r.cache.drop(s*rpc, (s+1)*rpc)
	}
}

// writeStripeCached writes segs of stripe s through the stripe cache, by
// read-modify-write or reconstruct-write, whichever reads fewer member
// rows that are not cached; the stripe lock is held. Work is done on whole
// 4 KiB rows: rows [lo, hi) rounded out to rowSectors.
func (r *raid) writeStripeCached(s uint64, m *stripeMap, segs []seg) error {
	g := r.geo
	n, rpc := g.n, r.chunk/rowSectors
	lo, hi := segs[0].lo, segs[0].hi
	for _, sg := range segs {
		lo, hi = min(lo, sg.lo), max(hi, sg.hi)
	}
	j0, j1 := lo/rowSectors, (hi+rowSectors-1)/rowSectors
	rows := make([]*cacheRow, j1-j0)
	for j := range rows {
		rows[j] = r.cache.get(s*rpc + j0 + uint64(j))
	}
	end := (s + 1) * r.chunk
	// touched[j][k]: data chunk k is written in row j; full: all of it.
	touched := make([][]bool, len(rows))
	full := make([][]bool, len(rows))
	for j := range rows {
		touched[j], full[j] = make([]bool, g.d), make([]bool, g.d)
		rlo, rhi := (j0+uint64(j))*rowSectors, (j0+uint64(j)+1)*rowSectors
		for _, sg := range segs {
			if sg.lo < rhi && sg.hi > rlo {
				touched[j][sg.k] = true
				full[j][sg.k] = full[j][sg.k] || (sg.lo <= rlo && sg.hi >= rhi)
			}
		}
	}
	// need[j][i]: member i's row j must be valid before the update.
	plan := func(rmw bool) (need [][]bool, cost int, ok bool) {
		need, ok = make([][]bool, len(rows)), true
		for j, row := range rows {
			need[j] = make([]bool, n)
			for k, dev := range m.data {
				need[j][dev] = (rmw && touched[j][k]) || (!rmw && !full[j][k])
			}
			if rmw {
				need[j][m.pd] = true
				if m.qd >= 0 {
					need[j][m.qd] = true
				}
			}
			for i := range n {
				if need[j][i] && !row.valid[i] {
					cost++
					ok = ok && r.readable(i, end)
				}
			}
		}
		return need, cost, ok
	}
	needR, costR, okR := plan(true)
	needC, costC, okC := plan(false)
	rmw := okR && (costR < costC || !okC)
	need := needC
	if rmw {
		need = needR
	}
	if !r.fillRowsAhead(s, j0, j1, rows, need) {
		// A member is out of service or failed: fill every row of
		// every member, reconstructing the missing ones.
		rmw = false
		for j := range need {
			for i := range need[j] {
				need[j][i] = true
			}
		}
		if !r.fillRowsAhead(s, j0, j1, rows, need) {
			if err := r.reconstructRows(s, m, rows); err != nil {
				return err
			}
		}
	}
	// Update the entries: new data in, then P/Q.
	const rb = rowSectors << mapper.SectorShift
	var old []byte
	if rmw {
		old = make([]byte, rb)
	}
	for _, sg := range segs {
		dev := m.data[sg.k]
		bufs := slices.Clone(sg.bufs)
		for sec := sg.lo; sec < sg.hi; {
			j := sec/rowSectors - j0
			row := rows[j]
			if row.data[dev] == nil {
				row.data[dev] = make([]byte, rb)
			}
			e := min(sg.hi, (sec/rowSectors+1)*rowSectors)
			at, nb := (sec%rowSectors)<<mapper.SectorShift, int((e-sec)<<mapper.SectorShift)
			dst := row.data[dev][at : at+uint64(nb)]
			if rmw {
				delta := old[:nb]
				copy(delta, dst)
				copyFromBufs(dst, &bufs)
				xorInto(delta, dst)
				xorInto(row.data[m.pd][at:at+uint64(nb)], delta)
				if m.qd >= 0 {
					mulXorInto(row.data[m.qd][at:at+uint64(nb)], delta, m.coef[sg.k])
				}
			} else {
				copyFromBufs(dst, &bufs)
			}
			sec = e
		}
	}
	for j, row := range rows {
		for k, dev := range m.data {
			if full[j][k] {
				row.valid[dev] = true
			}
		}
		if !rmw {
			for _, p := range []int{m.pd, m.qd} {
				if p >= 0 && row.data[p] == nil {
					row.data[p] = make([]byte, rb)
				}
			}
			g.parity(m, row.data)
			row.valid[m.pd] = true
			if m.qd >= 0 {
				row.valid[m.qd] = true
			}
		}
	}
	// Data goes out from the request's buffers, P/Q from the entries.
	var mw memberWrites
	for _, sg := range segs {
		mw.write(r, m.data[sg.k], sg.bufs, r.devOffset(s, sg.lo))
	}
	for _, p := range []int{m.pd, m.qd} {
		if p < 0 {
			continue
		}
		bufs := make([][]byte, len(rows))
		for j, row := range rows {
			bufs[j] = row.data[p]
		}
		mw.write(r, p, bufs, r.devOffset(s, j0*rowSectors))
	}
	mw.wait()
	return r.survives()
}

// copyFromBufs fills dst from the front of *bufs and advances *bufs.
func copyFromBufs(dst []byte, bufs *[][]byte) {
	for len(dst) > 0 {
		b := (*bufs)[0]
		c := copy(dst, b)
		dst = dst[c:]
		if c == len(b) {
			*bufs = (*bufs)[1:]
		} else {
			(*bufs)[0] = b[c:]
		}
	}
}

// fillRowsAhead is fillRows for the rows [j0, j1) of stripe s, plus, for
// sequential writes, the rest of the chunk: when the row before j0 is
// cached with the members this write reads, those members are read to the
// end of the chunk at once, so that the next writes in the stripe read
// nothing.
func (r *raid) fillRowsAhead(s, j0, j1 uint64, rows []*cacheRow, need [][]bool) bool {
	rpc := r.chunk / rowSectors
	fill, fillNeed := rows, need
	if j0 > 0 && j1 < rpc {
		if prev := r.cache.peek(s*rpc + j0 - 1); prev != nil {
			last := need[len(need)-1]
			seq := true
			for i, x := range last {
				seq = seq && (!x || prev.valid[i])
			}
			for j := j1; seq && j < rpc; j++ {
				fill = append(fill, r.cache.get(s*rpc+j))
				fillNeed = append(fillNeed, last)
			}
		}
	}
	return r.fillRows(s, j0, fill, fillNeed)
}

// fillRows reads into the entries rows (rows j0.. of stripe s) the member
// rows need asks for that are not valid, one read per member over the
// span of its missing rows. It reports false if a needed member is out of
// service or a read failed (the member then leaves service); rows read
// are valid either way.
func (r *raid) fillRows(s, j0 uint64, rows []*cacheRow, need [][]bool) bool {
	n := r.geo.n
	end := (s + 1) * r.chunk
	const rb = rowSectors << mapper.SectorShift
	var wg sync.WaitGroup
	var bad atomic.Bool
	for i := range n {
		first, last := -1, -1
		for j, row := range rows {
			if need[j][i] && !row.valid[i] {
				if first < 0 {
					first = j
				}
				last = j
			}
		}
		if first < 0 {
			continue
		}
		if !r.readable(i, end) {
			bad.Store(true)
			continue
		}
		// Valid rows inside the span are read into scratch: the cache
		// and the member agree on them, but the entry is left alone.
		bufs := make([][]byte, 0, last-first+1)
		for j := first; j <= last; j++ {
			row := rows[j]
			if row.valid[i] {
				bufs = append(bufs, make([]byte, rb))
				continue
			}
			if row.data[i] == nil {
				row.data[i] = make([]byte, rb)
			}
			bufs = append(bufs, row.data[i])
		}
		r.cache.misses.Add(uint64(last - first + 1))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.devs[i].dev.ReadAt(bufs, r.devOffset(s, (j0+uint64(first))*rowSectors)); err != nil {
				r.fail(i, err)
				bad.Store(true)
				return
			}
			for j := first; j <= last; j++ {
				rows[j].valid[i] = true
			}
		}()
	}
	wg.Wait()
	return !bad.Load()
}

// reconstructRows fills, in every entry of rows, the members that are not
// valid from the others (all readable members are valid).
func (r *raid) reconstructRows(s uint64, m *stripeMap, rows []*cacheRow) error {
	const rb = rowSectors << mapper.SectorShift
	for _, row := range rows {
		var missing []int
		for i := range row.data {
			if !row.valid[i] {
				if row.data[i] == nil {
					row.data[i] = make([]byte, rb)
				}
				missing = append(missing, i)
			}
		}
		if err := r.geo.reconstruct(m, row.data, missing); err != nil {
			return mapper.Errorf(mapper.ErrIO, "stripe %d: %v", s, err)
		}
		for _, i := range missing {
			row.valid[i] = true
		}
	}
	return nil
}
