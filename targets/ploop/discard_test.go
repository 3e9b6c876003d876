package ploop_test

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

func fileSize(t *testing.T, p string) int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// TestDiscardReusesClusters discards whole clusters of a one-image stack:
// they read zeros, the allocation count falls, new writes reuse them (the
// file does not grow), also after a reopen; parts of clusters are ignored
// as dm-ploop ignores them. qemu-img and ploop check accept the image and
// qemu-img reads the same content.
func TestDiscardReusesClusters(t *testing.T) {
	dir := t.TempDir()
	img := emptyFile(t, dir, "top.hds")
	const cs = 128 // 64 KiB clusters
	const sectors = 16 * cs
	table := fmt.Sprintf("0 %d ploop 7 %s", sectors, img)
	m := newManager(t)
	d := create(t, m, "d", table)
	model := pattern(1, sectors*512)
	submit(t, d, mapper.OpWrite, 0, model)
	submit(t, d, mapper.OpFlush, 0, nil)
	full := fileSize(t, img)
	if got := status(d, mapper.StatusInfo); got != "1 v2 128 o 16/16" {
		t.Fatalf("INFO after writing everything %q", got)
	}

	discard := func(sector, n uint64) {
		t.Helper()
		if err := d.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: sector, Sectors: n}); err != nil {
			t.Fatalf("discard %d+%d: %v", sector, n, err)
		}
	}
	// Clusters 3 and 4 whole, with parts of 2 and 5 around them: only the
	// whole ones go.
	discard(3*cs-5, 2*cs+10)
	clear(model[3*cs*512 : 5*cs*512])
	// Cluster 9 exactly; a part of cluster 12 alone.
	discard(9*cs, cs)
	clear(model[9*cs*512 : 10*cs*512])
	discard(12*cs+1, cs-2)
	if s := diff(readAll(t, d), model); s != "" {
		t.Fatalf("after discards: %s", s)
	}
	if got := status(d, mapper.StatusInfo); got != "1 v2 128 o 13/16" {
		t.Fatalf("INFO after discarding 3 clusters %q", got)
	}
	submit(t, d, mapper.OpFlush, 0, nil)

	// Rewriting two of them takes freed clusters, not new ones.
	w := pattern(2, 8*512)
	submit(t, d, mapper.OpWrite, 3*cs+8, w)
	copy(model[(3*cs+8)*512:], w)
	submit(t, d, mapper.OpWrite, 9*cs, w)
	copy(model[9*cs*512:], w)
	submit(t, d, mapper.OpFlush, 0, nil)
	if got := fileSize(t, img); got != full {
		t.Fatalf("file grew from %d to %d bytes: freed clusters not reused", full, got)
	}
	if s := diff(readAll(t, d), model); s != "" {
		t.Fatalf("after rewriting: %s", s)
	}
	if err := m.Remove("d", false); err != nil {
		t.Fatal(err)
	}
	// One cluster is still free, inside the file.
	qemuCheck(t, img)
	ploopCheck(t, img)
	if s := diff(qemuRaw(t, img), model); s != "" {
		t.Fatalf("qemu-img reads: %s", s)
	}

	// A reopened stack finds the free cluster and reuses it.
	d = create(t, m, "d", table)
	submit(t, d, mapper.OpWrite, 4*cs, w)
	copy(model[4*cs*512:], w)
	submit(t, d, mapper.OpFlush, 0, nil)
	if got := fileSize(t, img); got != full {
		t.Fatalf("after reopen the file grew from %d to %d bytes", full, got)
	}
	if err := m.Remove("d", false); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, img)
	ploopCheck(t, img)
	if s := diff(qemuRaw(t, img), model); s != "" {
		t.Fatalf("qemu-img reads after reopen: %s", s)
	}
}

// TestDiscardUnflushedCrash discards clusters and crashes before a flush:
// the discard was not made durable, so the reopened image holds the old
// data or zeros, never another cluster's data, and freed clusters are
// not reused before the cleared entries are on disk.
func TestDiscardUnflushedCrash(t *testing.T) {
	dir := t.TempDir()
	img := emptyFile(t, dir, "top.hds")
	const cs = 8
	table := fmt.Sprintf("0 %d ploop 3 %s", 64*cs, img)
	m := newManager(t)
	d := create(t, m, "d", table)
	old := pattern(3, 64*cs*512)
	submit(t, d, mapper.OpWrite, 0, old)
	submit(t, d, mapper.OpFlush, 0, nil)
	if err := d.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: 0, Sectors: 32 * cs}); err != nil {
		t.Fatal(err)
	}
	// Data written after the discard, not flushed: it may land in a
	// freed cluster only once the discard is durable; it is not.
	submit(t, d, mapper.OpWrite, 0, pattern(4, 4*cs*512))
	before := fileSize(t, img)
	// Crash: copy the file as it is on disk now, without a close.
	crashed := filepath.Join(dir, "crashed.hds")
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(crashed, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if before <= int64(64*cs*512) {
		t.Fatalf("file %d bytes: the unflushed write should have taken a new cluster", before)
	}
	m2 := newManager(t)
	d2 := create(t, m2, "c", fmt.Sprintf("0 %d ploop 3 %s", 64*cs, crashed))
	got := readAll(t, d2)
	for c := 0; c < 64; c++ {
		part := got[c*cs*512 : (c+1)*cs*512]
		want := old[c*cs*512 : (c+1)*cs*512]
		if string(part) != string(want) && strings.Trim(string(part), "\x00") != "" {
			t.Fatalf("cluster %d after the crash is neither the old data nor zeros", c)
		}
	}
}

// TestMergeUnderWrites merges a delta in the background while writers keep
// writing: writes complete during the merge (none waits for all of it),
// the merge ends with the delta dropped, and the merged image holds what
// was written, as qemu-img and ploop check judge it.
func TestMergeUnderWrites(t *testing.T) {
	dir := t.TempDir()
	base := emptyFile(t, dir, "base.hds")
	top := emptyFile(t, dir, "top.hds")
	const cs = 128 // 64 KiB clusters (ploop check takes no smaller)
	const sectors = 512 * cs
	events := make(chan mapper.Event, 16)
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler), Events: func(e mapper.Event) {
		if strings.HasPrefix(e.Kind, "merge") {
			events <- e
		}
	}})
	t.Cleanup(func() { m.Close() })
	d := create(t, m, "d", fmt.Sprintf("0 %d ploop 7 %s", sectors, base))
	model := pattern(5, sectors*512)
	submit(t, d, mapper.OpWrite, 0, model)
	message(t, d, "snapshot", top)

	var mu sync.Mutex // guards model against the writers
	var writes, during atomic.Int64
	var slowest atomic.Int64
	var merging atomic.Bool
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errc := make(chan error, 4)
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			for {
				select {
				case <-stop:
					return
				default:
				}
				s := rng.Uint64N(sectors - 16)
				n := 1 + rng.Uint64N(16)
				buf := pattern(rng.Uint64(), int(n*512))
				mu.Lock() // one write at a time per range keeps the model exact
				start := time.Now()
				inMerge := merging.Load()
				err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: n, Data: [][]byte{buf}})
				took := time.Since(start)
				if err == nil {
					copy(model[s*512:], buf)
				}
				mu.Unlock()
				if err != nil {
					errc <- err
					return
				}
				writes.Add(1)
				if inMerge && merging.Load() {
					during.Add(1)
					for {
						cur := slowest.Load()
						if int64(took) <= cur || slowest.CompareAndSwap(cur, int64(took)) {
							break
						}
					}
				}
			}
		}()
	}
	time.Sleep(20 * time.Millisecond)
	merging.Store(true)
	began := time.Now()
	message(t, d, "merge")
	// The copy phase ends when the top has every cluster; the flush and
	// the drop of the delta follow.
	copied := make(chan time.Duration, 1)
	go func() {
		for {
			f := strings.Fields(status(d, mapper.StatusInfo))
			if f[4] == "512/512" || !strings.Contains(f[3], "m") {
				copied <- time.Since(began)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	if got := strings.Fields(status(d, mapper.StatusInfo)); got[0] != "2" || !strings.Contains(got[3], "m") {
		t.Fatalf("INFO right after merge %v, want 2 deltas and flag m", got)
	}
	// Other stack changes wait for the merge.
	if _, err := d.Message(0, []string{"snapshot", emptyFile(t, dir, "x.hds")}); err == nil || !strings.Contains(err.Error(), "merge is running") {
		t.Fatalf("snapshot during a merge: %v", err)
	}
	var ev mapper.Event
	select {
	case ev = <-events:
	case <-time.After(2 * time.Minute):
		t.Fatalf("no merge event; INFO %q", status(d, mapper.StatusInfo))
	}
	took := time.Since(began)
	copyPhase := <-copied
	merging.Store(false)
	close(stop)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatalf("write during the merge: %v", err)
	}
	if ev.Kind != "merged" {
		t.Fatalf("event %s %v, want merged", ev.Kind, ev.Data)
	}
	t.Logf("merge of 512 clusters took %v (copying %v); %d writes during it (of %d), slowest %v",
		took.Round(time.Millisecond), copyPhase.Round(time.Millisecond), during.Load(), writes.Load(), time.Duration(slowest.Load()).Round(time.Microsecond))
	if during.Load() < 10 {
		t.Fatalf("only %d writes completed during a merge of %v: the merge holds guest I/O", during.Load(), took)
	}
	if slow := time.Duration(slowest.Load()); slow > copyPhase/2 {
		t.Fatalf("a write during the merge took %v of the %v the merge copied for: the merge holds guest I/O", slow, copyPhase)
	}
	if got := status(d, mapper.StatusInfo); !strings.HasPrefix(got, "1 v2 128 o ") {
		t.Fatalf("INFO after the merge %q", got)
	}
	if s := diff(readAll(t, d), model); s != "" {
		t.Fatalf("device after the merge: %s", s)
	}
	if err := m.Remove("d", false); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, top)
	ploopCheck(t, top)
	if s := diff(qemuRaw(t, top), model); s != "" {
		t.Fatalf("qemu-img reads the merged top: %s", s)
	}
}

// TestMergeSuspendResume suspends a device mid-merge: the merge stops
// copying (the top's allocation stays while suspended) and goes on after
// the resume, to the end.
func TestMergeSuspendResume(t *testing.T) {
	dir := t.TempDir()
	base := emptyFile(t, dir, "base.hds")
	top := emptyFile(t, dir, "top.hds")
	const cs = 128
	const sectors = 512 * cs
	m := newManager(t)
	d := create(t, m, "d", fmt.Sprintf("0 %d ploop 7 %s", sectors, base))
	model := pattern(6, sectors*512)
	submit(t, d, mapper.OpWrite, 0, model)
	message(t, d, "snapshot", top)
	message(t, d, "merge")
	if err := d.Suspend(false); err != nil {
		t.Fatal(err)
	}
	first := status(d, mapper.StatusInfo)
	time.Sleep(100 * time.Millisecond)
	if got := status(d, mapper.StatusInfo); got != first || !strings.HasPrefix(got, "2 v2 128 m ") {
		t.Fatalf("INFO while suspended mid-merge %q then %q: want the merge paused (2 deltas, flag m, allocation unchanged)", first, got)
	}
	if err := d.Resume(); err != nil {
		t.Fatal(err)
	}
	waitMerged(t, d, "2")
	if got := status(d, mapper.StatusInfo); got != "1 v2 128 o 512/512" {
		t.Fatalf("INFO after the merge %q", got)
	}
	if s := diff(readAll(t, d), model); s != "" {
		t.Fatalf("after the merge: %s", s)
	}
}
