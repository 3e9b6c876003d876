package agent

import (
	"sync"
	"testing"
)

// TestBufPoolReuse: a buffer given back to the pool is handed out again
// (the steady state allocates nothing), from any shard, also with writers
// and a sender at once; the pool keeps no more than its limit.
func TestBufPoolReuse(t *testing.T) {
	a := &Agent{}
	a.bufs.limit = 1 << 20
	b := a.getBuf(4096)
	a.putBufs([][]byte{b})
	if c := a.getBuf(4000); &b[:1][0] != &c[:1][0] || len(c) != 4000 {
		t.Fatalf("the pooled buffer was not reused (pool holds %d bytes)", a.bufs.bytes.Load())
	} else {
		a.putBufs([][]byte{c})
	}
	if allocs := testing.AllocsPerRun(100, func() { a.putBufs([][]byte{a.getBuf(4096)}) }); allocs != 0 {
		t.Errorf("%v allocations per get and put of a pooled size", allocs)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 1000 {
				x, y := a.getBuf(64<<10), a.getBuf(4096)
				a.putBufs([][]byte{x, y})
			}
		}()
	}
	wg.Wait()
	if n := a.bufs.bytes.Load(); n > a.bufs.limit || n <= 0 {
		t.Errorf("pool holds %d bytes, limit %d", n, a.bufs.limit)
	}
	var held int64
	for i := range a.bufs.shards {
		sh := &a.bufs.shards[i]
		for c, l := range sh.free {
			// A getter skips a shard whose count says it is empty.
			if n := sh.n[c].Load(); int(n) != len(l) {
				t.Errorf("shard %d holds %d buffers of class %d, its count says %d", i, len(l), c, n)
			}
			for _, x := range l {
				held += int64(cap(x))
			}
		}
	}
	if held != a.bufs.bytes.Load() {
		t.Errorf("shards hold %d bytes, the count says %d", held, a.bufs.bytes.Load())
	}
}
