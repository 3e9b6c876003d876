package journal

import (
	"bytes"
	"sync"
	"testing"
	"time"
)

// dropStore is the directory store with its segments' page-cache drops
// recorded, next to what was synced when each came.
type dropStore struct {
	Store
	mu     sync.Mutex
	synced map[int64]int64      // segment start: size when its last Sync began
	drops  map[int64][][2]int64 // segment start: [off, off+n) in call order
	bad    []string
}

func (s *dropStore) CreateSegment(start int64) (Segment, error) {
	seg, err := s.Store.CreateSegment(start)
	if err != nil {
		return nil, err
	}
	return dropSegment{seg.(fileSegment), s, start}, nil
}

func (s *dropStore) OpenSegment(start int64) (Segment, error) {
	seg, err := s.Store.OpenSegment(start)
	if err != nil {
		return nil, err
	}
	return dropSegment{seg.(fileSegment), s, start}, nil
}

type dropSegment struct {
	fileSegment
	s     *dropStore
	start int64
}

func (d dropSegment) Sync() error {
	size, err := d.Size()
	if err != nil {
		return err
	}
	if err := d.fileSegment.Sync(); err != nil {
		return err
	}
	d.s.mu.Lock()
	d.s.synced[d.start] = max(d.s.synced[d.start], size)
	d.s.mu.Unlock()
	return nil
}

func (d dropSegment) DropCache(off, n int64) {
	d.s.mu.Lock()
	defer d.s.mu.Unlock()
	if off+n > d.s.synced[d.start] {
		d.s.bad = append(d.s.bad, "dropped past the synced end")
	}
	d.s.drops[d.start] = append(d.s.drops[d.start], [2]int64{off, off + n})
	d.fileSegment.DropCache(off, n)
}

// TestDropCache: with a long retention window the journal gives synced
// segment bytes back to the page cache in pieces of dropCacheBytes, not
// per group commit, never past what was synced, and a segment's rest when
// the next one starts; with a short window (the applier reads the records
// soon) it drops nothing.
func TestDropCache(t *testing.T) {
	for _, retain := range []time.Duration{24 * time.Hour, time.Second} {
		t.Run(retain.String(), func(t *testing.T) {
			dir := t.TempDir()
			st := &dropStore{Store: DirStore(dir), synced: map[int64]int64{}, drops: map[int64][][2]int64{}}
			const segBytes = 20 << 20
			j := mustOpen(t, dir, Options{Store: st, NoApplier: true, Retain: retain, SegmentBytes: segBytes})
			w := newWriter(t, j, map[string]int64{"a": 64 << 20})
			data := bytes.Repeat([]byte{7}, 256<<10)
			for i := range 200 { // 50 MiB, one commit each: three segments
				w.append(Record{Kind: KindWrite, Volume: "a", Offset: int64(i%200) * int64(len(data)), Data: data})
			}
			segs := j.segs
			commits := j.Stats().Fsyncs
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			st.mu.Lock()
			defer st.mu.Unlock()
			if len(st.bad) > 0 {
				t.Fatal(st.bad)
			}
			if len(segs) < 3 {
				t.Fatalf("%d segments, want 3", len(segs))
			}
			calls := 0
			for i, sg := range segs {
				drops := st.drops[sg.start]
				calls += len(drops)
				if retain < dropCacheRetain {
					if len(drops) > 0 {
						t.Fatalf("segment %d: %d drops with retain %v", i, len(drops), retain)
					}
					continue
				}
				at := int64(segHeaderLen)
				for k, d := range drops {
					if d[0] != at {
						t.Fatalf("segment %d drop %d starts at %d, want %d (contiguous)", i, k, d[0], at)
					}
					if d[1]-d[0] < dropCacheBytes && (k < len(drops)-1 || i == len(segs)-1) {
						t.Fatalf("segment %d drop %d of %d bytes: under %d, and not a finished segment's rest", i, k, d[1]-d[0], dropCacheBytes)
					}
					at = d[1]
				}
				synced := st.synced[sg.start]
				if i < len(segs)-1 && at != synced {
					t.Fatalf("finished segment %d dropped up to %d of %d synced bytes", i, at, synced)
				}
				if i == len(segs)-1 && synced-at >= dropCacheBytes {
					t.Fatalf("open segment dropped up to %d of %d synced bytes", at, synced)
				}
			}
			if retain >= dropCacheRetain && (calls == 0 || uint64(calls)*10 > commits) {
				t.Fatalf("%d page-cache drops for %d commits", calls, commits)
			}
		})
	}
}
