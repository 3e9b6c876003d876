package actlog

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

const mib = 1 << 20

func testConfig(extents int) Config {
	return Config{
		Volumes:    []Volume{{"vda", 1 << 30}, {"vdb", 256 * mib}, {"vdc", 64*mib + 4096}},
		ExtentSize: 4 * mib,
		Extents:    extents,
	}
}

func openLog(t *testing.T, path string, cfg Config) (*Log, *Recovery) {
	t.Helper()
	l, rec, err := Open(path, cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return l, rec
}

// fresh opens a new log and releases nothing: a new log reports every
// volume Full (it cannot know better), which the tests clear.
func fresh(t *testing.T, cfg Config) (*Log, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "vm.actlog")
	l, rec := openLog(t, path, cfg)
	for i, v := range rec.Volumes {
		if !v.Full || !errors.Is(rec.Err, ErrUntrusted) {
			t.Fatalf("new log: volume %s not Full (%+v)", v.Name, rec)
		}
		if err := l.FullResyncDone(i); err != nil {
			t.Fatal(err)
		}
	}
	return l, path
}

func write(t *testing.T, l *Log, vol int, off, n, seq uint64) {
	t.Helper()
	tok, err := l.Begin(vol, off, n)
	if err != nil {
		t.Fatalf("Begin(%d, %d, %d): %v", vol, off, n, err)
	}
	l.End(tok, seq)
}

func sortedHot(l *Log) [][]uint64 {
	h := l.Hot()
	for _, v := range h {
		slices.Sort(v)
	}
	return h
}

// rangesOf turns hot extent lists into the ranges Recovery reports.
func extentsOf(t *testing.T, rec *Recovery, es uint64) [][]uint64 {
	t.Helper()
	out := make([][]uint64, len(rec.Volumes))
	for i, v := range rec.Volumes {
		if v.Full {
			t.Fatalf("volume %s Full: %s", v.Name, v.Reason)
		}
		for _, r := range v.Ranges {
			for x := r.Off / es; x*es < r.Off+r.Len; x++ {
				out[i] = append(out[i], x)
			}
		}
	}
	return out
}

func equalSets(a, b [][]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if len(a[i]) != len(b[i]) || !slices.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

func TestFormatRoundTrip(t *testing.T) {
	geo, err := newGeometry(4*mib, 1237)
	if err != nil {
		t.Fatal(err)
	}
	h := header{epoch: 42, geo: geo, vols: []volumeHeader{{name: "vda", size: 1 << 40, flags: flagFullResync}, {name: "data", size: 7}}}
	b, err := encodeHeader(h)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.epoch != 42 || got.geo != geo || !slices.Equal(got.vols, h.vols) {
		t.Fatalf("header round trip: %+v, want %+v", got, h)
	}
	tx := txn{seq: 13, kind: kindUpdate, updates: []update{{3, entry(1, 99)}, {1236, emptyEntry}}, ctxStart: 1200}
	for i := range contextPerTxn {
		tx.context = append(tx.context, entry(i%2, uint64(i)))
	}
	buf := make([]byte, blockSize)
	encodeSlot(buf, 42, &tx)
	dt, err := decodeSlot(buf, &got, int(13%uint64(geo.slots)))
	if err != nil {
		t.Fatal(err)
	}
	if dt.seq != 13 || !slices.Equal(dt.updates, tx.updates) || !slices.Equal(dt.context, tx.context) || dt.ctxStart != 1200 {
		t.Fatalf("slot round trip: %+v", dt)
	}
	// Every single-bit flip is caught.
	for _, bit := range []int{0, 9 * 8, 16 * 8, 40*8 + 3, blockSize*8 - 1} {
		c := slices.Clone(buf)
		c[bit/8] ^= 1 << (bit % 8)
		if _, err := decodeSlot(c, &got, int(13%uint64(geo.slots))); err == nil {
			t.Errorf("bit %d flipped: slot still valid", bit)
		}
	}
	if _, err := decodeSlot(buf, &got, 0); err == nil {
		t.Error("slot accepted at the wrong ring position")
	}
	other := got
	other.epoch = 41
	if _, err := decodeSlot(buf, &other, int(13%uint64(geo.slots))); err == nil {
		t.Error("slot of another epoch accepted")
	}
}

func TestGeometry(t *testing.T) {
	for _, c := range []struct {
		es uint64
		n  int
	}{{3 * mib, 10}, {2048, 10}, {4 * mib, 0}, {4 * mib, MaxExtents + 1}, {2 << 30, 10}} {
		if _, err := newGeometry(c.es, c.n); err == nil {
			t.Errorf("geometry %d × %d accepted", c.n, c.es)
		}
	}
	for _, n := range []int{1, 411, 412, 1237, MaxExtents} {
		g, err := newGeometry(4*mib, n)
		if err != nil {
			t.Fatal(err)
		}
		// A torn newest slot plus one more lost still leaves a window.
		if g.slots < window(n)+2 {
			t.Errorf("%d extents: %d slots for a window of %d", n, g.slots, window(n))
		}
	}
	if _, _, err := Open(filepath.Join(t.TempDir(), "x"), Config{Volumes: []Volume{{"a", 1}, {"a", 2}}}); err == nil {
		t.Error("duplicate volume names accepted")
	}
}

func TestHotWriteCostsNoTransaction(t *testing.T) {
	l, _ := fresh(t, testConfig(16))
	defer l.Close()
	write(t, l, 0, 0, 4096, 0)
	if s := l.Stats(); s.Transactions != 1 || s.Hot != 1 {
		t.Fatalf("after first write: %+v", s)
	}
	for off := uint64(0); off < 4*mib; off += 64 * 1024 {
		write(t, l, 0, off, 64*1024, 0)
	}
	if s := l.Stats(); s.Transactions != 1 {
		t.Fatalf("writes into a hot extent wrote %d transactions", s.Transactions-1)
	}
	// A write across an extent boundary makes both hot in one transaction.
	write(t, l, 1, 8*mib-512, 1024, 0)
	if s := l.Stats(); s.Transactions != 2 || s.Hot != 3 {
		t.Fatalf("after boundary write: %+v", s)
	}
	if got := sortedHot(l); !equalSets(got, [][]uint64{{0}, {1, 2}, nil}) {
		t.Fatalf("hot = %v", got)
	}
}

func TestBadRanges(t *testing.T) {
	l, _ := fresh(t, testConfig(4))
	defer l.Close()
	for _, c := range []struct {
		vol    int
		off, n uint64
	}{{3, 0, 1}, {-1, 0, 1}, {0, 0, 0}, {2, 64 * mib, 8192}, {0, ^uint64(0) - 10, 100}, {0, 0, 20 * mib}} {
		if _, err := l.Begin(c.vol, c.off, c.n); err == nil {
			t.Errorf("Begin(%d, %d, %d) accepted", c.vol, c.off, c.n)
		}
	}
	if s := l.Stats(); s.Hot != 0 || s.Transactions != 0 {
		t.Fatalf("bad ranges changed the log: %+v", s)
	}
}

// begun runs Begin in a goroutine and reports when it returns.
func begun(l *Log, vol int, off uint64) <-chan error {
	ch := make(chan error, 1)
	go func() {
		tok, err := l.Begin(vol, off, 4096)
		if err == nil {
			l.End(tok, 0)
		}
		ch <- err
	}()
	return ch
}

func blocked(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s: Begin returned (%v) while every extent was busy", what, err)
	case <-time.After(100 * time.Millisecond):
	}
}

func released(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: Begin still blocked", what)
	}
}

func TestLRUEvictsLeastRecentlyUsed(t *testing.T) {
	l, _ := fresh(t, testConfig(3))
	defer l.Close()
	es := 4 * uint64(mib)
	for x := range uint64(3) {
		write(t, l, 0, x*es, 4096, 0)
	}
	write(t, l, 0, 0, 4096, 0) // 0 is now the most recent; 1 the least
	write(t, l, 0, 3*es, 4096, 0)
	if got := sortedHot(l); !equalSets(got, [][]uint64{{0, 2, 3}, nil, nil}) {
		t.Fatalf("hot = %v, want extent 1 evicted", got)
	}
	if s := l.Stats(); s.Evictions != 1 || s.Transactions != 4 {
		t.Fatalf("stats %+v", s)
	}
}

func TestEvictionWaitsForAck(t *testing.T) {
	l, _ := fresh(t, testConfig(2))
	defer l.Close()
	es := 4 * uint64(mib)
	write(t, l, 0, 0, 4096, 10)
	write(t, l, 0, es, 4096, 20)
	ch := begun(l, 1, 0)
	blocked(t, ch, "nothing acknowledged")
	l.Ack(15) // extent 0's write (seq 10) is acknowledged: it may go
	released(t, ch, "after Ack(15)")
	if got := sortedHot(l); !equalSets(got, [][]uint64{{1}, {0}, nil}) {
		t.Fatalf("hot = %v, want vda:0 evicted, vda:1 kept (seq 20 > ack 15)", got)
	}
}

func TestEvictionWaitsForInFlightWrite(t *testing.T) {
	l, _ := fresh(t, testConfig(1))
	defer l.Close()
	tok, err := l.Begin(0, 0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	ch := begun(l, 0, 8*mib)
	blocked(t, ch, "write in flight")
	l.End(tok, 0)
	released(t, ch, "after End")
}

func TestDirtyHoldsUntilClean(t *testing.T) {
	l, _ := fresh(t, testConfig(1))
	defer l.Close()
	if err := l.Dirty(2, 4096, 8192); err != nil {
		t.Fatal(err)
	}
	ch := begun(l, 0, 0)
	blocked(t, ch, "extent in the dirty bitmap")
	if err := l.Clean(2, 0, 4*mib); err != nil {
		t.Fatal(err)
	}
	released(t, ch, "after Clean")
}

// A write spanning several extents must not deadlock with another writer
// holding part of what it needs.
func TestSpanningWritersDoNotDeadlock(t *testing.T) {
	l, _ := fresh(t, testConfig(3))
	defer l.Close()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 60 {
				off := r.Uint64N(1<<30 - 12*mib)
				tok, err := l.Begin(0, off, 8*mib+1)
				if err != nil {
					t.Error(err)
					return
				}
				l.End(tok, 0)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("writers spanning 3 extents with al-extents 3 deadlocked")
	}
}

func TestConcurrentColdWritesShareTransactions(t *testing.T) {
	l, _ := fresh(t, testConfig(128))
	defer l.Close()
	// Hold the first transaction's I/O until every other writer queued.
	const writers = 40
	gate := make(chan struct{})
	first := true
	l.beforeWrite = func() {
		if first {
			first = false
			<-gate
		}
	}
	var wg sync.WaitGroup
	start := func(vol int, off uint64) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, err := l.Begin(vol, off, 4096)
			if err != nil {
				t.Error(err)
				return
			}
			l.End(tok, 0)
		}()
	}
	start(0, 0)
	waitFor(t, func() bool { l.mu.Lock(); defer l.mu.Unlock(); return l.committing })
	for i := range writers {
		start(1, uint64(i%20)*4*mib+uint64(i)*512) // 20 distinct extents, 2 writers each
	}
	waitFor(t, func() bool { l.mu.Lock(); defer l.mu.Unlock(); return len(l.pending) == 21 }) // the batch being written stays in pending until done
	close(gate)
	wg.Wait()
	s := l.Stats()
	if s.Transactions != 2 || s.Extents != 21 || s.Hot != 21 {
		t.Fatalf("41 writers into 21 cold extents: %+v, want 2 transactions", s)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestBatchLargerThanOneTransaction(t *testing.T) {
	l, path := fresh(t, testConfig(500))
	gate := make(chan struct{})
	first := true
	l.beforeWrite = func() {
		if first {
			first = false
			<-gate
		}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); write(t, l, 2, 0, 512, 0) }()
	waitFor(t, func() bool { l.mu.Lock(); defer l.mu.Unlock(); return l.committing })
	for x := range 200 {
		wg.Add(1)
		go func() { defer wg.Done(); write(t, l, 0, uint64(x)*4*mib, 512, 0) }()
	}
	waitFor(t, func() bool { l.mu.Lock(); defer l.mu.Unlock(); return len(l.pending) == 201 })
	close(gate)
	wg.Wait()
	if s := l.Stats(); s.Transactions != 5 || s.Hot != 201 { // 1 + ceil(200/64)
		t.Fatalf("stats %+v, want 5 transactions", s)
	}
	want := sortedHot(l)
	_, rec := openLog(t, path, testConfig(500))
	if got := extentsOf(t, rec, 4*mib); !equalSets(got, want) {
		t.Fatalf("recovered %v, want %v", got, want)
	}
}

func TestCloseMarksClean(t *testing.T) {
	l, path := fresh(t, testConfig(8))
	write(t, l, 0, 0, 4096, 3)
	write(t, l, 1, 0, 4096, 4)
	l.Ack(3)
	if clean, err := l.Close(); clean || err != nil {
		t.Fatalf("Close with seq 4 unacknowledged: clean=%v err=%v", clean, err)
	}
	l, rec := openLog(t, path, testConfig(8))
	if rec.Clean || rec.Err != nil {
		t.Fatalf("recovery %+v", rec)
	}
	if got := extentsOf(t, rec, 4*mib); !equalSets(got, [][]uint64{{0}, {0}, nil}) {
		t.Fatalf("recovered %v", got)
	}
	// Recovered extents are held until Clean.
	if err := l.Clean(0, 0, 1<<30); err != nil {
		t.Fatal(err)
	}
	if clean, _ := l.Close(); clean {
		t.Fatal("Close clean while vdb:0 still held")
	}
	// Cooling is lazy: vda:0 is released but stays hot until evicted.
	l, rec = openLog(t, path, testConfig(8))
	if got := extentsOf(t, rec, 4*mib); !equalSets(got, [][]uint64{{0}, {0}, nil}) {
		t.Fatalf("recovered %v", got)
	}
	l.Clean(0, 0, 4*mib)
	l.Clean(1, 0, 4*mib)
	write(t, l, 2, 0, 4096, 0)
	if clean, err := l.Close(); !clean || err != nil {
		t.Fatalf("Close with everything acknowledged: clean=%v err=%v", clean, err)
	}
	_, rec = openLog(t, path, testConfig(8))
	if !rec.Clean || rec.Err != nil {
		t.Fatalf("recovery after clean close: %+v", rec)
	}
	for _, v := range rec.Volumes {
		if v.Full || len(v.Ranges) != 0 || v.Bytes != 0 {
			t.Fatalf("clean log reports %+v", v)
		}
	}
}

// A model run: random writes, acks, dirty and clean; at random points the
// log is abandoned (as by a crash: every transaction was fdatasync'd) and
// reopened; the recovered set must equal the hot set, including after the
// ring wrapped many times.
func TestRecoveryEqualsHotSet(t *testing.T) {
	for _, n := range []int{5, 411, 700} {
		cfg := testConfig(n)
		l, path := fresh(t, cfg)
		r := rand.New(rand.NewPCG(uint64(n), 7))
		seq := uint64(0)
		for round := range 8 {
			held := 0
			for range 300 {
				vol := r.IntN(3)
				size := cfg.Volumes[vol].Size
				seq++
				// One goroutine: keep enough elements evictable for
				// the next write (up to 2 extents) or it waits forever.
				if held >= n-3 {
					for v := range cfg.Volumes {
						l.Clean(v, 0, cfg.Volumes[v].Size)
					}
					held = 0
				}
				l.Ack(seq - 1)
				switch k := r.IntN(10); {
				case k < 8:
					off := r.Uint64N(size - 4096)
					write(t, l, vol, off, min(4096+r.Uint64N(2*mib), size-off), seq)
				case k < 9 && n > 4:
					if err := l.Dirty(vol, r.Uint64N(size-4096), 4096); err != nil {
						t.Fatal(err)
					}
					held++
				default:
					l.Clean(vol, 0, size)
				}
			}

			want := sortedHot(l)
			l.f.Close()
			var rec *Recovery
			l, rec = openLog(t, path, cfg)
			if got := extentsOf(t, rec, 4*mib); !equalSets(got, want) {
				t.Fatalf("al-extents %d round %d: recovered %v, want %v", n, round, got, want)
			}
			if s := l.Stats(); s.Hot > n {
				t.Fatalf("hot %d > al-extents %d", s.Hot, n)
			}
			// Open returns the recovered extents held: release them.
			for v := range cfg.Volumes {
				l.Clean(v, 0, cfg.Volumes[v].Size)
			}
		}
		l.Close()
	}
}

// lastSlot returns the file offset of the newest transaction.
func lastSlot(l *Log) int64 { return slotOffset(l.seq, l.geo.slots) }

func TestTornNewestSlot(t *testing.T) {
	cfg := testConfig(4)
	l, path := fresh(t, cfg)
	for x := range uint64(4) {
		write(t, l, 0, x*4*mib, 4096, 0)
	}
	before := sortedHot(l)
	write(t, l, 1, 0, 4096, 0) // evicts vda:0, adds vdb:0
	off := lastSlot(l)
	l.f.Close()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The last sectors landed, the first two kept the old (empty) slot's bytes.
	if _, err := f.WriteAt(make([]byte, 1024), off); err != nil {
		t.Fatal(err)
	}
	f.Close()
	_, rec := openLog(t, path, cfg)
	if rec.Err != nil {
		t.Fatalf("torn newest slot: %v", rec.Err)
	}
	if got := extentsOf(t, rec, 4*mib); !equalSets(got, before) {
		t.Fatalf("recovered %v, want the state before the torn transaction %v", got, before)
	}
}

func TestUntrustedLogs(t *testing.T) {
	cfg := testConfig(1237) // a window of 4 transactions
	corrupt := map[string]func(t *testing.T, l *Log, b []byte){
		"wrong magic": func(t *testing.T, l *Log, b []byte) { copy(b, "NOTALOG!") },
		"header CRC":  func(t *testing.T, l *Log, b []byte) { b[20] ^= 1 },
		"wrong geometry": func(t *testing.T, l *Log, b []byte) {
			b[36]++ // slot count, CRC recomputed: a consistent but impossible header
			h := crcBlock(b[:blockSize], 12)
			b[12], b[13], b[14], b[15] = byte(h), byte(h>>8), byte(h>>16), byte(h>>24)
		},
		"all slots bad": func(t *testing.T, l *Log, b []byte) {
			for s := range l.geo.slots {
				b[blockSize*(1+s)+100] ^= 0xff
			}
		},
		"incomplete window": func(t *testing.T, l *Log, b []byte) {
			// The transaction before the newest is lost: only one
			// transaction's context remains, 411 of 1237 elements.
			b[slotOffset(l.seq-1, l.geo.slots)+700] ^= 1
		},
		"truncated": func(t *testing.T, l *Log, b []byte) {},
	}
	for name, f := range corrupt {
		t.Run(name, func(t *testing.T) {
			l, path := fresh(t, cfg)
			for x := range uint64(10) {
				write(t, l, 0, x*4*mib, 4096, 0)
			}
			l.f.Close()
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			f(t, l, b)
			if name == "truncated" {
				b = b[:blockSize*3]
			}
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			l, rec := openLog(t, path, cfg)
			if !errors.Is(rec.Err, ErrUntrusted) {
				t.Fatalf("recovery trusted a log with %s: %+v", name, rec)
			}
			for _, v := range rec.Volumes {
				if !v.Full || v.Reason == "" || v.Bytes != cfg.Volumes[0].Size && v.Name == "vda" {
					t.Fatalf("volume %+v not Full", v)
				}
			}
			t.Logf("%s: %s", name, rec.Volumes[0].Reason)
			// The Full flag survives a crash before the resync is done...
			l.f.Close()
			l, rec = openLog(t, path, cfg)
			if rec.Err != nil || !rec.Volumes[0].Full {
				t.Fatalf("after a crash during the full resync: %+v", rec.Volumes[0])
			}
			// ...and is gone once it is.
			for i := range rec.Volumes {
				if err := l.FullResyncDone(i); err != nil {
					t.Fatal(err)
				}
			}
			l.f.Close()
			_, rec = openLog(t, path, cfg)
			if rec.Err != nil || rec.Volumes[0].Full {
				t.Fatalf("after FullResyncDone: %+v", rec.Volumes[0])
			}
		})
	}
}

func TestReopenWithNewGeometryAndVolumes(t *testing.T) {
	cfg := testConfig(16)
	l, path := fresh(t, cfg)
	write(t, l, 0, 4*mib+100, 100, 0)
	write(t, l, 1, 0, 100, 0)
	l.f.Close()
	cfg2 := Config{
		Volumes:    []Volume{{"vdb", 256 * mib}, {"vda", 1 << 30}, {"vdd", mib}},
		ExtentSize: 1 * mib,
		Extents:    40,
	}
	l, rec := openLog(t, path, cfg2)
	defer l.Close()
	if rec.Err != nil {
		t.Fatal(rec.Err)
	}
	want := []VolumeRecovery{
		{Name: "vdb", Ranges: []Range{{0, 4 * mib}}, Bytes: 4 * mib},
		{Name: "vda", Ranges: []Range{{4 * mib, 4 * mib}}, Bytes: 4 * mib},
		{Name: "vdd", Full: true, Reason: "volume was not in the activity log", Bytes: mib},
	}
	for i, w := range want {
		g := rec.Volumes[i]
		if g.Name != w.Name || g.Full != w.Full || g.Reason != w.Reason || g.Bytes != w.Bytes || !slices.Equal(g.Ranges, w.Ranges) {
			t.Errorf("volume %d: %+v, want %+v", i, g, w)
		}
	}
	if s := l.Stats(); s.Hot != 8 {
		t.Fatalf("hot %d, want 8 1-MiB extents", s.Hot)
	}
}

func TestRecoveredSetLargerThanNewCapacity(t *testing.T) {
	cfg := testConfig(16)
	l, path := fresh(t, cfg)
	for x := range uint64(10) {
		write(t, l, 1, x*4*mib, 100, 0)
	}
	write(t, l, 0, 0, 100, 0)
	l.f.Close()
	cfg.Extents = 4
	l, rec := openLog(t, path, cfg)
	defer l.Close()
	if v := rec.Volumes[0]; v.Full || v.Bytes != 4*mib {
		t.Fatalf("vda: %+v", v)
	}
	if v := rec.Volumes[1]; !v.Full || v.Bytes != 256*mib {
		t.Fatalf("vdb: %+v, want Full: 10 extents do not fit 4", v)
	}
}
