package ploop_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	"github.com/vhostdm/vhostdm/targets/ploop"
)

func TestConformance(t *testing.T) {
	mappertest.RunTarget(t, "ploop", mappertest.TargetCase{
		Backends:     1,
		BackendBytes: 1 << 20,
		Table:        func(b []string) string { return "0 512 ploop 3 " + b[0] },
		Stores:       true,
		// The suite discards whole 4 KiB clusters, which read zeros after.
		ZeroesOnDiscard: true,
	})
}

func TestConstructorErrors(t *testing.T) {
	dir := t.TempDir()
	img := emptyFile(t, dir, "top.hds")
	base := filepath.Join(dir, "base.hds")
	mustRun(t, tool(t, "qemu-img", "qemu-utils"), "create", "-q", "-f", "parallels", base, "1M")
	junk := filepath.Join(dir, "junk")
	os.WriteFile(junk, bytes.Repeat([]byte("x"), 4096), 0o644)
	for _, tc := range []struct{ table, want string }{
		{"0 2048 ploop", "want <cluster_log> <top delta image> [<delta image>...], got 0 arguments"},
		{"0 2048 ploop 11", "got 1 arguments"},
		{"0 2048 ploop 2 " + img, `cluster_log "2": must be 3 to 14`},
		{"0 2048 ploop x " + img, `cluster_log "x": not a number`},
		{"0 2048 ploop 11 " + img + " " + img, "listed twice"},
		{"0 2048 ploop 11 " + filepath.Join(dir, "missing"), "no such file"},
		{"0 2048 ploop 11 " + img + " " + junk, "not a ploop1 image"},
		{"0 2048 ploop 9 " + img + " " + base, "has clusters of 2048 sectors, the table says 512"},
		{"0 4096 ploop 11 " + base, "target length 4096: more than the image size 2048 sectors"},
	} {
		m := newManager(t)
		_, err := m.CreateTable("bad", "", false, tc.table)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.table, err, tc.want)
		}
		m.Close()
	}
}

// TestQemuWritten serves images that qemu-img and qemu-io wrote, a base
// and a delta over it, and reads exactly what qemu-io wrote.
func TestQemuWritten(t *testing.T) {
	qimg, qio := tool(t, "qemu-img", "qemu-utils"), tool(t, "qemu-io", "qemu-utils")
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.hds"), filepath.Join(dir, "top.hds")
	const size = 8 << 20
	mustRun(t, qimg, "create", "-q", "-f", "parallels", base, "8M")
	mustRun(t, qimg, "create", "-q", "-f", "parallels", top, "8M")
	want := make([]byte, size)
	write := func(img string, b byte, off, n int) {
		mustRun(t, qio, "-f", "parallels", "-c", fmt.Sprintf("write -P %d %d %d", b, off, n), img)
	}
	for _, w := range []struct {
		img    string
		b      byte
		off, n int
	}{
		{base, 0xab, 0, 1 << 20}, {base, 0x11, 3<<20 + 4096, 8192}, {base, 0x22, 7 << 20, 1 << 20},
		{top, 0xcd, 512 << 10, 1 << 20}, {top, 0x33, 7<<20 + 512, 512},
	} {
		write(w.img, w.b, w.off, w.n)
	}
	// qemu has no backing for parallels: the top's partial cluster holds
	// zeros around the write, not the base's data.
	copy(want, bytes.Repeat([]byte{0xab}, 1<<20))
	copy(want[3<<20+4096:], bytes.Repeat([]byte{0x11}, 8192))
	copy(want[7<<20:], bytes.Repeat([]byte{0x22}, 1<<20))
	clear(want[0 : 2<<20])
	copy(want[512<<10:], bytes.Repeat([]byte{0xcd}, 1<<20))
	clear(want[7<<20 : 8<<20])
	copy(want[7<<20+512:], bytes.Repeat([]byte{0x33}, 512))

	m := newManager(t)
	d := create(t, m, "q", fmt.Sprintf("0 %d ploop 11 %s %s", size/512, top, base))
	if s := diff(readAll(t, d), want); s != "" {
		t.Fatalf("device differs from what qemu-io wrote: %s", s)
	}
	if got := status(d, mapper.StatusInfo); got != "2 v2 2048 o 3/8" {
		t.Errorf("INFO %q", got)
	}
	// Our writes into qemu's image stay readable by qemu.
	submit(t, d, mapper.OpWrite, 5<<11+8, bytes.Repeat([]byte{0x44}, 4096))
	copy(want[5<<20+4096:], bytes.Repeat([]byte{0x44}, 4096))
	if err := m.Remove("q", false); err != nil {
		t.Fatal(err)
	}
	// ploop check is not asked: it refuses qemu-io's sparse data clusters
	// whoever serves the image.
	qemuCheck(t, top)
	raw := qemuRaw(t, top)
	topOnly := append([]byte(nil), want...)
	clear(topOnly[2<<20 : 5<<20])
	clear(topOnly[6<<20 : 7<<20])
	if s := diff(raw, topOnly); s != "" {
		t.Fatalf("qemu-img reads the top differently: %s", s)
	}
}

// TestExternalJudge writes through our target into a new base, takes a
// snapshot, writes more, and has qemu-img and ploop check both images;
// then merges and has qemu-img read the whole disk from the top.
func TestExternalJudge(t *testing.T) {
	dir := t.TempDir()
	base := emptyFile(t, dir, "base.hds")
	top := emptyFile(t, dir, "top.hds")
	const sectors = 16 << 11 // 16 MiB
	m := newManager(t)
	d := create(t, m, "j", fmt.Sprintf("0 %d ploop 11 %s", sectors, base))
	model := make([]byte, sectors*512)
	w := func(sector uint64, data []byte) {
		submit(t, d, mapper.OpWrite, sector, data)
		copy(model[sector*512:], data)
	}
	w(0, pattern(1, 1<<20))       // a whole cluster
	w(2048*3+7, pattern(2, 4096)) // partial, unaligned
	w(2048*9-8, pattern(3, 8192)) // across two clusters
	w(sectors-1, pattern(4, 512)) // the last sector
	submit(t, d, mapper.OpFlush, 0, nil)
	atSnap := append([]byte(nil), model...)
	message(t, d, "snapshot", top)
	if got := status(d, mapper.StatusTable); got != "11 "+top+" "+base {
		t.Errorf("TABLE after snapshot %q", got)
	}
	touched := map[int]bool{}
	w2 := func(sector uint64, data []byte) {
		w(sector, data)
		for c := sector / 2048; c <= (sector+uint64(len(data))/512-1)/2048; c++ {
			touched[int(c)] = true
		}
	}
	w2(2048*3+100, pattern(5, 512)) // partial over a base cluster: copied up
	w2(2048*5, pattern(6, 3<<20))   // new clusters
	w2(2048*15+2000, pattern(7, 4096))
	if s := diff(readAll(t, d), model); s != "" {
		t.Fatalf("device after snapshot: %s", s)
	}
	if err := m.Remove("j", false); err != nil {
		t.Fatal(err)
	}
	for _, img := range []string{base, top} {
		qemuCheck(t, img)
		ploopCheck(t, img)
	}
	if s := diff(qemuRaw(t, base), atSnap); s != "" {
		t.Fatalf("qemu-img reads the snapshot: %s", s)
	}
	topWant := make([]byte, len(model))
	for c := range touched {
		copy(topWant[c<<20:(c+1)<<20], model[c<<20:])
	}
	if s := diff(qemuRaw(t, top), topWant); s != "" {
		t.Fatalf("qemu-img reads the top delta: %s", s)
	}

	// Reopen the stack, merge the base into the top: the top alone is
	// then the whole disk.
	d = create(t, m, "j", fmt.Sprintf("0 %d ploop 11 %s %s", sectors, top, base))
	if s := diff(readAll(t, d), model); s != "" {
		t.Fatalf("reopened stack: %s", s)
	}
	merge(t, d)
	if got := status(d, mapper.StatusInfo); !strings.HasPrefix(got, "1 v2 2048 o ") {
		t.Errorf("INFO after merge %q", got)
	}
	if err := m.Remove("j", false); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, top)
	ploopCheck(t, top)
	if s := diff(qemuRaw(t, top), model); s != "" {
		t.Fatalf("qemu-img reads the merged top: %s", s)
	}
}

// TestCrashMem crashes memory backends: what a flush acknowledged
// survives, the image reloads, and unflushed allocations leave no trace.
func TestCrashMem(t *testing.T) {
	set := mappertest.NewSet(4<<20, "img")
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	d := create(t, m, "c", "0 4096 ploop 3 img")
	model := make([]byte, 4096*512)
	for i := range 40 {
		s := uint64(i*97) % 4000
		data := pattern(uint64(i), 8*512)
		submit(t, d, mapper.OpWrite, s, data)
		copy(model[s*512:], data)
	}
	submit(t, d, mapper.OpFlush, 0, nil)
	img := set.Get("img")
	flushes := img.Flushes()
	for i := range 40 { // never flushed
		submit(t, d, mapper.OpWrite, uint64(i*13+1000)%4000, pattern(uint64(100+i), 4096))
	}
	if img.Flushes() != flushes {
		t.Fatalf("writes without FUA flushed the image")
	}
	img.Crash()
	// Reload from what a crash left, in a fresh set (the old manager
	// would write its in-memory BAT when closed).
	set2 := mappertest.NewSet(4<<20, "img")
	set2.Get("img").WriteAt([][]byte{img.Bytes()}, 0)
	m2 := mapper.NewManager(mapper.ManagerOptions{Open: set2.Open, Logger: slog.New(slog.DiscardHandler)})
	defer m2.Close()
	d2 := create(t, m2, "c", "0 4096 ploop 3 img")
	got := readAll(t, d2)
	// Each 4 KiB block is the flushed data or one of the later writes;
	// blocks of clusters allocated after the flush must be the flushed data.
	if s := diff(got, model); s != "" {
		t.Fatalf("after crash: %s", s)
	}
}

// TestFlushOrdering fails the BAT write of a flush: the flush fails, and
// a later flush writes the entries.
func TestFlushOrdering(t *testing.T) {
	set := mappertest.NewSet(1<<20, "img")
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	d := create(t, m, "f", "0 1024 ploop 3 img")
	img := set.Get("img")
	data := pattern(9, 4096)
	submit(t, d, mapper.OpWrite, 8, data)
	img.FailNth(mapper.OpWrite, 1) // the BAT sector
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err == nil {
		t.Fatal("flush with a failing BAT write succeeded")
	}
	submit(t, d, mapper.OpFlush, 0, nil)
	img.Crash()
	set2 := mappertest.NewSet(1<<20, "img")
	set2.Get("img").WriteAt([][]byte{img.Bytes()}, 0)
	m2 := mapper.NewManager(mapper.ManagerOptions{Open: set2.Open, Logger: slog.New(slog.DiscardHandler)})
	defer m2.Close()
	d2 := create(t, m2, "f", "0 1024 ploop 3 img")
	got := make([]byte, 4096)
	submit(t, d2, mapper.OpRead, 8, got)
	if !bytes.Equal(got, data) {
		t.Fatal("flushed write lost after a retried flush")
	}
}

func TestTracking(t *testing.T) {
	set := mappertest.NewSet(1<<20, "img")
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	d := create(t, m, "t", "0 1024 ploop 3 img") // 128 clusters: BAT fits cluster 0
	submit(t, d, mapper.OpWrite, 0, pattern(1, 8192))
	submit(t, d, mapper.OpFlush, 0, nil)
	message(t, d, "tracking_start")
	drain := func() []string {
		var got []string
		for {
			r, err := d.Message(0, []string{"tracking_get_next"})
			if errors.Is(err, ploop.ErrAgain) {
				return got
			}
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, r)
		}
	}
	if got := strings.Join(drain(), " "); got != "0 1 2" { // header+BAT, two data clusters
		t.Fatalf("clusters dirty at start %q", got)
	}
	submit(t, d, mapper.OpWrite, 8, pattern(2, 512))  // virtual 1 in place: file cluster 2
	submit(t, d, mapper.OpWrite, 80, pattern(3, 512)) // new: file cluster 3
	submit(t, d, mapper.OpFlush, 0, nil)              // writes the BAT in cluster 0
	got := drain()
	slices.Sort(got)
	if s := strings.Join(got, " "); s != "0 2 3" {
		t.Fatalf("clusters written since start %q, want 0 2 3", s)
	}
	if got := status(d, mapper.StatusInfo); got != "1 v2 8 t 3/128" {
		t.Errorf("INFO %q", got)
	}
	if _, err := d.Message(0, []string{"snapshot", "x"}); !errors.Is(err, mapper.ErrBusy) {
		t.Errorf("snapshot while tracking: %v", err)
	}
	message(t, d, "tracking_stop")
	if _, err := d.Message(0, []string{"tracking_get_next"}); !errors.Is(err, mapper.ErrNotFound) {
		t.Errorf("get_next after stop: %v", err)
	}
}

// TestAllocation: clusters allocated in no delta are holes that read as
// zeros; a cluster qemu-io wrote is data.
func TestAllocation(t *testing.T) {
	qimg, qio := tool(t, "qemu-img", "qemu-utils"), tool(t, "qemu-io", "qemu-utils")
	img := filepath.Join(t.TempDir(), "top.hds")
	mustRun(t, qimg, "create", "-q", "-f", "parallels", img, "8M")
	mustRun(t, qio, "-f", "parallels", "-c", "write -P 1 2M 4096", img)
	d := create(t, newManager(t), "p", "0 16384 ploop 11 "+img)
	var got []string
	for s := uint64(0); s < 16384; {
		n, st, err := d.Allocation(s, 16384-s)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprintf("%d+%d:%d", s, n, st))
		s += n
	}
	if want := "[0+4096:3 4096+2048:0 6144+10240:3]"; fmt.Sprint(got) != want {
		t.Errorf("allocation %v, want %s", got, want)
	}
}
