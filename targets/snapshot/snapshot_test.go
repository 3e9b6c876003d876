package snapshot_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	_ "github.com/vhostdm/vhostdm/targets/snapshot"
)

func TestConformance(t *testing.T) {
	mappertest.RunTarget(t, "snapshot-origin", mappertest.TargetCase{
		Backends: 1, BackendBytes: 1 << 20, Stores: true, ZeroesOnDiscard: true,
		Table: func(b []string) string { return fmt.Sprintf("0 2048 snapshot-origin %s", b[0]) },
	})
	mappertest.RunTarget(t, "snapshot-P", mappertest.TargetCase{
		Backends: 2, BackendBytes: 2 << 20, Stores: true,
		Table: func(b []string) string { return fmt.Sprintf("0 2048 snapshot %s %s P 8", b[0], b[1]) },
	})
	mappertest.RunTarget(t, "snapshot-N", mappertest.TargetCase{
		Backends: 2, BackendBytes: 2 << 20, Stores: true,
		Table: func(b []string) string { return fmt.Sprintf("0 2048 snapshot %s %s N 16", b[0], b[1]) },
	})
	mappertest.RunTarget(t, "snapshot-discard", mappertest.TargetCase{
		Backends: 2, BackendBytes: 2 << 20, Stores: true,
		Table: func(b []string) string {
			return fmt.Sprintf("0 2048 snapshot %s %s P 8 2 discard_zeroes_cow discard_passdown_origin", b[0], b[1])
		},
	})
	mappertest.RunTarget(t, "snapshot-merge", mappertest.TargetCase{
		Backends: 2, BackendBytes: 2 << 20, Stores: true,
		Table: func(b []string) string { return fmt.Sprintf("0 2048 snapshot-merge %s %s P 8", b[0], b[1]) },
	})
}

func newManager(t *testing.T, set *mappertest.Set, events func(mapper.Event)) *mapper.Manager {
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler), Events: events})
	t.Cleanup(func() { m.Close() })
	return m
}

func TestConstructorErrors(t *testing.T) {
	set := mappertest.NewSet(1<<20, "o", "c", "tiny")
	set.Get("tiny").WriteAt([][]byte{[]byte("junkjunk")}, 0)
	m := newManager(t, set, nil)
	for _, tc := range []struct{ table, err string }{
		{"snapshot-origin", "snapshot-origin: want 1 argument <origin>, got 0"},
		{"snapshot-origin o o", "snapshot-origin: want 1 argument <origin>, got 2"},
		{"snapshot-origin nothere", "snapshot-origin: open nothere: no such memory backend"},
		{"snapshot o c P", "snapshot: want at least 4 arguments <origin> <COW device> <P|PO|N> <chunk_size>, got 3"},
		{"snapshot o c X 8", `snapshot: exception store type "X": not P, PO or N`},
		{"snapshot o c PX 8", `snapshot: persistent store option "X": unsupported`},
		{"snapshot o c P 12", "snapshot: chunk size 12: not a power of 2"},
		{"snapshot o c P x", `snapshot: chunk size "x": not a number`},
		{"snapshot o c N 0", "snapshot: chunk size 0: a transient store needs a chunk size"},
		{"snapshot o c P 8 1 discard_passdown_origin", "snapshot: discard_passdown_origin feature depends on discard_zeroes_cow"},
		{"snapshot o c P 8 3 discard_zeroes_cow discard_passdown_origin x", "snapshot: Invalid number of feature arguments"},
		{"snapshot o c P 8 2 discard_zeroes_cow", "snapshot: Invalid number of feature arguments"},
		{"snapshot o c P 8 1 discard_zeroes", "snapshot: Unrecognised feature requested"},
		{"snapshot o c P 8 1 discard_zeroes_cow x", `snapshot: too many arguments: unexpected "x"`},
		{"snapshot o o P 8", "snapshot: COW device o: same as the origin device"},
		{"snapshot o tiny P 8", "snapshot: COW device tiny: invalid or corrupt snapshot (magic 0x6b6e756a)"},
		{"snapshot-merge o c N 8", `snapshot-merge: exception store type "N": snapshot-merge needs a persistent store`},
	} {
		_, err := m.CreateTable("x", "", false, "0 2048 "+tc.table)
		want := "create x: line 1: " + tc.err
		if err == nil || err.Error() != want {
			t.Errorf("%s:\n got  %v\n want %s", tc.table, err, want)
		}
	}
}

func read(t *testing.T, d *mapper.Device, s, n uint64) []byte {
	t.Helper()
	b := make([]byte, n*512)
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: s, Sectors: n, Data: [][]byte{b}}); err != nil {
		t.Fatalf("read %s %d+%d: %v", d.Name(), s, n, err)
	}
	return b
}

// TestFormat checks the COW device byte for byte against the layout of
// dm-formats.md §3 (the kernel's example: origin chunk 50 copied out to
// chunk 2, a snapshot write to chunk 1500 in chunk 3).
func TestFormat(t *testing.T) {
	set := mappertest.NewSet(8<<20, "o", "c")
	set.Get("o").WriteAt([][]byte{pattern(1, 8<<20)}, 0)
	m := newManager(t, set, nil)
	base, _ := m.CreateTable("base", "", false, "0 16384 snapshot-origin o")
	snap, err := m.CreateTable("snap", "", false, "0 16384 snapshot o c P 8")
	if err != nil {
		t.Fatal(err)
	}
	submit(t, base, mapper.OpWrite, 50*8+3, pattern(2, 512))
	submit(t, snap, mapper.OpWrite, 1500*8, pattern(3, 4096))
	if st := snap.Status(mapper.StatusInfo, false)[0].Params; st != "32/16384 16" {
		t.Fatalf("status %q", st)
	}
	if tb := snap.Status(mapper.StatusTable, false)[0].Params; tb != "o c P 8" {
		t.Fatalf("table %q", tb)
	}
	cow := set.Get("c").Bytes()
	le := binary.LittleEndian
	if le.Uint32(cow) != 0x70416e53 || le.Uint32(cow[4:]) != 1 || le.Uint32(cow[8:]) != 1 || le.Uint32(cow[12:]) != 8 || !bytes.Equal(cow[16:4096], make([]byte, 4080)) {
		t.Fatalf("header % x", cow[:16])
	}
	area := cow[4096:8192]
	if le.Uint64(area) != 50 || le.Uint64(area[8:]) != 2 || le.Uint64(area[16:]) != 1500 || le.Uint64(area[24:]) != 3 || !bytes.Equal(area[32:], make([]byte, 4096-32)) {
		t.Fatalf("area 0 % x", area[:48])
	}
	orig := pattern(1, 8<<20)
	if !bytes.Equal(cow[2*4096:3*4096], orig[50*4096:51*4096]) || !bytes.Equal(cow[3*4096:4*4096], pattern(3, 4096)) {
		t.Fatal("data chunks are not where the entries say")
	}
	// A crash loses nothing acknowledged: the exceptions were committed.
	set.Get("c").Crash()
	m.Remove("snap", false)
	snap, err = m.CreateTable("snap", "", false, "0 16384 snapshot o c P 0")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, snap, 50*8, 8), orig[50*4096:51*4096]) || !bytes.Equal(read(t, snap, 1500*8, 8), pattern(3, 4096)) {
		t.Fatal("snapshot content lost across a crash")
	}
	if tb := snap.Status(mapper.StatusTable, false)[0].Params; tb != "o c P 8" {
		t.Fatalf("chunk size 0 did not take the header's: %q", tb)
	}
}

// TestOverflow: a full P snapshot is invalidated (on disk too) with an
// event; a full PO snapshot fails the write, says Overflow and still reads;
// the origin is never affected.
func TestOverflow(t *testing.T) {
	set := mappertest.NewSet(1<<20, "o", "p", "po")
	small := mappertest.NewMem("p", 5*4096) // header, area, 3 data chunks
	smallPO := mappertest.NewMem("po", 5*4096)
	mems := map[string]*mappertest.Mem{"o": set.Get("o"), "p": small, "po": smallPO}
	var mu sync.Mutex
	var events []string
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler),
		Open:   func(n string, ro bool) (mapper.Backend, error) { return mems[n], nil },
		Events: func(e mapper.Event) { mu.Lock(); events = append(events, e.Device+":"+e.Kind); mu.Unlock() }})
	defer m.Close()
	base, _ := m.CreateTable("base", "", false, "0 2048 snapshot-origin o")
	p, _ := m.CreateTable("p", "", false, "0 2048 snapshot o p P 8")
	po, _ := m.CreateTable("po", "", false, "0 2048 snapshot o po PO 8")
	for i := uint64(0); i < 3; i++ {
		submit(t, po, mapper.OpWrite, i*8, pattern(i, 4096))
	}
	if err := po.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 800, Sectors: 1, Data: [][]byte{make([]byte, 512)}}); err == nil {
		t.Fatal("write to a full PO snapshot succeeded")
	}
	if st := po.Status(mapper.StatusInfo, false)[0].Params; st != "Overflow" {
		t.Fatalf("PO status %q", st)
	}
	if !bytes.Equal(read(t, po, 8, 8), pattern(1, 4096)) {
		t.Fatal("overflowed snapshot does not read")
	}
	for i := uint64(0); i < 4; i++ { // the fourth copy-out overflows p
		submit(t, base, mapper.OpWrite, 100*8+i*8, pattern(10+i, 4096))
	}
	if st := p.Status(mapper.StatusInfo, false)[0].Params; st != "Invalid" {
		t.Fatalf("P status %q", st)
	}
	if err := p.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 1, Data: [][]byte{make([]byte, 512)}}); err == nil {
		t.Fatal("invalid snapshot reads")
	}
	if !bytes.Equal(read(t, base, 100*8+24, 8), pattern(13, 4096)) {
		t.Fatal("the origin lost a write because a snapshot overflowed")
	}
	if binary.LittleEndian.Uint32(small.Bytes()[4:]) != 0 {
		t.Fatal("invalid snapshot still marked valid on disk")
	}
	mu.Lock()
	// The origin writes needed space in po too: a copy-out that does not fit
	// invalidates even a PO snapshot, as in the kernel.
	if fmt.Sprint(events) != "[po:overflow po:invalidated p:invalidated]" {
		t.Errorf("events %v", events)
	}
	mu.Unlock()
	// Reloaded, the P snapshot stays invalid.
	m.Remove("p", false)
	p, err := m.CreateTable("p", "", false, "0 2048 snapshot o p P 8")
	if err != nil {
		t.Fatal(err)
	}
	if st := p.Status(mapper.StatusInfo, false)[0].Params; st != "Invalid" {
		t.Fatalf("reloaded P status %q", st)
	}
}

// TestSnapshotRunningOrigin takes a snapshot the way a host does under a
// running guest — suspend the origin, create the snapshot, resume — while
// writers keep going, then merges it back while they go on.
func TestSnapshotRunningOrigin(t *testing.T) {
	set := mappertest.NewSet(4<<20, "o", "c")
	var mu sync.Mutex
	var events []string
	m := newManager(t, set, func(e mapper.Event) { mu.Lock(); events = append(events, e.Kind); mu.Unlock() })
	base, err := m.CreateTable("base", "", false, "0 8192 snapshot-origin o")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var round sync.Mutex // held by a writer during one write
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				buf := bytes.Repeat([]byte{byte(w*50 + i%50)}, 4096)
				round.Lock()
				err := base.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: uint64((w*97+i*13)%1000) * 8, Sectors: 8, Data: [][]byte{buf}})
				round.Unlock()
				if err != nil {
					t.Error(err)
					return
				}
			}
		}(w)
	}
	if err := base.Suspend(false); err != nil {
		t.Fatal(err)
	}
	before := read0(t, set.Get("o"))
	if _, err := m.CreateTable("snap", "", false, "0 8192 snapshot o c P 8"); err != nil {
		t.Fatal(err)
	}
	if err := base.Resume(); err != nil {
		t.Fatal(err)
	}
	snap, _ := m.Get("snap")
	for i := 0; i < 20; i++ {
		if !bytes.Equal(read(t, snap, 0, 8192), before) {
			t.Fatal("snapshot differs from the origin at the time it was taken")
		}
	}
	// Merge it back while the writers go on: afterwards the origin is
	// the snapshot plus whatever they wrote after the switch.
	close(stop)
	wg.Wait()
	submit(t, snap, mapper.OpWrite, 4000, pattern(7, 4096))
	want := read(t, snap, 0, 8192)
	if err := base.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if err := base.Load("0 8192 snapshot-merge o c P 8"); err != nil {
		t.Fatal(err)
	}
	if err := base.Resume(); err != nil {
		t.Fatal(err)
	}
	m.Remove("snap", false)
	var wg2 sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg2.Add(1)
		go func(w int) {
			defer wg2.Done()
			for i := 0; i < 50; i++ {
				s := uint64(w*4096 + i*80)
				buf := pattern(uint64(1000+w*100+i), 4096)
				submit(t, base, mapper.OpWrite, s, buf)
				mu.Lock()
				copy(want[s*512:], buf)
				mu.Unlock()
			}
		}(w)
	}
	wg2.Wait()
	waitMerged(t, base)
	if !bytes.Equal(read(t, base, 0, 8192), want) || !bytes.Equal(read0(t, set.Get("o")), want) {
		t.Fatal("origin after merge differs from the snapshot and later writes")
	}
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(events) != "[merge-finished]" {
		t.Fatalf("events %v", events)
	}
}

func read0(t *testing.T, m *mappertest.Mem) []byte { return m.Bytes()[:8192*512] }

func waitMerged(t *testing.T, d *mapper.Device) {
	t.Helper()
	waitStatus(t, d, regexpMust(`^16/\d+ 16$`))
}

// TestOneMergePerOrigin: while one snapshot of an origin merges, a handover
// of another of its snapshots to snapshot-merge is refused with the
// kernel's error (dm-snap.c __validate_exception_handover); once the merge
// is gone, it is accepted.
func TestOneMergePerOrigin(t *testing.T) {
	set := mappertest.NewSet(4<<20, "o", "c1", "c2")
	m := newManager(t, set, nil)
	base, err := m.CreateTable("base", "", false, "0 8192 snapshot-origin o")
	if err != nil {
		t.Fatal(err)
	}
	s1, err := m.CreateTable("s1", "", false, "0 8192 snapshot o c1 P 8")
	if err != nil {
		t.Fatal(err)
	}
	s2, err := m.CreateTable("s2", "", false, "0 8192 snapshot o c2 P 8")
	if err != nil {
		t.Fatal(err)
	}
	submit(t, base, mapper.OpWrite, 0, pattern(1, 64*4096)) // both snapshots copy out
	submit(t, s1, mapper.OpWrite, 100, pattern(2, 4096))
	submit(t, s2, mapper.OpWrite, 200, pattern(3, 4096))
	want2 := read(t, s2, 0, 8192)

	// s1 merges: the origin device takes its COW over.
	if err := base.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if err := base.Load("0 8192 snapshot-merge o c1 P 8"); err != nil {
		t.Fatal(err)
	}
	if err := base.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove("s1", false); err != nil {
		t.Fatal(err)
	}
	err = s2.Load("0 8192 snapshot-merge o c2 P 8")
	if want := "snapshot-merge: A snapshot is already merging."; err == nil || !strings.HasSuffix(err.Error(), want) {
		t.Fatalf("second merge of one origin: %v, want the kernel's %q", err, want)
	}
	// s2 is untouched and keeps serving its snapshot.
	if !bytes.Equal(read(t, s2, 0, 8192), want2) {
		t.Fatal("the refused merge changed the second snapshot")
	}
	// A plain snapshot reload of s2 (no merge) is still a handover it may do.
	if err := s2.Load("0 8192 snapshot o c2 P 8"); err != nil {
		t.Fatalf("snapshot reload while another merges: %v", err)
	}
	s2.ClearInactive()

	// Once the first merge is done and its table gone, s2 may merge.
	waitMerged(t, base)
	if err := base.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if err := base.Load("0 8192 snapshot-origin o"); err != nil {
		t.Fatal(err)
	}
	if err := base.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := s2.Load("0 8192 snapshot-merge o c2 P 8"); err != nil {
		t.Fatalf("merge after the first one ended: %v", err)
	}
}

// TestDiscardFeatures: discard_zeroes_cow and discard_passdown_origin as
// kernel 6.1's snapshot_map treats a discard, chunk by chunk.
func TestDiscardFeatures(t *testing.T) {
	const chunk = 8 // sectors
	for _, passdown := range []bool{false, true} {
		set := mappertest.NewSet(1<<20, "o", "c", "c2", "c3")
		m := newManager(t, set, nil)
		orig := pattern(1, 1<<20)
		if err := set.Get("o").WriteAt([][]byte{orig}, 0); err != nil {
			t.Fatal(err)
		}
		base, err := m.CreateTable("base", "", false, "0 2048 snapshot-origin o")
		if err != nil {
			t.Fatal(err)
		}
		feats := "1 discard_zeroes_cow"
		if passdown {
			feats = "2 discard_zeroes_cow discard_passdown_origin"
		}
		snap, err := m.CreateTable("snap", "", false, "0 2048 snapshot o c P 8 "+feats)
		if err != nil {
			t.Fatal(err)
		}
		other, err := m.CreateTable("other", "", false, "0 2048 snapshot o c2 P 8")
		if err != nil {
			t.Fatal(err)
		}
		if got := snap.Status(mapper.StatusTable, false)[0].Params; got != "o c P 8 "+feats {
			t.Fatalf("TABLE %q", got)
		}
		// What an export offers the guest: discards with
		// discard_zeroes_cow only.
		if d, _ := snap.Discards(); !d {
			t.Error("a snapshot with discard_zeroes_cow does not offer discards")
		}
		if d, _ := other.Discards(); d {
			t.Error("a snapshot without discard_zeroes_cow offers discards")
		}
		// Chunk 2: written through the snapshot. Chunk 5: copied out by
		// an origin write. Chunk 7: no exception.
		snapData := pattern(2, chunk*512)
		submit(t, snap, mapper.OpWrite, 2*chunk, snapData)
		originNew := pattern(3, chunk*512)
		submit(t, base, mapper.OpWrite, 5*chunk, originNew)
		// Discard chunks 2, 5 and 7 whole, and the second half of chunk 9
		// after giving it an exception.
		submit(t, snap, mapper.OpWrite, 9*chunk, pattern(4, chunk*512))
		for _, c := range []uint64{2, 5, 7} {
			if err := snap.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: c * chunk, Sectors: chunk}); err != nil {
				t.Fatalf("discard chunk %d: %v", c, err)
			}
		}
		if err := snap.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: 9*chunk + 4, Sectors: 4}); err != nil {
			t.Fatal(err)
		}
		zero := make([]byte, chunk*512)
		sec := func(c uint64) []byte { return orig[c*chunk*512 : (c+1)*chunk*512] }
		for _, c := range []uint64{2, 5} {
			if !bytes.Equal(read(t, snap, c*chunk, chunk), zero) {
				t.Errorf("passdown=%v: chunk %d with an exception not zeroed by a whole-chunk discard", passdown, c)
			}
		}
		if !bytes.Equal(read(t, snap, 9*chunk, 4), pattern(4, chunk*512)[:4*512]) || !bytes.Equal(read(t, snap, 9*chunk+4, 4), zero[:4*512]) {
			t.Errorf("passdown=%v: a partial discard of chunk 9 did not discard exactly its COW part", passdown)
		}
		// The origin's view: with passdown every discarded chunk is
		// discarded underneath too (chunk 5's new data included: the
		// kernel passes the discard down whatever the snapshot holds);
		// without it the origin is untouched.
		want5 := originNew
		if passdown {
			want5 = zero
		}
		if !bytes.Equal(read(t, base, 5*chunk, chunk), want5) {
			t.Errorf("passdown=%v: origin chunk 5 wrong", passdown)
		}
		// The other snapshot copied chunk 5 out before: it keeps it.
		if !bytes.Equal(read(t, other, 5*chunk, chunk), sec(5)) {
			t.Errorf("passdown=%v: other snapshot lost its copy of chunk 5", passdown)
		}
		for _, c := range []uint64{2, 7} {
			want := sec(c)
			if passdown {
				want = zero
			}
			if !bytes.Equal(read(t, base, c*chunk, chunk), want) {
				t.Errorf("passdown=%v: origin chunk %d: discarded=%v, want %v", passdown, c, bytes.Equal(read(t, base, c*chunk, chunk), zero), passdown)
			}
			// Chunk 7 has no exception in snap: it shows the origin.
			if c == 7 && !bytes.Equal(read(t, snap, c*chunk, chunk), want) {
				t.Errorf("passdown=%v: snapshot chunk 7 without exception does not show the origin", passdown)
			}
			// Passdown bypasses the origin target: the other snapshot was
			// not copied out to and sees the discard (the kernel's
			// documented effect).
			if !bytes.Equal(read(t, other, c*chunk, chunk), want) {
				t.Errorf("passdown=%v: other snapshot chunk %d differs", passdown, c)
			}
		}
		// Without the feature a discard is refused, as by the kernel.
		plain, err := m.CreateTable("plain", "", false, "0 2048 snapshot o c3 P 8")
		if err != nil {
			t.Fatal(err)
		}
		if err := plain.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: 0, Sectors: chunk}); !errors.Is(err, mapper.ErrUnsupported) {
			t.Errorf("discard without discard_zeroes_cow: %v", err)
		}
		m.Close()
	}
}
