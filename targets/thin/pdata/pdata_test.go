package pdata

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

// expectedCounts walks the metadata a space map's roots and the given
// trees reach and returns the reference count each block should have.
func expectedCounts(t *testing.T, tm *TM, data *SpaceMap, roots ...uint64) map[uint64]uint32 {
	t.Helper()
	want := map[uint64]uint32{0: 1} // the superblock
	tree := &Tree{TM: tm}
	seen := map[uint64]bool{}
	var walk func(b uint64, vsize int)
	walk = func(b uint64, vsize int) {
		want[b]++
		if seen[b] {
			return
		}
		seen[b] = true
		tree.VT.Size = vsize
		n, err := tree.read(b)
		if err != nil {
			t.Fatal(err)
		}
		if !n.leaf() {
			for i := 0; i < n.nr(); i++ {
				walk(n.child(i), vsize)
			}
		}
	}
	for _, sm := range []*SpaceMap{tm.SM, data} {
		if sm == nil {
			continue
		}
		for _, b := range sm.bitmaps {
			want[b]++
		}
		walk(sm.rcRoot, 4)
		if sm.meta {
			want[sm.indexRoot]++
		} else {
			walk(sm.indexRoot, indexEntrySize)
		}
	}
	for _, r := range roots {
		walk(r, 8)
	}
	return want
}

func checkCounts(t *testing.T, tm *TM, data *SpaceMap, roots ...uint64) {
	t.Helper()
	want := expectedCounts(t, tm, data, roots...)
	for b := uint64(0); b < tm.SM.NrBlocks(); b++ {
		if got := tm.SM.counts[b]; got != want[b] {
			t.Fatalf("metadata block %d: count %d, want %d", b, got, want[b])
		}
	}
}

func newTestTM(t *testing.T, blocks int) (*TM, *mappertest.Mem) {
	mem := mappertest.NewMem("meta", blocks*BlockSize)
	bm := NewBM(mem, uint64(blocks))
	sm := NewSpaceMap(uint64(blocks), true)
	if err := sm.Inc(0); err != nil {
		t.Fatal(err)
	}
	return NewTM(bm, sm), mem
}

// TestBtreeModel runs seeded random inserts and removes against a map,
// committing now and then, and checks lookups, order, node occupancy and
// reference counts; then it crashes after uncommitted changes and checks
// that the last commit is what a reload sees.
//
// It runs with the default block cache and with a cache of 4 clean blocks,
// where nearly every read evicts: eviction must never lose a change or
// return a stale block.
func TestBtreeModel(t *testing.T) {
	for _, cache := range []int{DefaultCacheBlocks, 4} {
		for seed := uint64(1); seed <= 3; seed++ {
			t.Run(fmt.Sprintf("cache%d/seed%d", cache, seed), func(t *testing.T) { btreeModel(t, seed, cache) })
		}
	}
}

// btreeModel is one run of TestBtreeModel.
func btreeModel(t *testing.T, seed uint64, cache int) {
	rng := rand.New(rand.NewPCG(seed, 7))
	tm, mem := newTestTM(t, 4096)
	tm.BM.SetCacheBlocks(cache)
	data := NewSpaceMap(100000, false)
	tree := &Tree{TM: tm, VT: ValueType{Size: 8,
		Inc: func(v []byte) error { return data.Inc(le.Uint64(v)) },
		Dec: func(v []byte) error { return data.Dec(le.Uint64(v)) }}}
	root, err := tree.Empty()
	if err != nil {
		t.Fatal(err)
	}
	model := map[uint64]uint64{}
	var committed map[uint64]uint64
	var cRoot uint64
	var cMeta, cData Root
	for step := 0; step < 12000; step++ {
		k := rng.Uint64N(3000)
		if rng.IntN(3) > 0 {
			v, err := data.Alloc()
			if err != nil {
				t.Fatal(err)
			}
			if root, err = tree.Insert(root, k, u64(v)); err != nil {
				t.Fatal(err)
			}
			data.Dec(v) // Alloc counted it; the tree holds the reference now
			data.Inc(v)
			model[k] = v
		} else {
			var ok bool
			if root, ok, err = tree.Remove(root, k); err != nil {
				t.Fatal(err)
			}
			if _, had := model[k]; had != ok {
				t.Fatalf("step %d: remove %d found %v, model %v", step, k, ok, had)
			}
			delete(model, k)
		}
		if step%1500 == 1499 {
			checkTree(t, tree, root, model)
			if cMeta, cData, err = tm.Commit(data); err != nil {
				t.Fatal(err)
			}
			checkCounts(t, tm, data, root)
			committed, cRoot = maps.Clone(model), root
		}
	}
	// Uncommitted changes, then a crash.
	for i := 0; i < 500; i++ {
		root, _, _ = tree.Remove(root, rng.Uint64N(3000))
	}
	tm.BM.WriteDirty()
	if clean, _, _ := tm.BM.CacheStats(); clean > cache {
		t.Fatalf("%d clean blocks cached, bound %d", clean, cache)
	}
	mem.Crash()
	bm := NewBM(mem, 4096)
	bm.SetCacheBlocks(cache)
	tm2 := NewTM(bm, nil)
	if tm2.SM, err = LoadSpaceMap(tm2, cMeta, true); err != nil {
		t.Fatal(err)
	}
	data2, err := LoadSpaceMap(tm2, cData, false)
	if err != nil {
		t.Fatal(err)
	}
	tree2 := &Tree{TM: tm2, VT: ValueType{Size: 8}}
	checkTree(t, tree2, cRoot, committed)
	checkCounts(t, tm2, data2, cRoot)
	refs := map[uint64]uint32{}
	for _, v := range committed {
		refs[v]++
	}
	for b := range data2.counts {
		if want := refs[uint64(b)]; data2.counts[b] != want {
			t.Fatalf("data block %d: count %d after reload, want %d", b, data2.counts[b], refs[uint64(b)])
		}
	}
}

// checkTree compares the tree with the model and checks the node rules
// thin_check enforces.
func checkTree(t *testing.T, tree *Tree, root uint64, model map[uint64]uint64) {
	t.Helper()
	var keys []uint64
	err := tree.Walk(root, func(k uint64, v []byte) error {
		if model[k] != le.Uint64(v) {
			return fmt.Errorf("key %d: value %d, model %d", k, le.Uint64(v), model[k])
		}
		keys = append(keys, k)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := slices.Sorted(maps.Keys(model)); !slices.Equal(keys, want) {
		t.Fatalf("tree has %d keys, model %d", len(keys), len(want))
	}
	err = tree.WalkNodes(root, func(b uint64, leaf bool, nr int) error {
		n, _ := tree.read(b)
		if b != root && nr < n.max()/3 {
			return fmt.Errorf("node %d: %d entries, fewer than a third of %d", b, nr, n.max())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range model {
		got, ok, err := tree.Lookup(root, k)
		if err != nil || !ok || le.Uint64(got) != v {
			t.Fatalf("lookup %d: %v %v %v, want %d", k, got, ok, err, v)
		}
	}
}

// TestSharedTrees shares a tree (as a snapshot does), changes both sides
// and deletes one, checking counts throughout.
func TestSharedTrees(t *testing.T) {
	tm, _ := newTestTM(t, 4096)
	data := NewSpaceMap(10000, false)
	tree := &Tree{TM: tm, VT: ValueType{Size: 8,
		Inc: func(v []byte) error { return data.Inc(le.Uint64(v)) },
		Dec: func(v []byte) error { return data.Dec(le.Uint64(v)) }}}
	a, _ := tree.Empty()
	for k := uint64(0); k < 2000; k++ {
		v, _ := data.Alloc()
		var err error
		if a, err = tree.Insert(a, k, u64(v)); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := tm.Commit(data); err != nil {
		t.Fatal(err)
	}
	b := a
	tm.Inc(b)
	var err error
	for k := uint64(0); k < 2000; k += 7 {
		v, _ := data.Alloc()
		if b, err = tree.Insert(b, k, u64(v)); err != nil {
			t.Fatal(err)
		}
	}
	for k := uint64(1); k < 2000; k += 3 {
		if a, _, err = tree.Remove(a, k); err != nil {
			t.Fatal(err)
		}
	}
	checkCounts(t, tm, data, a, b)
	if err := tree.Del(a); err != nil {
		t.Fatal(err)
	}
	checkCounts(t, tm, data, b)
	if got := data.NrAllocated(); got != 2000 {
		t.Fatalf("after deleting the first tree %d data blocks are used, want 2000 (the second's)", got)
	}
	if _, _, err := tm.Commit(data); err != nil {
		t.Fatal(err)
	}
	checkCounts(t, tm, data, b)
}

// TestSpaceMapRoundTrip writes counts of every size (ref-count tree
// included) and reads them back.
func TestSpaceMapRoundTrip(t *testing.T) {
	tm, mem := newTestTM(t, 1024)
	data := NewSpaceMap(40000, false) // three bitmaps
	rng := rand.New(rand.NewPCG(3, 3))
	for i := 0; i < 20000; i++ {
		b := rng.Uint64N(40000)
		for j := rng.IntN(6); j >= 0; j-- {
			data.Inc(b)
		}
	}
	for i := 0; i < 100; i++ {
		tm.Inc(tm.SM.cursor + 50 + uint64(i)%7) // some metadata counts of 3 and more
	}
	meta, droot, err := tm.Commit(data)
	if err != nil {
		t.Fatal(err)
	}
	if err := tm.BM.Flush(); err != nil {
		t.Fatal(err)
	}
	mem.Crash()
	tm2 := NewTM(NewBM(mem, 1024), nil)
	if tm2.SM, err = LoadSpaceMap(tm2, meta, true); err != nil {
		t.Fatal(err)
	}
	d2, err := LoadSpaceMap(tm2, droot, false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(d2.counts, data.counts) {
		t.Fatal("data counts differ after reload")
	}
	if !slices.Equal(tm2.SM.counts, tm.SM.counts) {
		t.Fatal("metadata counts differ after reload")
	}
	if d2.NrAllocated() != data.NrAllocated() {
		t.Fatalf("allocated %d, want %d", d2.NrAllocated(), data.NrAllocated())
	}
}
