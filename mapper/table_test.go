package mapper_test

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	_ "github.com/vhostdm/vhostdm/targets"
)

// newManager returns a manager whose backends are memory disks a, b, c of
// 1 MiB (2048 sectors) each.
func newManager(t *testing.T) (*mapper.Manager, *mappertest.Set) {
	t.Helper()
	set := mappertest.NewSet(1<<20, "a", "b", "c")
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(func() { m.Close() })
	return m, set
}

func TestTableValidation(t *testing.T) {
	tests := []struct {
		name, table, want string
	}{
		{"gap", "0 1024 linear a 0\n2048 1024 linear b 0", "line 2: gap in table: starts at 2048, previous target ends at 1024"},
		{"overlap", "0 1024 linear a 0\n512 1024 linear b 0", "line 2: overlap in table: starts at 512, previous target ends at 1024"},
		{"zero length", "0 0 zero", "line 1: zero-length target"},
		{"first not at 0", "8 1024 zero", "line 1: first target starts at 8, must start at 0"},
		{"unknown target", "0 1024 frobnicate", `line 1: unknown target type "frobnicate"`},
		{"wrong argument count", "0 1024 linear a", "line 1: linear: want 2 arguments <dev_path> <offset>, got 1"},
		{"non-numeric offset", "0 1024 linear a x", `line 1: linear: device offset "x": not a number`},
		{"non-numeric start", "x 1024 zero", `line 1: start "x": not a number`},
		{"non-numeric length", "0 -5 zero", `line 1: length "-5": not a number`},
		{"too few fields", "0 1024", "line 1: want <start> <length> <target> [args...], got 2 field(s)"},
		{"out-of-range offset", "0 1024 linear a 1500", "line 1: linear: a too small for target: start=1500, len=1024, dev_size=2048"},
		{"huge length", "0 18014398509481984 zero", "line 1: target 0+18014398509481984: beyond the largest device (18014398509481983 sectors)"},
		{"line numbers count comments", "# root disk\n0 1024 zero\n\n1024 10 error\n1034 5 linear", "line 5: linear: want 2 arguments <dev_path> <offset>, got 0"},
		{"empty", "\n# nothing\n", "empty table"},
		{"missing backend", "0 8 linear nosuch 0", "line 1: linear: open nosuch: no such memory backend"},
		{"zero args", "0 8 zero 1", "line 1: zero: no arguments required, got 1"},
		{"stripe count", "0 1024 striped 0 8", `line 1: striped: stripe count "0": must be 1 to 1024`},
		{"chunk small", "0 1024 striped 2 4 a 0 b 0", `line 1: striped: chunk size "4": must be 8 to 1073741824`},
		{"chunk not pow2", "0 1200 striped 2 24 a 0 b 0", "line 1: striped: chunk size 24: not a power of two"},
		{"stripes divide", "0 1023 striped 2 8 a 0 b 0", "line 1: striped: target length 1023 not divisible by stripe count 2"},
		{"chunk divides", "0 1000 striped 2 16 a 0 b 0", "line 1: striped: target length 1000 not divisible by chunk size 16 × stripe count 2"},
		{"stripe pairs", "0 1024 striped 2 8 a 0", "line 1: striped: want 2 device and offset pairs for 2 stripes, got 2 arguments"},
		{"stripe too small", "0 4096 striped 2 8 a 0 b 100", "line 1: striped: b too small for target: start=100, len=2048, dev_size=2048"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, _ := newManager(t)
			d, err := m.CreateTable("good", "", false, "0 2048 linear a 0")
			if err != nil {
				t.Fatal(err)
			}
			err = d.Load(tc.table)
			if err == nil {
				t.Fatalf("Load(%q) succeeded, want error %q", tc.table, tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("Load(%q) error\n got: %s\nwant: %s", tc.table, err, tc.want)
			}
			if !errors.Is(err, mapper.ErrInvalid) && !errors.Is(err, mapper.ErrNotFound) {
				t.Errorf("error %q is neither ErrInvalid nor ErrNotFound", err)
			}
			info := d.Info()
			if info.InactiveTable || !info.LiveTable || info.Size != 2048 {
				t.Errorf("a failed load changed the device: %+v", info)
			}
		})
	}
}

func TestTableRoundTrip(t *testing.T) {
	m, _ := newManager(t)
	text := "0 1024 linear a 16\n1024 2048 striped 2 8 b 0 c 8\n3072 8 zero\n3080 8 error"
	d, err := m.CreateTable("rt", "", false, text)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range d.Status(mapper.StatusTable, false) {
		lines = append(lines, l.String())
	}
	got := strings.Join(lines, "\n")
	want := "0 1024 linear a 16\n1024 2048 striped 2 8 b 0 c 8\n3072 8 zero \n3080 8 error "
	if got != want {
		t.Fatalf("table:\n%s\nwant:\n%s", got, want)
	}
	// What table printed loads back to the same lines.
	if err := d.Reload(got); err != nil {
		t.Fatal(err)
	}
	var again []string
	for _, l := range d.Status(mapper.StatusTable, false) {
		again = append(again, l.String())
	}
	if strings.Join(again, "\n") != want {
		t.Fatalf("reloaded table differs:\n%s", strings.Join(again, "\n"))
	}
	var status []string
	for _, l := range d.Status(mapper.StatusInfo, false) {
		status = append(status, l.String())
	}
	wantStatus := "0 1024 linear \n1024 2048 striped 2 b c 1 AA\n3072 8 zero \n3080 8 error "
	if strings.Join(status, "\n") != wantStatus {
		t.Fatalf("status:\n%q\nwant:\n%q", strings.Join(status, "\n"), wantStatus)
	}
}

func TestSingletonAndSelfReference(t *testing.T) {
	m, _ := newManager(t)
	if _, err := m.CreateTable("x", "", false, "0 8 linear /dev/mapper/x 0"); err == nil ||
		err.Error() != "create x: line 1: linear: /dev/mapper/x: would make device x depend on itself" {
		t.Fatalf("self reference before creation: %v", err)
	}
	if _, err := m.CreateTable("base", "", false, "0 2048 linear a 0"); err != nil {
		t.Fatal(err)
	}
	top, err := m.CreateTable("top", "", false, "0 2048 linear /dev/mapper/base 0")
	if err != nil {
		t.Fatal(err)
	}
	base, _ := m.Get("base")
	err = base.Load("0 2048 linear /dev/mapper/top 0")
	if err == nil || !strings.Contains(err.Error(), "would make device base depend on itself") {
		t.Fatalf("cycle through reload: %v", err)
	}
	if err := m.Remove("base", false); !errors.Is(err, mapper.ErrBusy) {
		t.Fatalf("remove of a device in use: %v", err)
	}
	_ = top
	if err := m.Remove("top", false); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove("base", false); err != nil {
		t.Fatalf("remove after its user went: %v", err)
	}
}

// TestFind checks the lookup against a scan of the lines, for tables of 1
// to 70 lines and of 1000, of random lengths, at the first and last
// sector of every line and at random sectors, on a table that reaches the
// largest device, and on tables that fill the lookup index's buckets
// unevenly.
func TestFind(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 9))
	check := func(text string) {
		t.Helper()
		tab, err := mapper.BuildTable(text, mapper.TableOptions{})
		if err != nil {
			t.Fatal(err)
		}
		lines := tab.Lines()
		want := func(s uint64) int {
			for i, l := range lines {
				if s < l.Start+l.Length {
					return i
				}
			}
			return -1
		}
		probe := func(s uint64) {
			if got, w := tab.Find(s), want(s); got != w {
				t.Fatalf("%d lines: Find(%d) = %d, want %d", len(lines), s, got, w)
			}
		}
		for _, l := range lines {
			probe(l.Start)
			probe(l.Start + l.Length - 1)
		}
		for range 200 {
			probe(rng.Uint64N(tab.Size()))
		}
	}
	sizes := []int{1000}
	for i := 1; i <= 70; i++ {
		sizes = append(sizes, i)
	}
	for _, n := range sizes {
		var b strings.Builder
		var start uint64
		for range n {
			l := 1 + rng.Uint64N(100)
			fmt.Fprintf(&b, "%d %d zero\n", start, l)
			start += l
		}
		check(b.String())
	}
	check(fmt.Sprintf("0 8 zero\n8 %d zero\n%d 1 zero\n", mapper.MaxSector-9, mapper.MaxSector-1))
	// Tables whose lines share the index's buckets unevenly: equal
	// lines of a length that is no power of two (1000 of 1000 sectors,
	// 1000 of 1024 as scripts/bench-vs-qsd.sh's), many one-sector lines
	// next to one huge line, lengths of every magnitude.
	for _, lines := range []struct{ n, length uint64 }{{1000, 1000}, {1000, 1024}, {3, 7}, {1024, 1}} {
		var b strings.Builder
		for i := range lines.n {
			fmt.Fprintf(&b, "%d %d zero\n", i*lines.length, lines.length)
		}
		check(b.String())
	}
	var skew strings.Builder
	var start uint64
	for range 500 {
		fmt.Fprintf(&skew, "%d 1 zero\n", start)
		start++
	}
	fmt.Fprintf(&skew, "%d %d zero\n", start, uint64(1)<<40)
	start += 1 << 40
	for range 500 {
		fmt.Fprintf(&skew, "%d 1 zero\n", start)
		start++
	}
	check(skew.String())
	var mags strings.Builder
	start = 0
	for range 300 {
		l := uint64(1) << rng.UintN(40)
		l += rng.Uint64N(l)
		fmt.Fprintf(&mags, "%d %d zero\n", start, l)
		start += l
	}
	check(mags.String())
}

// TestLinesShareBackend checks that the lines of a table naming one file
// by one name share one backend object (a 1000-line table over an image
// costs its requests no more memory to touch than one line does), that a
// line naming it otherwise keeps its own name for TABLE, that the file is
// open once, and that closing the table closes it.
func TestLinesShareBackend(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"one.img", "two.img"} {
		if err := os.WriteFile(filepath.Join(dir, f), make([]byte, 64<<10), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	m := mapper.NewManager(mapper.ManagerOptions{Dir: dir, Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	fds := func() int {
		t.Helper()
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := fds()
	abs := filepath.Join(dir, "one.img")
	text := "0 8 linear one.img 0\n8 8 linear two.img 0\n16 8 linear one.img 8\n24 8 linear " + abs + " 16\n32 8 linear one.img 24"
	tab, err := mapper.BuildTable(text, mapper.TableOptions{Device: "share", Opener: m})
	if err != nil {
		t.Fatal(err)
	}
	var bs []mapper.Backend
	for i, tg := range tab.Targets() {
		b, _, ok := tg.(mapper.Remapper).Remap(0, 1)
		if !ok {
			t.Fatalf("line %d: linear does not remap", i+1)
		}
		bs = append(bs, b)
	}
	if bs[0] != bs[2] || bs[0] != bs[4] {
		t.Errorf("lines naming one.img have distinct backends: %p %p %p", bs[0], bs[2], bs[4])
	}
	if bs[0] == bs[1] || bs[0] == bs[3] {
		t.Errorf("a line naming another file or the same file by another name shares one.img's backend")
	}
	if got := bs[3].Name(); got != abs {
		t.Errorf("line 4's backend is named %q, want %q", got, abs)
	}
	if got := tab.Status(mapper.StatusTable)[3].String(); got != "24 8 linear "+abs+" 16" {
		t.Errorf("TABLE of line 4: %q", got)
	}
	if got := fds() - before; got != 4 {
		t.Errorf("the table holds %d descriptors open, want 4 (one.img and two.img, once each, and the descriptor of each one's image locks)", got)
	}
	if err := tab.Close(); err != nil {
		t.Fatal(err)
	}
	if got := fds() - before; got != 0 {
		t.Errorf("%d files still open after the table closed", got)
	}
}
