package targets_test

import (
	"bytes"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// TestDelayGolden replays the kernel's answers recorded in testdata/delay.
func TestDelayGolden(t *testing.T) { oracle.CheckGolden(t, "testdata/delay") }

// memManager returns a manager whose backends are memory disks of size
// bytes with the given names.
func memManager(t *testing.T, size int, names ...string) (*mapper.Manager, *mappertest.Set) {
	t.Helper()
	set := mappertest.NewSet(size, names...)
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler), Open: set.Open})
	t.Cleanup(func() { m.Close() })
	return m, set
}

func submit(t *testing.T, d *mapper.Device, op mapper.Op, sector, n uint64, data []byte) error {
	t.Helper()
	r := &mapper.Request{Op: op, Sector: sector, Sectors: n}
	if data != nil {
		r.Data = [][]byte{data}
	}
	return d.Submit(r)
}

func mustSubmit(t *testing.T, d *mapper.Device, op mapper.Op, sector, n uint64, data []byte) {
	t.Helper()
	if err := submit(t, d, op, sector, n, data); err != nil {
		t.Fatalf("%s %d+%d: %v", op, sector, n, err)
	}
}

// conform runs the conformance checks every data-preserving target must
// pass on device d of a table over memory disks: read-after-write of
// random ranges in odd-sized vectors (crossing target boundaries when the
// table has several lines), flush, and the TABLE round trip (what table
// printed loads back and prints the same). unit is the I/O alignment in
// sectors.
func conform(t *testing.T, m *mapper.Manager, d *mapper.Device, unit uint64, showKeys mapper.StatusKind) {
	t.Helper()
	size := d.Size()
	model := make([]byte, size*512)
	rng := rand.New(rand.NewPCG(uint64(size), 3))
	mustSubmit(t, d, mapper.OpWrite, 0, size, model) // a known start (crypt reads noise)
	for i := 0; i < 40; i++ {
		s := rng.Uint64N(size/unit) * unit
		n := (1 + rng.Uint64N(min(size-s, 64)/unit)) * unit
		data := make([]byte, n*512)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		// Split the data over uneven vectors.
		cut := rng.IntN(len(data))
		r := &mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: n, Data: [][]byte{data[:cut], data[cut:]}, FUA: i%5 == 0}
		if err := d.Submit(r); err != nil {
			t.Fatalf("write %d+%d: %v", s, n, err)
		}
		copy(model[s*512:], data)
		if i%7 == 0 {
			mustSubmit(t, d, mapper.OpFlush, 0, 0, nil)
		}
		back := make([]byte, n*512)
		mustSubmit(t, d, mapper.OpRead, s, n, back)
		if !bytes.Equal(back, data) {
			t.Fatalf("read-after-write %d+%d differs", s, n)
		}
	}
	whole := make([]byte, size*512)
	mustSubmit(t, d, mapper.OpRead, 0, size, whole)
	if !bytes.Equal(whole, model) {
		t.Fatal("whole-device read differs from the model")
	}
	// TABLE round trip.
	var lines []string
	for _, l := range d.Status(showKeys, false) {
		lines = append(lines, l.String())
	}
	text := strings.Join(lines, "\n")
	d2, err := m.CreateTable(d.Name()+"-again", "", false, text)
	if err != nil {
		t.Fatalf("TABLE output does not load back: %v\n%s", err, text)
	}
	for i, l := range d2.Status(showKeys, false) {
		if l.String() != lines[i] {
			t.Fatalf("TABLE round trip: %q became %q", lines[i], l.String())
		}
	}
	back := make([]byte, size*512)
	mustSubmit(t, d2, mapper.OpRead, 0, size, back)
	if !bytes.Equal(back, model) {
		t.Fatal("the reloaded table reads different data")
	}
	m.Remove(d2.Name(), true)
}

func TestDelayConformance(t *testing.T) {
	m, _ := memManager(t, 1<<20, "a", "b")
	d, err := m.CreateTable("dl", "", false, "0 300 delay a 0 0\n300 500 delay a 300 1 a 300 0")
	if err != nil {
		t.Fatal(err)
	}
	conform(t, m, d, 1, mapper.StatusTable)
}

// TestDelayRouting checks that reads, writes and flushes go to the devices
// and offsets the table names and are held about as long as it says.
func TestDelayRouting(t *testing.T) {
	m, set := memManager(t, 1<<20, "r", "w", "f")
	d, err := m.CreateTable("dl", "", false, "0 64 delay r 8 30 w 16 60 f 0 90")
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xab}, 512)
	start := time.Now()
	mustSubmit(t, d, mapper.OpWrite, 1, 1, data)
	if el := time.Since(start); el < 60*time.Millisecond || el > 5*time.Second {
		t.Errorf("write took %v, want about 60ms", el)
	}
	if !bytes.Equal(set.Get("w").Bytes()[17*512:18*512], data) {
		t.Error("write did not land at sector 1+16 of the write device")
	}
	if bytes.Contains(set.Get("r").Bytes(), data[:16]) {
		t.Error("write reached the read device")
	}
	start = time.Now()
	back := make([]byte, 512)
	mustSubmit(t, d, mapper.OpRead, 1, 1, back)
	if el := time.Since(start); el < 30*time.Millisecond || el > 5*time.Second {
		t.Errorf("read took %v, want about 30ms", el)
	}
	if !bytes.Equal(back, make([]byte, 512)) {
		t.Error("read did not come from the read device")
	}
	f0, w0 := set.Get("f").Flushes(), set.Get("w").Flushes()
	start = time.Now()
	mustSubmit(t, d, mapper.OpFlush, 0, 0, nil)
	if el := time.Since(start); el < 90*time.Millisecond {
		t.Errorf("flush took %v, want about 90ms", el)
	}
	if set.Get("f").Flushes() != f0+1 || set.Get("w").Flushes() != w0 {
		t.Error("flush did not go to the flush device only")
	}

	// A delayed request holds up nothing else: a slow write and many
	// reads run together, and the status counts what waits.
	d2, err := m.CreateTable("dl2", "", false, "0 64 delay r 0 0 w 0 400")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); mustSubmit(t, d2, mapper.OpWrite, 0, 1, data) }()
	deadline := time.Now().Add(2 * time.Second)
	for d2.Status(mapper.StatusInfo, false)[0].Params != "0 1 0" && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := d2.Status(mapper.StatusInfo, false)[0].Params; got != "0 1 0" {
		t.Errorf("status while a write waits: %q, want \"0 1 0\"", got)
	}
	start = time.Now()
	for i := 0; i < 20; i++ {
		mustSubmit(t, d2, mapper.OpRead, 0, 1, back)
	}
	if el := time.Since(start); el > 300*time.Millisecond {
		t.Errorf("reads behind a delayed write took %v", el)
	}
	// Suspending releases the delayed write at once.
	start = time.Now()
	if err := d2.Suspend(false); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if el := time.Since(start); el > 350*time.Millisecond {
		t.Errorf("suspend waited %v for the delayed write", el)
	}
	if err := d2.Resume(); err != nil {
		t.Fatal(err)
	}
}

func TestDelayErrors(t *testing.T) {
	m, _ := memManager(t, 1<<20, "a")
	for _, tc := range []struct{ table, want string }{
		{"0 8 delay a 0", "want 3, 6 or 9 arguments, got 2"},
		{"0 8 delay a x 1", `read offset "x": not a number`},
		{"0 8 delay a 0 4294967296", `read delay "4294967296": must be 0 to 4294967295`},
		{"0 8 delay a 0 1 a 0 w", `write delay "w": not a number`},
		{"0 8 delay a 0 1 a 0 1 a f 1", `flush offset "f": not a number`},
		{"0 8 delay nosuch 0 1", "read device: open nosuch: no such memory backend"},
		{"0 8 delay a 0 1 a 0 1 nosuch 0 1", "flush device: open nosuch: no such memory backend"},
		{"0 8 delay a 2047 1", "a too small for target: start=2047, len=8, dev_size=2048"},
	} {
		_, err := m.CreateTable("e", "", false, tc.table)
		if err == nil || !strings.HasSuffix(err.Error(), "delay: "+tc.want) {
			t.Errorf("%s: got %v, want ...delay: %s", tc.table, err, tc.want)
		}
	}
}
