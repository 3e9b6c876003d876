package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// writer is a guest-like writer over a journal and a model.
type writer struct {
	t   *testing.T
	j   *Journal
	m   model
	seq uint64
	rng *rand.Rand
}

func newWriter(t *testing.T, j *Journal, vols map[string]int64) *writer {
	w := &writer{t: t, j: j, m: model{}, rng: rand.New(rand.NewPCG(1, 2))}
	for _, v := range sortedVolumes(vols) {
		w.append(Record{Kind: KindVolume, Volume: v.Name, Size: v.Size})
	}
	return w
}

// append journals recs with the next sequence numbers and applies them to
// the model.
func (w *writer) append(recs ...Record) Point {
	w.t.Helper()
	for i := range recs {
		w.seq++
		recs[i].Seq, recs[i].HasSeq = w.seq, true
	}
	p, err := w.j.Append(context.Background(), recs...)
	if err != nil {
		w.t.Fatalf("append: %v", err)
	}
	for i := range recs {
		w.m.apply(&recs[i])
	}
	return p
}

// writes appends n random writes (512 B to 16 KiB) over the model's volumes.
func (w *writer) writes(n int) Point {
	var p Point
	for range n {
		vs := sortedVolumes(sizes(w.m))
		v := vs[w.rng.IntN(len(vs))]
		l := int64(1+w.rng.IntN(32)) * 512
		off := int64(w.rng.IntN(int((v.Size-l)/512)+1)) * 512
		data := make([]byte, l)
		for i := range data {
			data[i] = byte(w.rng.Uint32())
		}
		p = w.append(Record{Kind: KindWrite, Volume: v.Name, Offset: off, Data: data})
	}
	return p
}

func sizes(m model) map[string]int64 {
	s := map[string]int64{}
	for k, v := range m {
		s[k] = int64(len(v))
	}
	return s
}

func mustOpen(t *testing.T, dir string, o Options) *Journal {
	t.Helper()
	j, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

func materialize(t *testing.T, j *Journal, sel Selector) Recovered {
	t.Helper()
	rv, err := j.Materialize(context.Background(), sel, filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatalf("materialize %s: %v", sel, err)
	}
	return rv
}

// TestPointInTime: a writer on 2 volumes with checkpoints and timestamps;
// recovery by checkpoint name, by time and by sequence number each equals
// the model at that point, and never changes the journal or base images.
func TestPointInTime(t *testing.T) {
	dir := t.TempDir()
	j := mustOpen(t, dir, Options{Retain: time.Hour, SegmentBytes: 32 << 10})
	w := newWriter(t, j, map[string]int64{"system": 512 << 10, "data": 256 << 10})
	w.writes(40)
	w.append(Record{Kind: KindCheckpoint, Checkpoint: "before-upgrade"})
	atCheckpoint := w.m.clone()

	w.writes(30)
	w.append(Record{Kind: KindZero, Volume: "data", Offset: 4096, Length: 64 << 10})
	time.Sleep(2 * time.Millisecond)
	at := time.Now()
	atTime := w.m.clone()
	time.Sleep(2 * time.Millisecond)

	w.writes(30)
	w.append(Record{Kind: KindDiscard, Volume: "system", Offset: 0, Length: 128 << 10})
	p := w.writes(5)
	atSeq, seq := w.m.clone(), p.Seq

	// Later writes, a resize and a resync set still open: not recoverable.
	w.writes(20)
	w.append(Record{Kind: KindVolume, Volume: "data", Size: 384 << 10})
	newest := w.m.clone()
	w.append(Record{Kind: KindResyncBegin})
	w.writes(10)

	sums := treeSums(t, dir)
	rv := materialize(t, j, AtCheckpoint("before-upgrade"))
	checkRecovered(t, "by checkpoint", rv, atCheckpoint)
	rv = materialize(t, j, AtTime(at))
	checkRecovered(t, "by time", rv, atTime)
	if rv.Point.Time.After(at) {
		t.Fatalf("by time: point at %v is after %v", rv.Point.Time, at)
	}
	rv = materialize(t, j, AtSeq(seq))
	checkRecovered(t, "by seq", rv, atSeq)
	if rv.Point.Seq != seq {
		t.Fatalf("by seq: point has seq %d, want %d", rv.Point.Seq, seq)
	}
	rv = materialize(t, j, Newest())
	checkRecovered(t, "newest", rv, newest)
	sameSums(t, "materialize", sums, treeSums(t, dir))

	// Selectors outside what the journal holds.
	ctx := context.Background()
	if _, err := j.Resolve(ctx, AtCheckpoint("nope")); !errors.Is(err, ErrUnknownCheckpoint) {
		t.Fatalf("unknown checkpoint: %v", err)
	}
	if _, err := j.Resolve(ctx, AtSeq(w.seq)); !errors.Is(err, ErrNoPoint) {
		t.Fatalf("seq inside the open resync set: %v", err)
	}
	if _, err := j.Resolve(ctx, AtPos(j.Newest().Pos-1)); !errors.Is(err, ErrNoPoint) {
		t.Fatalf("a position inside a record: %v", err)
	}
	// Materializing into a directory that already holds the images refuses.
	out := filepath.Join(t.TempDir(), "twice")
	if _, err := j.Materialize(ctx, Newest(), out); err != nil {
		t.Fatal(err)
	}
	if _, err := j.Materialize(ctx, Newest(), out); !errors.Is(err, os.ErrExist) {
		t.Fatalf("materialize over existing images: %v", err)
	}
}

// TestRetention: records older than Retain are applied to the base images up
// to a consistent point (never into an open resync set), their segments are
// deleted, and points before the window are refused with ErrBeforeWindow.
func TestRetention(t *testing.T) {
	dir := t.TempDir()
	const retain = 300 * time.Millisecond
	j := mustOpen(t, dir, Options{Retain: retain, SegmentBytes: 16 << 10, NoApplier: true})
	w := newWriter(t, j, map[string]int64{"a": 256 << 10, "b": 128 << 10})
	w.writes(30)
	w.append(Record{Kind: KindCheckpoint, Checkpoint: "old"})
	old := w.writes(30)
	oldModel := w.m.clone()
	w.append(Record{Kind: KindResyncBegin})
	w.writes(10)
	segsBefore := j.Stats().Segments
	time.Sleep(retain + 50*time.Millisecond)
	w.writes(10) // young

	if err := j.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	st := j.Stats()
	if st.Applied != old || st.Oldest != old {
		t.Fatalf("applied %+v, want the last point before the open resync set %+v", st.Applied, old)
	}
	checkBase(t, dir, oldModel)
	if st.Segments >= segsBefore {
		t.Fatalf("%d segments after apply, %d before: none deleted", st.Segments, segsBefore)
	}
	segs, _ := listSegments(filepath.Join(dir, segDirName))
	if len(segs) != st.Segments || (len(segs) > 1 && segs[1].start <= old.Pos) {
		t.Fatalf("segments %+v remain behind applied position %d", segs, old.Pos)
	}

	ctx := context.Background()
	for _, sel := range []Selector{AtSeq(old.Seq - 1), AtTime(old.Time.Add(-time.Millisecond)), AtCheckpoint("old"), AtPos(old.Pos - 1)} {
		_, err := j.Materialize(ctx, sel, filepath.Join(t.TempDir(), "x"))
		if !errors.Is(err, ErrBeforeWindow) {
			t.Fatalf("materialize %s before the window: %v, want ErrBeforeWindow", sel, err)
		}
		t.Log(err)
	}
	checkRecovered(t, "oldest", materialize(t, j, AtSeq(old.Seq)), oldModel)

	// Closing the set makes everything old enough appliable.
	w.append(Record{Kind: KindResyncEnd})
	all := w.m.clone()
	time.Sleep(retain + 50*time.Millisecond)
	if err := j.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	st = j.Stats()
	if st.Applied != st.Newest || st.Bytes != 0 || st.Segments != 1 {
		t.Fatalf("after the window passed: applied %+v newest %+v bytes %d segments %d", st.Applied, st.Newest, st.Bytes, st.Segments)
	}
	checkBase(t, dir, all)
	checkRecovered(t, "newest after apply", materialize(t, j, Newest()), all)

	// The applied position survives a reopen.
	j.Close()
	j = mustOpen(t, dir, Options{Retain: retain, NoApplier: true})
	if got := j.Oldest(); got.Pos != st.Applied.Pos || got.Seq != st.Applied.Seq {
		t.Fatalf("after reopen oldest %+v, want %+v", got, st.Applied)
	}
	if _, err := j.Resolve(ctx, AtCheckpoint("old")); !errors.Is(err, ErrBeforeWindow) {
		t.Fatalf("expired checkpoint after reopen: %v", err)
	}
	w.j = j
	w.writes(5)
	checkRecovered(t, "newest after reopen", materialize(t, j, Newest()), w.m)
}

// TestMaxBytes: the size cap applies young records too, and the background
// applier with Retain 0 applies promptly.
func TestMaxBytes(t *testing.T) {
	j := mustOpen(t, t.TempDir(), Options{Retain: time.Hour, MaxBytes: 64 << 10, SegmentBytes: 16 << 10, NoApplier: true})
	w := newWriter(t, j, map[string]int64{"a": 1 << 20})
	w.writes(100)
	if err := j.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.Bytes > 64<<10 || st.Applied.Pos == 0 {
		t.Fatalf("after apply %d bytes in the journal (cap 64 KiB), applied %+v", st.Bytes, st.Applied)
	}
	checkRecovered(t, "newest", materialize(t, j, Newest()), w.m)

	// One ApplyNow applies everything in passes of bounded size.
	dir := t.TempDir()
	j = mustOpen(t, dir, Options{NoApplier: true, passBytes: 64 << 10})
	w = newWriter(t, j, map[string]int64{"a": 1 << 20})
	w.writes(100)
	if err := j.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.Applied != st.Newest || st.ApplyPasses < 5 {
		t.Fatalf("after ApplyNow with 64 KiB passes: applied %+v, newest %+v, %d passes", st.Applied, st.Newest, st.ApplyPasses)
	}
	checkBase(t, dir, w.m)

	dir = t.TempDir()
	j = mustOpen(t, dir, Options{ApplyInterval: 5 * time.Millisecond})
	w = newWriter(t, j, map[string]int64{"a": 1 << 20})
	w.writes(50)
	deadline := time.Now().Add(10 * time.Second)
	for j.Stats().Applied != j.Newest() {
		if time.Now().After(deadline) {
			t.Fatalf("Retain 0: not applied within 10s: %+v", j.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	checkBase(t, dir, w.m)
}

// checkBase compares the base images with the model, and checks that they
// are preallocated.
func checkBase(t *testing.T, dir string, m model) {
	t.Helper()
	got := Recovered{}
	for _, v := range sortedVolumes(sizes(m)) {
		p := filepath.Join(dir, v.Name+imageSuffix)
		got.Volumes = append(got.Volumes, RecoveredVolume{Name: v.Name, Size: v.Size, Path: p})
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		if st.Blocks*512 < v.Size {
			t.Fatalf("base image %s: %d bytes allocated of %d: not preallocated", p, st.Blocks*512, v.Size)
		}
	}
	checkRecovered(t, "base images", got, m)
}

// TestTornTail: a record cut short or failing its CRC at the end of the last
// segment is truncated at open; damage before the tail refuses to open.
func TestTornTail(t *testing.T) {
	setup := func(t *testing.T) (string, *writer, []Point) {
		dir := t.TempDir()
		j, err := Open(dir, Options{NoApplier: true, Retain: time.Hour, SegmentBytes: 8 << 10})
		if err != nil {
			t.Fatal(err)
		}
		w := newWriter(t, j, map[string]int64{"a": 64 << 10})
		var pts []Point
		for range 12 {
			pts = append(pts, w.writes(1))
		}
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		return dir, w, pts
	}
	lastSeg := func(t *testing.T, dir string) segment {
		segs, err := listSegments(filepath.Join(dir, segDirName))
		if err != nil || len(segs) < 2 {
			t.Fatalf("segments %v: %v", segs, err)
		}
		return segs[len(segs)-1]
	}
	reopen := func(t *testing.T, dir string, wantSeq uint64) *Journal {
		j := mustOpen(t, dir, Options{NoApplier: true, Retain: time.Hour})
		if got := j.Stats().LastSeq; got != wantSeq {
			t.Fatalf("after reopen the journal ends at seq %d, want %d", got, wantSeq)
		}
		return j
	}
	for _, tc := range []struct {
		name string
		hurt func(t *testing.T, seg segment, lastStart int64)
		drop int // records lost
	}{
		{"cut mid-record", func(t *testing.T, seg segment, lastStart int64) {
			fi, _ := os.Stat(seg.path)
			os.Truncate(seg.path, fi.Size()-100)
		}, 1},
		{"cut mid-header", func(t *testing.T, seg segment, lastStart int64) {
			os.Truncate(seg.path, segHeaderLen+lastStart-seg.start+10)
		}, 1},
		{"bad crc", func(t *testing.T, seg segment, lastStart int64) {
			f, _ := os.OpenFile(seg.path, os.O_RDWR, 0)
			defer f.Close()
			f.WriteAt([]byte{0xff}, segHeaderLen+lastStart-seg.start+recHeaderLen+20)
		}, 1},
		{"zero tail", func(t *testing.T, seg segment, lastStart int64) {
			f, _ := os.OpenFile(seg.path, os.O_WRONLY|os.O_APPEND, 0)
			defer f.Close()
			f.Write(make([]byte, 4096))
		}, 0},
		{"garbage tail", func(t *testing.T, seg segment, lastStart int64) {
			f, _ := os.OpenFile(seg.path, os.O_WRONLY|os.O_APPEND, 0)
			defer f.Close()
			f.Write([]byte{200, 0, 0, 0, 1, 2, 3, 4, 1, 0, 0, 0, 0, 0, 0, 0, 9, 9})
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, w, pts := setup(t)
			seg := lastSeg(t, dir)
			lastStart := pts[len(pts)-2].Pos
			if lastStart < seg.start {
				t.Fatalf("test setup: last record not in the last segment")
			}
			tc.hurt(t, seg, lastStart)
			want := w.seq - uint64(tc.drop)
			j := reopen(t, dir, want)
			fi, _ := os.Stat(seg.path)
			if end := j.Stats().Durable; fi.Size() != segHeaderLen+end-seg.start {
				t.Fatalf("segment is %d bytes, want it truncated to %d", fi.Size(), segHeaderLen+end-seg.start)
			}
			// Appending continues after the truncated tail.
			m := model{}
			if err := j.Scan(context.Background(), func(rec Record, _, _ int64) error {
				m.apply(&rec)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			w2 := &writer{t: t, j: j, m: m, seq: want, rng: rand.New(rand.NewPCG(3, 4))}
			w2.writes(3)
			j.Close()
			j = reopen(t, dir, want+3)
			checkRecovered(t, "after truncation", materialize(t, j, Newest()), w2.m)
		})
	}
	t.Run("torn new segment header", func(t *testing.T) {
		dir, w, pts := setup(t)
		end := pts[len(pts)-1].Pos
		os.WriteFile(filepath.Join(dir, segDirName, segName(end)), []byte("VHDMJ"), 0o600)
		j := reopen(t, dir, w.seq)
		if segs, _ := listSegments(filepath.Join(dir, segDirName)); segs[len(segs)-1].start == end {
			t.Fatalf("torn segment %s kept", segName(end))
		}
		j.Close()
	})
	t.Run("zeroed new segment", func(t *testing.T) {
		dir, w, pts := setup(t)
		end := pts[len(pts)-1].Pos
		os.WriteFile(filepath.Join(dir, segDirName, segName(end)), make([]byte, 4096), 0o600)
		reopen(t, dir, w.seq).Close()
	})
	t.Run("corrupt header of the last segment", func(t *testing.T) {
		dir, _, _ := setup(t)
		seg := lastSeg(t, dir)
		f, _ := os.OpenFile(seg.path, os.O_RDWR, 0)
		f.WriteAt([]byte{'X'}, 0)
		f.Close()
		if _, err := Open(dir, Options{NoApplier: true}); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("open with a corrupt header before records: %v, want ErrCorrupt", err)
		}
	})
	t.Run("corrupt before the tail", func(t *testing.T) {
		dir, _, _ := setup(t)
		segs, _ := listSegments(filepath.Join(dir, segDirName))
		f, _ := os.OpenFile(segs[0].path, os.O_RDWR, 0)
		f.WriteAt([]byte{0xff, 0xff}, segHeaderLen+recHeaderLen+2)
		f.Close()
		if _, err := Open(dir, Options{NoApplier: true}); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("open with a corrupt record in a full segment: %v, want ErrCorrupt", err)
		}
	})
}

// faults injects errors into store operations.
type faults struct {
	mu    sync.Mutex
	fail  map[string]error // op -> error to return
	after map[string]int   // op -> calls to let through first
	calls map[string]int
}

func newFaults() *faults {
	return &faults{fail: map[string]error{}, after: map[string]int{}, calls: map[string]int{}}
}

func (f *faults) set(op string, after int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail[op], f.after[op], f.calls[op] = err, after, 0
}

func (f *faults) count(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

func (f *faults) inject(op, _ string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[op]++
	if err := f.fail[op]; err != nil && f.calls[op] > f.after[op] {
		return err
	}
	return nil
}

// TestStoreErrorSticky: a failed segment write (ENOSPC) or fdatasync (EIO)
// puts the journal in a sticky error state: that append and every later one
// fail, the fsync is not retried, acknowledged records survive a reopen.
func TestStoreErrorSticky(t *testing.T) {
	for _, op := range []string{"segment-write", "segment-sync"} {
		t.Run(op, func(t *testing.T) {
			dir := t.TempDir()
			f := newFaults()
			j := mustOpen(t, dir, Options{NoApplier: true, Retain: time.Hour, inject: f.inject})
			w := newWriter(t, j, map[string]int64{"a": 64 << 10})
			w.writes(5)
			acked := w.m.clone()
			ackedSeq := w.seq
			errno := syscall.ENOSPC
			if op == "segment-sync" {
				errno = syscall.EIO
			}
			f.set(op, 0, errno)
			_, err := j.Append(context.Background(), Record{Kind: KindWrite, Volume: "a", Data: make([]byte, 512)})
			if !errors.Is(err, ErrStore) || !errors.Is(err, errno) {
				t.Fatalf("append with %s failing: %v, want ErrStore and %v", op, err, errno)
			}
			if !errors.Is(j.Err(), errno) || !errors.Is(j.Stats().Err, errno) {
				t.Fatalf("Err() = %v", j.Err())
			}
			calls := f.count(op)
			f.set(op, 0, nil) // the disk "recovers": the journal must stay failed
			for range 3 {
				if _, err := j.Append(context.Background(), Record{Kind: KindWrite, Volume: "a", Data: make([]byte, 512)}); !errors.Is(err, errno) {
					t.Fatalf("append after the failure: %v, want the sticky error", err)
				}
			}
			if f.count(op) != 0 || calls == 0 {
				t.Fatalf("%s called %d times after the failure (retried)", op, f.count(op))
			}
			j.Close()
			j2 := mustOpen(t, dir, Options{NoApplier: true, Retain: time.Hour})
			if j2.Stats().LastSeq != ackedSeq {
				t.Fatalf("after reopen last seq %d, want %d", j2.Stats().LastSeq, ackedSeq)
			}
			checkRecovered(t, "acknowledged", materialize(t, j2, AtSeq(ackedSeq)), acked)
		})
	}
}

// TestApplyErrorSticky: a failed image write, image fsync or state write
// stops the applier for good: the applied position does not advance (in
// memory or on disk), later passes do nothing, the journal keeps accepting
// writes, and a reopen redoes the pass from the persisted position.
func TestApplyErrorSticky(t *testing.T) {
	for _, op := range []string{"image-write", "image-sync", "state-write"} {
		t.Run(op, func(t *testing.T) {
			dir := t.TempDir()
			f := newFaults()
			j := mustOpen(t, dir, Options{NoApplier: true, inject: f.inject})
			w := newWriter(t, j, map[string]int64{"a": 64 << 10, "b": 64 << 10})
			w.writes(10)
			if err := j.ApplyNow(); err != nil {
				t.Fatal(err)
			}
			applied := j.Stats().Applied
			stateBefore, _ := os.ReadFile(filepath.Join(dir, stateFile))
			w.writes(10)
			after := 0
			if op == "state-write" {
				after = 1 // the intent is written; the final state write fails
			}
			f.set(op, after, syscall.ENOSPC)
			if err := j.ApplyNow(); !errors.Is(err, ErrStore) || !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("apply with %s failing: %v", op, err)
			}
			if !errors.Is(j.ApplyErr(), syscall.ENOSPC) || j.Stats().Applied != applied {
				t.Fatalf("ApplyErr %v, applied %+v (was %+v)", j.ApplyErr(), j.Stats().Applied, applied)
			}
			f.set(op, 0, nil)
			if err := j.ApplyNow(); !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("second pass: %v, want the sticky error", err)
			}
			if f.count(op) != 0 {
				t.Fatalf("%s retried after the failure", op)
			}
			var st state
			b, _ := os.ReadFile(filepath.Join(dir, stateFile))
			if op == "state-write" {
				st, _ = loadState(DirStore(dir))
				if st.Base != applied {
					t.Fatalf("persisted base %+v, want %+v", st.Base, applied)
				}
			} else if op == "image-write" || op == "image-sync" {
				st, _ = loadState(DirStore(dir))
				if st.Base != applied {
					t.Fatalf("persisted base %+v, want %+v (state %s, before %s)", st.Base, applied, b, stateBefore)
				}
			}
			// Appends go on.
			w.writes(3)
			if _, err := j.Materialize(context.Background(), Newest(), filepath.Join(t.TempDir(), "x")); err == nil {
				t.Fatal("materialize over base images left mid-pass succeeded")
			}
			j.Close()
			j2 := mustOpen(t, dir, Options{NoApplier: true})
			checkRecovered(t, "after reopen", materialize(t, j2, Newest()), w.m)
			if err := j2.ApplyNow(); err != nil {
				t.Fatal(err)
			}
			checkBase(t, dir, w.m)
		})
	}
}

// TestSubmitValidation: malformed records are refused with ErrInvalid and
// nothing of the submission is journaled.
func TestSubmitValidation(t *testing.T) {
	j := mustOpen(t, t.TempDir(), Options{NoApplier: true})
	w := newWriter(t, j, map[string]int64{"a": 64 << 10})
	w.append(Record{Kind: KindCheckpoint, Checkpoint: "c1"})
	w.append(Record{Kind: KindResyncBegin})
	w.append(Record{Kind: KindResyncEnd})
	wr := func(off int64, n int) Record {
		return Record{Kind: KindWrite, Volume: "a", Offset: off, Data: make([]byte, n)}
	}
	for _, tc := range []struct {
		name string
		recs []Record
	}{
		{"unknown volume", []Record{{Kind: KindWrite, Volume: "b", Data: []byte{1}}}},
		{"beyond the end", []Record{wr(64<<10-511, 512)}},
		{"negative offset", []Record{wr(-512, 512)}},
		{"empty write", []Record{wr(0, 0)}},
		{"zero length zero", []Record{{Kind: KindZero, Volume: "a"}}},
		{"too large", []Record{wr(0, MaxWriteBytes+1)}},
		{"seq not increasing", []Record{{Kind: KindWrite, Volume: "a", Data: []byte{1}, Seq: w.seq, HasSeq: true}}},
		{"resync-end without a set", []Record{{Kind: KindResyncEnd}}},
		{"checkpoint in a resync set", []Record{{Kind: KindResyncBegin}, {Kind: KindCheckpoint, Checkpoint: "c2"}}},
		{"checkpoint name used", []Record{{Kind: KindCheckpoint, Checkpoint: "c1"}}},
		{"checkpoint name used twice", []Record{{Kind: KindCheckpoint, Checkpoint: "c3"}, {Kind: KindCheckpoint, Checkpoint: "c3"}}},
		{"bad volume name", []Record{{Kind: KindVolume, Volume: "../x", Size: 512}}},
		{"bad checkpoint name", []Record{{Kind: KindCheckpoint, Checkpoint: ""}}},
		{"zero size", []Record{{Kind: KindVolume, Volume: "c", Size: 0}}},
		{"unknown kind", []Record{{Kind: 99}}},
		{"good then bad", []Record{wr(0, 512), wr(64<<10, 512)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := j.Stats()
			if _, err := j.Append(context.Background(), tc.recs...); !errors.Is(err, ErrInvalid) {
				t.Fatalf("append: %v, want ErrInvalid", err)
			}
			if after := j.Stats(); after.Durable != before.Durable || after.InResync {
				t.Fatalf("journal changed: %+v -> %+v", before, after)
			}
		})
	}
	// A volume added in the same submission can be written at once.
	w.append(Record{Kind: KindVolume, Volume: "c", Size: 4096}, Record{Kind: KindWrite, Volume: "c", Offset: 0, Data: []byte("x")})
	checkRecovered(t, "newest", materialize(t, j, Newest()), w.m)
}

// TestGroupCommit: concurrent appends share writes and fsyncs, and every one
// returns durable.
func TestGroupCommit(t *testing.T) {
	dir := t.TempDir()
	j := mustOpen(t, dir, Options{NoApplier: true})
	if _, err := j.Append(context.Background(), Record{Kind: KindVolume, Volume: "a", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var n atomic.Int64
	for g := range 32 {
		wg.Go(func() {
			for i := range 50 {
				data := []byte(fmt.Sprintf("%d-%d", g, i))
				if _, err := j.Append(context.Background(), Record{Kind: KindWrite, Volume: "a", Offset: int64(g*50+i) * 512, Data: data}); err != nil {
					t.Error(err)
					return
				}
				n.Add(1)
			}
		})
	}
	wg.Wait()
	st := j.Stats()
	if st.Appends != 1+32*50 || st.Batches >= st.Appends || st.Fsyncs == 0 || st.Fsyncs > st.Batches {
		t.Fatalf("appends %d, batches %d, fsyncs %d: no group commit", st.Appends, st.Batches, st.Fsyncs)
	}
	t.Logf("%d appends in %d group commits", st.Appends, st.Batches)
	if _, err := j.Append(context.Background()); err != nil {
		t.Fatalf("empty append: %v", err)
	}
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrInUse) {
		t.Fatalf("second open of the directory: %v, want ErrInUse", err)
	}
	j.Close()
	j = mustOpen(t, dir, Options{NoApplier: true})
	if st2 := j.Stats(); st2.Durable != st.Durable {
		t.Fatalf("after reopen durable %d, want %d", st2.Durable, st.Durable)
	}
}

// TestApplyMerges: adjacent writes reach the base image as one write.
func TestApplyMerges(t *testing.T) {
	dir := t.TempDir()
	j := mustOpen(t, dir, Options{NoApplier: true})
	w := newWriter(t, j, map[string]int64{"a": 1 << 20, "b": 1 << 20})
	for i := range 64 {
		data := make([]byte, 4096)
		data[0] = byte(i + 1)
		w.append(Record{Kind: KindWrite, Volume: "a", Offset: int64(i) * 4096, Data: data})
	}
	w.append(Record{Kind: KindWrite, Volume: "b", Offset: 8192, Data: []byte("elsewhere")})
	if err := j.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.ApplyWrites != 2 || st.AppliedBytes != 64*4096+9 {
		t.Fatalf("65 writes (64 adjacent) applied with %d write calls, %d bytes; want 2 calls", st.ApplyWrites, st.AppliedBytes)
	}
	checkBase(t, dir, w.m)
}

// TestLargeBatches: a burst of submissions larger than one group commit
// (2 MiB) is written as several, in order.
func TestLargeBatches(t *testing.T) {
	j := mustOpen(t, t.TempDir(), Options{NoApplier: true})
	w := newWriter(t, j, map[string]int64{"a": 4 << 20})
	var ps []*Pending
	for i := range 200 {
		data := make([]byte, 64<<10)
		for k := range data {
			data[k] = byte(i + k)
		}
		rec := Record{Kind: KindWrite, Volume: "a", Offset: int64(i%48) * (64 << 10), Data: data}
		p, err := j.Submit(rec)
		if err != nil {
			t.Fatal(err)
		}
		w.m.apply(&rec)
		ps = append(ps, p)
	}
	var last Point
	for _, p := range ps {
		pt, err := p.Wait(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if pt.Pos <= last.Pos {
			t.Fatalf("submission ends at %d, after one ending at %d", pt.Pos, last.Pos)
		}
		last = pt
	}
	if st := j.Stats(); st.Batches < 3 {
		t.Fatalf("12.5 MiB in %d group commits", st.Batches)
	}
	checkRecovered(t, "newest", materialize(t, j, Newest()), w.m)
}

// TestCommitGathersBatches: while one fdatasync runs, submissions pile up
// in several closed batches; the next commit writes all of them and makes
// them durable with one fdatasync (rotating segments inside it). No Pending
// completes before the fdatasync of its records; a failed fdatasync fails
// every submission of the commit and is sticky; what was acknowledged
// survives a reopen.
func TestCommitGathersBatches(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(fmt.Sprintf("fail=%v", fail), func(t *testing.T) {
			dir := t.TempDir()
			var mu sync.Mutex
			var entered, release chan struct{} // set: the next segment-sync blocks
			var syncErr error                  // every segment-sync after the blocked one
			hook := func(op, _ string) error {
				if op != "segment-sync" {
					return nil
				}
				mu.Lock()
				in, rel := entered, release
				entered, release = nil, nil
				err := syncErr
				mu.Unlock()
				if in != nil {
					close(in)
					<-rel
					return nil
				}
				return err
			}
			o := Options{NoApplier: true, Retain: time.Hour, SegmentBytes: 4 << 20, inject: hook}
			j := mustOpen(t, dir, o)
			w := newWriter(t, j, map[string]int64{"a": 4 << 20})
			in, rel := make(chan struct{}), make(chan struct{})
			mu.Lock()
			entered, release = in, rel
			mu.Unlock()
			before := j.Stats()

			rec := func(i int) Record {
				data := make([]byte, 64<<10)
				for k := range data {
					data[k] = byte(i*7 + k)
				}
				w.seq++
				return Record{Kind: KindWrite, Volume: "a", Offset: int64(i%60) * (64 << 10), Data: data, Seq: w.seq, HasSeq: true}
			}
			first := rec(0)
			p0, err := j.Submit(first)
			if err != nil {
				t.Fatal(err)
			}
			<-in // the writer is inside the fdatasync of the first record
			// 6.25 MiB: 3 closed batches and an open one.
			ps, recs := submitEach(t, j, 100, rec)
			time.Sleep(20 * time.Millisecond)
			checkNotDone(t, append([]*Pending{p0}, ps...))
			if fail {
				mu.Lock()
				syncErr = syscall.EIO
				mu.Unlock()
			}
			close(rel)
			if _, err := p0.Wait(context.Background()); err != nil {
				t.Fatalf("first submission: %v", err)
			}
			w.m.apply(&first)
			var wantErr error
			if fail {
				wantErr = syscall.EIO
			}
			waitApplied(t, w.m, ps, recs, wantErr, "of a commit whose fdatasync failed")
			st := j.Stats()
			if fail {
				if _, err := j.Submit(rec(101)); !errors.Is(err, syscall.EIO) {
					t.Fatalf("submit after the failed commit: %v, want the sticky EIO", err)
				}
			} else {
				batches, fsyncs := st.Batches-before.Batches, st.Fsyncs-before.Fsyncs
				// The first commit: 1 batch, 1 fdatasync. The gathered one:
				// at least 4 batches (2 MiB each), one fdatasync for each
				// of the (4 MiB) segments it wrote into: 2.
				if batches < 5 || fsyncs >= batches {
					t.Fatalf("%d batches with %d fdatasyncs: not gathered", batches, fsyncs)
				}
				t.Logf("101 submissions: %d batches, %d fdatasyncs", batches, fsyncs)
			}
			j.Close()
			j2 := mustOpen(t, dir, Options{NoApplier: true, Retain: time.Hour})
			want := first.Seq
			if !fail {
				want = recs[len(recs)-1].Seq
			}
			if got := j2.Stats().LastSeq; got < want {
				t.Fatalf("after reopen last seq %d, want at least %d", got, want)
			}
			checkRecovered(t, "acknowledged", materialize(t, j2, AtSeq(want)), w.m)
		})
	}
}

// TestCopyImage: the copy of a base image equals it and keeps its holes; on
// another file system (tmpfs /dev/shm, where present) copy_file_range fails
// and the plain copy takes over.
func TestCopyImage(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src.img")
	const size = 8 << 20
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for _, off := range []int64{0, 3 << 20, size - 4096} {
		for i := range 4096 {
			want[off+int64(i)] = byte(i*7 + int(off>>20) + 1)
		}
		if _, err := f.WriteAt(want[off:off+4096], off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	dsts := []string{t.TempDir()}
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "journal-test")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dsts = append(dsts, d)
	}
	for _, d := range dsts {
		dst := filepath.Join(d, "dst.img")
		out, err := copyImage(src, dst, size)
		if err != nil {
			t.Fatalf("copy to %s: %v", d, err)
		}
		out.Close()
		got, err := os.ReadFile(dst)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("copy to %s differs", d)
		}
		var st syscall.Stat_t
		syscall.Stat(dst, &st)
		if st.Blocks*512 >= size {
			t.Fatalf("copy to %s allocates %d bytes of %d: holes filled", d, st.Blocks*512, size)
		}
		if _, err := copyImage(src, dst, size); !errors.Is(err, os.ErrExist) {
			t.Fatalf("copy over an existing file: %v", err)
		}
	}
}

// TestMaterializeWhileApplying: materializing while appends go on and the
// applier advances the base images and deletes segments (Retain 0) gives
// exactly the model's state at the point it reports.
func TestMaterializeWhileApplying(t *testing.T) {
	dir := t.TempDir()
	j := mustOpen(t, dir, Options{ApplyInterval: time.Millisecond, SegmentBytes: 16 << 10})
	vols := []string{"a", "b", "c"}
	const seed = 7
	g := newGen(seed, vols...)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := j.Append(context.Background(), g.op()); err != nil {
				t.Error(err)
				return
			}
		}
	})
	var pts []Recovered
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) || len(pts) < 5 {
		if j.Newest().Seq < 3 {
			time.Sleep(time.Millisecond)
			continue
		}
		rv, err := j.Materialize(context.Background(), Newest(), filepath.Join(t.TempDir(), "out"))
		if err != nil {
			t.Fatal(err)
		}
		pts = append(pts, rv)
	}
	close(stop)
	wg.Wait()
	st := j.Stats()
	if st.ApplyPasses == 0 || st.Applied.Pos == 0 {
		t.Fatalf("the applier did not run: %+v", st)
	}
	ops := history(seed, st.LastSeq, vols...)
	var seqs []uint64
	for _, rv := range pts {
		seqs = append(seqs, rv.Point.Seq)
	}
	models := modelsAt(ops, seqs)
	for _, rv := range pts {
		checkRecovered(t, fmt.Sprintf("point seq %d", rv.Point.Seq), rv, models[rv.Point.Seq])
	}
	t.Logf("%d points materialized while %d passes applied %d bytes", len(pts), st.ApplyPasses, st.AppliedBytes)
}

// TestProbe: Probe fails while the store refuses writes (ENOSPC through
// the fault hook), succeeds once it heals, and leaves nothing in the
// segment directory that recovery would read.
func TestProbe(t *testing.T) {
	var full atomic.Bool
	full.Store(true)
	dir := t.TempDir()
	j, err := Open(dir, Options{FaultHook: func(op, path string) error {
		if op == "segment-write" && filepath.Base(path) == probeName && full.Load() {
			return syscall.ENOSPC
		}
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if err := j.Probe(); !errors.Is(err, ErrStore) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("probe of a full store: %v, want ErrStore wrapping ENOSPC", err)
	}
	full.Store(false)
	if err := j.Probe(); err != nil {
		t.Fatalf("probe of a healed store: %v", err)
	}
	if _, err := os.Stat(filepath.Join(j.segDir, probeName)); !os.IsNotExist(err) {
		t.Errorf("probe file left behind: %v", err)
	}
	if _, err := listSegments(j.segDir); err != nil {
		t.Errorf("segment directory after probes: %v", err)
	}
}

// countRef counts Release calls.
type countRef struct{ n atomic.Int32 }

func (r *countRef) Release() { r.n.Add(1) }

// TestSubmitRef: writes submitted by reference (their data written from
// the caller's memory with vectored writes, small ones copied) read back
// as written, across a reopen and into the base images; each reference is
// released exactly once, after the write and before or when the records
// are durable, also when the store fails.
func TestSubmitRef(t *testing.T) {
	dir := t.TempDir()
	f := newFaults()
	j := mustOpen(t, dir, Options{NoApplier: true, Retain: time.Hour, SegmentBytes: 1 << 20, inject: f.inject})
	w := newWriter(t, j, map[string]int64{"a": 4 << 20, "b": 1 << 20})
	rng := rand.New(rand.NewPCG(3, 4))
	var refs []*countRef
	var last *Pending
	for i := range 600 {
		vol, size := "a", int64(4<<20)
		if i%3 == 0 {
			vol, size = "b", 1<<20
		}
		l := int64(1+rng.IntN(64)) * 512 // 512 B (copied) to 32 KiB (referenced)
		off := int64(rng.IntN(int((size-l)/512)+1)) * 512
		data := make([]byte, l)
		for k := range data {
			data[k] = byte(rng.Uint32())
		}
		w.seq++
		rec := Record{Kind: KindWrite, Volume: vol, Offset: off, Data: data, Seq: w.seq, HasSeq: true}
		ref := &countRef{}
		p, err := j.SubmitRef(ref, rec)
		if err != nil {
			t.Fatal(err)
		}
		refs = append(refs, ref)
		w.m.apply(&rec)
		last = p
	}
	if _, err := last.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	for i, r := range refs {
		if n := r.n.Load(); n != 1 {
			t.Fatalf("reference %d released %d times once durable", i, n)
		}
	}
	if j.Stats().Segments < 2 {
		t.Fatalf("%d segments: the test wants rotations", j.Stats().Segments)
	}
	// Several writes in one submission share one reference and are all
	// journaled by reference (the hub submits a batch of frames so).
	ref := &countRef{}
	var recs []Record
	for k := range 3 {
		w.seq++
		rec := Record{Kind: KindWrite, Volume: "a", Offset: int64(k) * 8192, Data: bytes.Repeat([]byte{byte(k + 1)}, 8192), Seq: w.seq, HasSeq: true}
		recs = append(recs, rec)
		w.m.apply(&rec)
	}
	p, err := j.SubmitRef(ref, recs...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := ref.n.Load(); n != 1 || p.b.extBytes != 3*8192 {
		t.Fatalf("three writes in one submission: released %d times, %d bytes by reference, want 1 and %d", n, p.b.extBytes, 3*8192)
	}
	want := w.m.clone()
	seq := w.seq
	checkRecovered(t, "by reference", materialize(t, j, AtSeq(seq)), want)

	// A failed write releases the reference too, and none is taken for
	// a refused record.
	f.set("segment-write", 0, syscall.EIO)
	ref = &countRef{}
	p, err = j.SubmitRef(ref, Record{Kind: KindWrite, Volume: "a", Data: make([]byte, 8192)})
	if err == nil {
		_, err = p.Wait(context.Background())
	}
	if !errors.Is(err, syscall.EIO) || ref.n.Load() != 1 {
		t.Fatalf("failed write: err %v, released %d times", err, ref.n.Load())
	}
	ref = &countRef{}
	if _, err := j.SubmitRef(ref, Record{Kind: KindWrite, Volume: "nope", Data: make([]byte, 8192)}); err == nil || ref.n.Load() != 0 {
		t.Fatalf("refused record: err %v, released %d times", err, ref.n.Load())
	}
	j.Close()

	j2 := mustOpen(t, dir, Options{NoApplier: true})
	if got := j2.Stats().LastSeq; got != seq {
		t.Fatalf("after reopen last seq %d, want %d", got, seq)
	}
	if err := j2.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	checkBase(t, dir, want)
}

// TestCommitOverlapsWrite: on the directory store the next commit's
// records are written while an fdatasync runs (not after it), yet none of
// them completes before an fdatasync that began after its write; a write
// that fails meanwhile fails its records and every later one, never the
// commit being synced, and nothing is synced after it.
func TestCommitOverlapsWrite(t *testing.T) {
	for _, failWrite := range []bool{false, true} {
		t.Run(fmt.Sprintf("failWrite=%v", failWrite), func(t *testing.T) {
			dir := t.TempDir()
			var mu sync.Mutex
			var entered, release chan struct{} // the next segment-sync blocks
			var writeErr error
			syncs := 0
			hook := func(op, _ string) error {
				mu.Lock()
				defer mu.Unlock()
				if op == "segment-write" {
					return writeErr
				}
				syncs++
				in, rel := entered, release
				entered, release = nil, nil
				if in != nil {
					mu.Unlock()
					close(in)
					<-rel
					mu.Lock()
				}
				return nil
			}
			j := mustOpen(t, dir, Options{NoApplier: true, Retain: time.Hour, inject: hook})
			if _, ok := j.wf.(overlapSyncer); !ok {
				t.Fatal("the directory store's segments do not overlap syncs")
			}
			w := newWriter(t, j, map[string]int64{"a": 4 << 20})
			in, rel := make(chan struct{}), make(chan struct{})
			var relOnce sync.Once
			unblock := func() { relOnce.Do(func() { close(rel) }) }
			t.Cleanup(unblock) // a failure leaves no writer blocked for the journal's Close
			mu.Lock()
			entered, release = in, rel
			mu.Unlock()
			rec := func(i int) Record {
				w.seq++
				return Record{Kind: KindWrite, Volume: "a", Offset: int64(i%60) * (64 << 10), Data: bytes.Repeat([]byte{byte(i)}, 64<<10), Seq: w.seq, HasSeq: true}
			}
			first := rec(0)
			p0, err := j.Submit(first)
			if err != nil {
				t.Fatal(err)
			}
			<-in // inside the fdatasync of the first record
			before := j.Stats()
			if failWrite {
				mu.Lock()
				writeErr = syscall.ENOSPC
				mu.Unlock()
			}
			ps, recs := submitEach(t, j, 8, rec) // 512 KiB: past overlapWriteBytes
			deadline := time.Now().Add(10 * time.Second)
			for !failWrite && j.Stats().Batches == before.Batches {
				if time.Now().After(deadline) {
					t.Fatal("nothing written while the fdatasync ran")
				}
				time.Sleep(time.Millisecond)
			}
			time.Sleep(20 * time.Millisecond)
			checkNotDone(t, append([]*Pending{p0}, ps...))
			mu.Lock()
			syncsBefore := syncs
			mu.Unlock()
			unblock()
			if _, err := p0.Wait(context.Background()); err != nil {
				t.Fatalf("the commit being synced: %v", err)
			}
			w.m.apply(&first)
			var wantErr error
			if failWrite {
				wantErr = syscall.ENOSPC
			}
			waitApplied(t, w.m, ps, recs, wantErr, "after the failed write")
			mu.Lock()
			after := syncs
			mu.Unlock()
			if failWrite && after != syncsBefore {
				t.Fatalf("%d fdatasyncs after the failed write", after-syncsBefore)
			}
			if !failWrite && after == syncsBefore {
				t.Fatal("the overlapped records were acknowledged without an fdatasync of their own")
			}
			want := first.Seq
			if !failWrite {
				want = recs[len(recs)-1].Seq
			}
			j.Close()
			j2 := mustOpen(t, dir, Options{NoApplier: true, Retain: time.Hour})
			defer j2.Close()
			if got := j2.Stats().LastSeq; got < want {
				t.Fatalf("after reopen last seq %d, want at least %d", got, want)
			}
			checkRecovered(t, "acknowledged", materialize(t, j2, AtSeq(want)), w.m)
		})
	}
}

// submitEach journals rec(1) to rec(n), one submission each, and returns
// their pendings and records in order.
func submitEach(t *testing.T, j *Journal, n int, rec func(int) Record) ([]*Pending, []Record) {
	t.Helper()
	var ps []*Pending
	var recs []Record
	for i := 1; i <= n; i++ {
		r := rec(i)
		p, err := j.Submit(r)
		if err != nil {
			t.Fatal(err)
		}
		ps, recs = append(ps, p), append(recs, r)
	}
	return ps, recs
}

// checkNotDone fails the test if any of ps completed (before the
// fdatasync that must complete it).
func checkNotDone(t *testing.T, ps []*Pending) {
	t.Helper()
	for i, p := range ps {
		select {
		case <-p.Done():
			t.Fatalf("submission %d completed before its fdatasync", i)
		default:
		}
	}
}

// waitApplied waits for ps, the submissions of recs: with want nil each
// must succeed and is applied to m; otherwise each must fail with want
// (what says when, for the message).
func waitApplied(t *testing.T, m model, ps []*Pending, recs []Record, want error, what string) {
	t.Helper()
	for i, p := range ps {
		_, err := p.Wait(context.Background())
		if want != nil {
			if !errors.Is(err, want) {
				t.Fatalf("submission %d %s: %v, want %v", i+1, what, err, want)
			}
			continue
		}
		if err != nil {
			t.Fatalf("submission %d: %v", i+1, err)
		}
		m.apply(&recs[i])
	}
}
