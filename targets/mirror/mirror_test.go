package mirror_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	_ "github.com/vhostdm/vhostdm/targets"
	_ "github.com/vhostdm/vhostdm/targets/mirror"
)

func TestConformance(t *testing.T) {
	mappertest.RunTarget(t, "mirror-core", mappertest.TargetCase{
		Backends: 2, BackendBytes: 1 << 20, Stores: true,
		Table: func(b []string) string { return fmt.Sprintf("0 2048 mirror core 2 256 nosync 2 %s 0 %s 0", b[0], b[1]) },
	})
	mappertest.RunTarget(t, "mirror-disk", mappertest.TargetCase{
		Backends: 4, BackendBytes: 1 << 20, Stores: true,
		Table: func(b []string) string {
			return fmt.Sprintf("0 1536 mirror disk 2 %s 128 3 %s 0 %s 8 %s 16 1 handle_errors", b[3], b[0], b[1], b[2])
		},
	})
}

func TestConstructorErrors(t *testing.T) {
	set := mappertest.NewSet(1<<20, "a", "b", "l")
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	for _, tc := range []struct{ table, err string }{
		{"mirror core", "want <log_type> <#log_args> ..., got 1 arguments"},
		{"mirror core x", `log argument count "x": not a number`},
		{"mirror core 3 1024 2 a 0 b 0", `mirror count "0": must be 2 to 9`}, // the log took "1024 2 a"
		{"mirror core 9 1024", "log argument count 9: only 1 arguments follow"},
		{"mirror bogus 1 1024 2 a 0 b 0", `dirty log bogus: unknown dirty log type "bogus"`},
		{"mirror core 1 1000 2 a 0 b 0", "dirty log core: region size 1000: not a power of 2 no larger than the target length 2048"},
		{"mirror core 1 1 2 a 0 b 0", `dirty log core: region size "1": must be 2 to 1073741824`},
		{"mirror core 2 1024 often 2 a 0 b 0", `dirty log core: sync argument "often": not sync or nosync`},
		{"mirror core 1 1024 1 a 0", `mirror count "1": must be 2 to 9`},
		{"mirror core 1 1024 2 a 0 b", "mirror count 2: want 4 <dev> <offset> arguments, got 3"},
		{"mirror core 1 1024 2 a 0 b 0 1 keep_log", "feature keep_log: requires the handle_errors feature"},
		{"mirror core 1 1024 2 a 0 b 0 1 fast", `feature "fast": unrecognised`},
		{"mirror core 1 1024 2 a 0 b 0 2 handle_errors handle_errors", `feature "handle_errors": duplicated`},
		{"mirror core 1 1024 2 a 0 b 0 4 handle_errors", `feature count "4": must be 0 to 3`},
		{"mirror core 1 1024 2 a 0 b 0 1 handle_errors x", `too many arguments: unexpected "x"`},
		{"mirror disk 1 1024 2 a 0 b 0", "dirty log disk: want <log_device> <region_size> [sync|nosync], got 1 arguments"},
		{"mirror core 1 1024 2 a 0 b 1000", "b too small for target: start=1000, len=2048, dev_size=2048"},
	} {
		_, err := m.CreateTable("x", "", false, "0 2048 "+tc.table)
		want := "create x: line 1: mirror: " + tc.err
		if err == nil || err.Error() != want {
			t.Errorf("%s:\n got  %v\n want %s", tc.table, err, want)
		}
	}
}

func newManager(t *testing.T, set *mappertest.Set, events func(mapper.Event)) *mapper.Manager {
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler), Events: events})
	t.Cleanup(func() { m.Close() })
	return m
}

func status(d *mapper.Device) string { return d.Status(mapper.StatusInfo, false)[0].Params }

func waitStatus(t *testing.T, d *mapper.Device, re string) {
	t.Helper()
	r := regexp.MustCompile(re)
	for i := 0; i < 2000; i++ {
		if r.MatchString(status(d)) {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("status %q never matched %s", status(d), re)
}

func fill(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func submit(t *testing.T, d *mapper.Device, op mapper.Op, s uint64, data []byte) error {
	return d.Submit(&mapper.Request{Op: op, Sector: s, Sectors: uint64(len(data)) / 512, Data: [][]byte{data}})
}

// A new leg is brought to identical content by the initial resync, and
// writes during the resync land on both legs.
func TestResync(t *testing.T) {
	set := mappertest.NewSet(4<<20, "a", "b", "log")
	data := fill(1, 4<<20)
	set.Get("a").WriteAt([][]byte{data}, 0)
	var mu sync.Mutex
	var events []string
	m := newManager(t, set, func(e mapper.Event) { mu.Lock(); events = append(events, e.Kind); mu.Unlock() })
	d, err := m.CreateTable("m", "", false, "0 8192 mirror disk 2 log 64 2 a 0 b 0")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		buf := fill(uint64(100+i), 4096)
		s := uint64(i*160) % 8184
		if err := submit(t, d, mapper.OpWrite, s, buf); err != nil {
			t.Fatal(err)
		}
		copy(data[s*512:], buf)
	}
	waitStatus(t, d, `^2 a b 128/128 1 AA 3 disk log A$`)
	if !bytes.Equal(set.Get("a").Bytes(), data) || !bytes.Equal(set.Get("b").Bytes(), data) {
		t.Fatal("legs differ from the data after resync")
	}
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(strings.Join(events, " "), "in-sync") {
		t.Fatalf("no in-sync event: %v", events)
	}
}

// A failing leg is marked D with an event and I/O continues on the other;
// the regions written meanwhile are out of sync and are resynced once the
// leg is replaced.
func TestLegFailure(t *testing.T) {
	set := mappertest.NewSet(4<<20, "a", "b", "c", "log")
	var mu sync.Mutex
	var events []mapper.Event
	m := newManager(t, set, func(e mapper.Event) { mu.Lock(); events = append(events, e); mu.Unlock() })
	if _, err := m.CreateTable("bleg", "", false, "0 8192 linear b 0"); err != nil {
		t.Fatal(err)
	}
	d, err := m.CreateTable("m", "", false, "0 8192 mirror disk 3 log 1024 nosync 2 a 0 /dev/mapper/bleg 0 1 handle_errors")
	if err != nil {
		t.Fatal(err)
	}
	// The leg fails: replace its table by the error target.
	bleg, _ := m.Get("bleg")
	if err := bleg.Reload("0 8192 error"); err != nil {
		t.Fatal(err)
	}
	data := fill(2, 4096)
	if err := submit(t, d, mapper.OpWrite, 3000, data); err != nil {
		t.Fatalf("write with one failed leg: %v", err)
	}
	if st := status(d); st != "2 a /dev/mapper/bleg 7/8 1 AD 3 disk log A" {
		t.Fatalf("status after leg failure %q", st)
	}
	mu.Lock()
	if len(events) != 1 || events[0].Kind != "leg-failed" || events[0].Data["leg"] != 1 {
		t.Fatalf("events %+v", events)
	}
	mu.Unlock()
	back := make([]byte, 4096)
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 3000, Sectors: 8, Data: [][]byte{back}}); err != nil || !bytes.Equal(back, data) {
		t.Fatalf("read back after leg failure: %v", err)
	}
	for i := 0; i < 20; i++ { // reads of in-sync regions avoid the dead leg
		if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 8, Data: [][]byte{back}}); err != nil {
			t.Fatalf("read: %v", err)
		}
	}
	// Replace the leg: the out-of-sync region is recovered, no other.
	if err := d.Reload("0 8192 mirror disk 2 log 1024 2 a 0 b 0 1 handle_errors"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, d, `^2 a b 8/8 1 AA `)
	a, b := set.Get("a").Bytes(), set.Get("b").Bytes()
	if !bytes.Equal(a[2048*512:3072*512], b[2048*512:3072*512]) {
		t.Fatal("region 2 was not resynced")
	}
}

// The disk log survives a restart (a crash of the process): only the
// regions that were dirty are resynced.
func TestDiskLogRestart(t *testing.T) {
	set := mappertest.NewSet(4<<20, "a", "b", "log")
	m := newManager(t, set, nil)
	table := "0 8192 mirror disk 2 log 1024 2 a 0 b 0"
	d, err := m.CreateTable("m", "", false, table)
	if err != nil {
		t.Fatal(err)
	}
	waitStatus(t, d, `8/8`)
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	// A write in flight at the crash: its region is marked dirty on disk
	// before the write is issued; its data on the legs may differ.
	if err := submit(t, d, mapper.OpWrite, 5*1024+8, fill(3, 4096)); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b", "log"} {
		set.Get(n).Crash()
	}
	set.Get("b").WriteAt([][]byte{fill(4, 1024*512)}, 5*1024*512) // region 5 differs
	set.Get("b").WriteAt([][]byte{fill(5, 1024*512)}, 6*1024*512) // clean region 6 too
	m2 := newManager(t, set, nil)
	d2, err := m2.CreateTable("m", "", false, table)
	if err != nil {
		t.Fatal(err)
	}
	waitStatus(t, d2, `8/8`)
	a, b := set.Get("a").Bytes(), set.Get("b").Bytes()
	if !bytes.Equal(a[5*1024*512:6*1024*512], b[5*1024*512:6*1024*512]) {
		t.Fatal("dirty region 5 was not resynced after restart")
	}
	if bytes.Equal(a[6*1024*512:7*1024*512], b[6*1024*512:7*1024*512]) {
		t.Fatal("clean region 6 was resynced: the log was not used")
	}
}

func TestStatusLines(t *testing.T) {
	set := mappertest.NewSet(1<<20, "254:16", "254:32", "254:48")
	m := newManager(t, set, nil)
	for _, tc := range []struct{ table, info, tbl string }{
		// Lines as kernel 6.1 prints them (dm-formats.md §6.4).
		{"0 2048 mirror core 1 256 2 254:16 0 254:32 0", `^2 254:16 254:32 \d/8 1 AA 1 core$`, "core 1 256 2 254:16 0 254:32 0"},
		{"0 2048 mirror core 2 256 nosync 2 254:16 0 254:32 0 1 handle_errors", `^2 254:16 254:32 8/8 1 AA 1 core$`, "core 2 256 nosync 2 254:16 0 254:32 0 1 handle_errors"},
		{"0 2048 mirror disk 2 254:48 256 2 254:16 0 254:32 0", `^2 254:16 254:32 \d/8 1 AA 3 disk 254:48 A$`, "disk 2 254:48 256 2 254:16 0 254:32 0"},
		{"0 2048 mirror disk 3 254:48 256 sync 2 254:16 0 254:32 0 2 handle_errors keep_log", `^2 254:16 254:32 \d/8 1 AA 3 disk 254:48 A$`, "disk 3 254:48 256 sync 2 254:16 0 254:32 0 2 handle_errors keep_log"},
	} {
		d, err := m.CreateTable("s", "", false, tc.table)
		if err != nil {
			t.Fatal(err)
		}
		if st := status(d); !regexp.MustCompile(tc.info).MatchString(st) {
			t.Errorf("%s: status %q, want %s", tc.table, st, tc.info)
		}
		if tb := d.Status(mapper.StatusTable, false)[0].Params; tb != tc.tbl {
			t.Errorf("%s: table %q", tc.table, tb)
		}
		m.Remove("s", false)
	}
}

// TestResyncRate: max_recovery_rate holds the resync's copy rate within
// bounds (never faster; not stalled), and the legs end identical.
func TestResyncRate(t *testing.T) {
	const legBytes = 6 << 20
	syncTime := func(t *testing.T, feats string) (time.Duration, *mappertest.Set) {
		set := mappertest.NewSet(legBytes, "a", "b")
		a := fill(7, legBytes)
		if err := set.Get("a").WriteAt([][]byte{a}, 0); err != nil {
			t.Fatal(err)
		}
		m := newManager(t, set, nil)
		start := time.Now()
		d, err := m.CreateTable("m", "", false, fmt.Sprintf("0 %d mirror core 2 512 sync 2 a 0 b 0%s", legBytes/512, feats))
		if err != nil {
			t.Fatal(err)
		}
		r := regexp.MustCompile(`^2 a b 24/24 1 AA `)
		for !r.MatchString(status(d)) {
			if time.Since(start) > time.Minute {
				t.Fatalf("not in sync after a minute: %s", status(d))
			}
			time.Sleep(5 * time.Millisecond)
		}
		took := time.Since(start)
		if !bytes.Equal(set.Get("b").Bytes(), a) {
			t.Fatal("legs differ after the resync")
		}
		return took, set
	}
	free, _ := syncTime(t, "")
	const rate = 2048 // kB/s: 6 MiB in 3 s
	want := time.Duration(legBytes / 1024 * int64(time.Second) / rate)
	got, _ := syncTime(t, fmt.Sprintf(" 1 max_recovery_rate:%d", rate))
	t.Logf("6 MiB resync: %v unthrottled, %v at %d kB/s (%.0f kB/s, want %d)", free, got, rate, float64(legBytes/1024)/got.Seconds(), rate)
	// The throttle admits the first piece at once: allow one piece early.
	piece := time.Duration(int64(rate*1024/8) * int64(time.Second) / (rate * 1024))
	if got < want-piece {
		t.Errorf("resync took %v, faster than %d kB/s allows (%v)", got, rate, want)
	}
	if got > 2*want+2*time.Second {
		t.Errorf("resync took %v at %d kB/s, want about %v", got, rate, want)
	}
}

func TestResyncRateTable(t *testing.T) {
	set := mappertest.NewSet(1<<20, "a", "b")
	m := newManager(t, set, nil)
	d, err := m.CreateTable("m", "", false, "0 2048 mirror core 1 256 2 a 0 b 0 2 max_recovery_rate:512 handle_errors")
	if err != nil {
		t.Fatal(err)
	}
	if got := d.Status(mapper.StatusTable, false)[0].Params; got != "core 1 256 2 a 0 b 0 2 handle_errors max_recovery_rate:512" {
		t.Fatalf("TABLE %q", got)
	}
	for _, tc := range []struct{ feats, err string }{
		{"1 max_recovery_rate:0", `feature "max_recovery_rate:0": rate must be 1 to 2147483647 kB/s`},
		{"1 max_recovery_rate:x", `feature "max_recovery_rate:x": rate must be 1 to 2147483647 kB/s`},
		{"1 max_recovery_rate:2147483648", `feature "max_recovery_rate:2147483648": rate must be 1 to 2147483647 kB/s`},
		{"2 max_recovery_rate:1 max_recovery_rate:2", `feature "max_recovery_rate:2": duplicated`},
	} {
		_, err := m.CreateTable("x", "", false, "0 2048 mirror core 1 256 2 a 0 b 0 "+tc.feats)
		if want := "create x: line 1: mirror: " + tc.err; err == nil || err.Error() != want {
			t.Errorf("%s:\n got  %v\n want %s", tc.feats, err, want)
		}
	}
}

// crashBeforeFlush is a leg whose device loses what it has not made
// durable just before the first flush that comes through it, as a drive
// reset would; the flush reports the loss (mappertest's crash model).
type crashBeforeFlush struct {
	mapper.Backend
	mem  *mappertest.Mem
	once *sync.Once
}

func (c crashBeforeFlush) Flush() error {
	c.once.Do(c.mem.Crash)
	return c.Backend.Flush()
}

// A resync copy that a leg loses before its flush leaves the region out of
// sync: reads keep coming from the default leg, and the log keeps it dirty
// so that a restart resyncs it instead of reading the leg that lost it.
func TestResyncCopyLostBeforeFlush(t *testing.T) {
	set := mappertest.NewSet(1<<20, "a", "b", "log")
	data := fill(9, 1<<20)
	if err := set.Get("a").WriteAt([][]byte{data}, 0); err != nil {
		t.Fatal(err)
	}
	if err := set.Get("a").Flush(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	open := func(name string, readOnly bool) (mapper.Backend, error) {
		b, err := set.Open(name, readOnly)
		if err == nil && name == "b" {
			b = crashBeforeFlush{b, set.Get("b"), &once}
		}
		return b, err
	}
	m := mapper.NewManager(mapper.ManagerOptions{Open: open, Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(func() { m.Close() })
	const table = "0 2048 mirror disk 2 log 256 2 a 0 b 0"
	d, err := m.CreateTable("m", "", false, table)
	if err != nil {
		t.Fatal(err)
	}
	// The first flush of b is the one after the copy of region 0.
	waitStatus(t, d, `^2 a b (7/8 1 AF|8/8 1 A[AF]) `)
	if st := status(d); !strings.HasPrefix(st, "2 a b 7/8 1 AF ") {
		t.Errorf("status %q: region 0 counted in sync although its copy was lost", st)
	}
	region0 := data[:256*512]
	readRegion0 := func(d *mapper.Device, when string) {
		t.Helper()
		for i := 0; i < 4; i++ { // reads of an in-sync region alternate between the legs
			back := make([]byte, len(region0))
			if err := submit(t, d, mapper.OpRead, 0, back); err != nil {
				t.Fatalf("%s: read: %v", when, err)
			}
			if !bytes.Equal(back, region0) {
				t.Fatalf("%s: region 0 read from the leg that lost its resync copy", when)
			}
		}
	}
	readRegion0(d, "before the restart")
	// A write and a flush put the log's marks on its device.
	w := fill(10, 4096)
	if err := submit(t, d, mapper.OpWrite, 5*256, w); err != nil {
		t.Fatal(err)
	}
	copy(data[5*256*512:], w)
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	set.Kill()
	d2, err := newManager(t, set, nil).CreateTable("m", "", false, table)
	if err != nil {
		t.Fatal(err)
	}
	readRegion0(d2, "after the restart")
	waitStatus(t, d2, `^2 a b 8/8 1 AA `)
	readRegion0(d2, "after the resync")
	if a, b := set.Get("a").Bytes(), set.Get("b").Bytes(); !bytes.Equal(a, data) || !bytes.Equal(b, data) {
		t.Fatal("legs differ from the data after the resync")
	}
}
