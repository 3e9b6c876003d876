package oracle

import (
	"bufio"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

// Rewrite makes [CheckGolden] rewrite the vhostdm-owned answers ("ours:")
// of golden files instead of comparing them: `go test ./targets
// -oracle.rewrite`. The kernel's answers are only ever written by
// `go test ./test/oracle -oracle.record`.
var Rewrite = flag.Bool("oracle.rewrite", false, "rewrite the vhostdm answers (ours:) of golden files")

// Golden disks: the kernel sees them as virtio disks vdb, vdc, ... whose
// device numbers are 254:16, 254:32, ...; vhostdm's tests use memory
// backends of the same names and sizes, so tables and TABLE lines read the
// same on both sides.
const (
	GoldenDisks     = 4
	GoldenDiskBytes = 4 << 20
)

// DiskName returns the major:minor name of golden disk i (0-based) in the
// guest: 254:16 for the first.
func DiskName(i int) string { return fmt.Sprintf("254:%d", 16*(i+1)) }

// StatusShowKeys is the status kind for `dmsetup table --showkeys`. The
// mapper has only INFO and TABLE so far; crypt answers this value with its
// key shown, and TABLE with the key masked as dmsetup prints it.
const StatusShowKeys = mapper.StatusShowKeys

// A golden file is a header of '#' lines followed by cases separated by
// blank lines. A case is a command line, its input lines, "----", and the
// expected answer as "key: value" lines:
//
//	load                                   a table, one target per line
//	0 2048 flakey 254:16 0 5 0
//	----
//	status: 0 2048 flakey
//	table: 0 2048 flakey 254:16 0 5 0 0
//
//	message 0 fail_path 254:16             dmsetup message t 0 ...
//	----
//	status: 0 2048 multipath 2 0 0 0 1 1 E 0 2 1 254:16 F 1 0 254:32 A 0 0
//
//	read                                   one 4 KiB read at sector 0
//	----
//	status: ...
//
// Keys written by the kernel oracle: status, table and showkeys (one per
// line of the device's table), and error (the kernel's reason from dmesg).
// Key written by vhostdm's tests: ours (vhostdm's error text, or "ok").
// A hand-written "deviation: why" says vhostdm differs on purpose; then
// only ours is checked. Commands run in order on one device, each load
// replacing the device.
type Golden struct {
	Header []string
	Cases  []*Case
}

// Case is one command of a golden file.
type Case struct {
	Line  int      // line number of the command
	Cmd   string   // load, message or read
	Args  []string // words after the command
	Input []string // table lines of load
	Want  []KV     // the answer, in file order
}

// KV is one "key: value" answer line.
type KV struct{ Key, Val string }

// Get returns the values of key, in order.
func (c *Case) Get(key string) []string {
	var out []string
	for _, kv := range c.Want {
		if kv.Key == key {
			out = append(out, kv.Val)
		}
	}
	return out
}

// Set replaces the values of key by vals, keeping other keys.
func (c *Case) Set(key string, vals ...string) {
	var out []KV
	for _, kv := range c.Want {
		if kv.Key != key {
			out = append(out, kv)
		}
	}
	for _, v := range vals {
		out = append(out, KV{key, v})
	}
	c.Want = out
}

// ParseGolden reads a golden file.
func ParseGolden(path string) (*Golden, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	g := &Golden{}
	sc := bufio.NewScanner(f)
	num := 0
	var c *Case
	inWant := false
	for sc.Scan() {
		num++
		line := strings.TrimRight(sc.Text(), " \t")
		switch {
		case c == nil && strings.HasPrefix(line, "#"):
			if len(g.Cases) == 0 {
				g.Header = append(g.Header, line)
			}
		case line == "":
			if c != nil {
				if !inWant {
					return nil, fmt.Errorf("%s:%d: case without ----", path, c.Line)
				}
				g.Cases = append(g.Cases, c)
				c = nil
			}
		case c == nil:
			f := strings.Fields(line)
			switch f[0] {
			case "load", "message", "read":
			default:
				return nil, fmt.Errorf("%s:%d: unknown command %q", path, num, f[0])
			}
			c = &Case{Line: num, Cmd: f[0], Args: f[1:]}
			inWant = false
		case line == "----":
			inWant = true
		case !inWant:
			c.Input = append(c.Input, line)
		default:
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				return nil, fmt.Errorf("%s:%d: want key: value, got %q", path, num, line)
			}
			c.Want = append(c.Want, KV{k, strings.TrimPrefix(v, " ")})
		}
	}
	if c != nil {
		if !inWant {
			return nil, fmt.Errorf("%s:%d: case without ----", path, c.Line)
		}
		g.Cases = append(g.Cases, c)
	}
	return g, sc.Err()
}

// Format returns the file text of g.
func (g *Golden) Format() string {
	var b strings.Builder
	for _, h := range g.Header {
		b.WriteString(h + "\n")
	}
	for _, c := range g.Cases {
		b.WriteString("\n" + strings.Join(append([]string{c.Cmd}, c.Args...), " ") + "\n")
		for _, l := range c.Input {
			b.WriteString(l + "\n")
		}
		b.WriteString("----\n")
		for _, kv := range c.Want {
			b.WriteString(strings.TrimRight(kv.Key+": "+kv.Val, " ") + "\n")
		}
	}
	return b.String()
}

// T is the part of testing.TB that CheckGolden uses.
type T interface {
	Helper()
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
}

// CheckGolden runs every case of the golden file at path against vhostdm
// (the target types registered in the test binary, memory backends named
// as the guest's disks) and reports each difference from the kernel's
// answer. With -oracle.rewrite it rewrites the ours: lines instead.
func CheckGolden(t T, path string) {
	t.Helper()
	g, err := ParseGolden(path)
	if err != nil {
		t.Fatalf("%v", err)
	}
	names := make([]string, GoldenDisks)
	for i := range names {
		names[i] = DiskName(i)
	}
	set := mappertest.NewSet(GoldenDiskBytes, names...)
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler), Open: set.Open})
	defer m.Close()
	var dev *mapper.Device
	changed := false
	for _, c := range g.Cases {
		where := fmt.Sprintf("%s:%d", path, c.Line)
		ours, status := runOurs(m, &dev, c)
		if *Rewrite {
			if old := c.Get("ours"); len(old) != 1 || old[0] != ours {
				c.Set("ours", ours)
				changed = true
			}
		} else if want := c.Get("ours"); len(want) != 1 || want[0] != ours {
			t.Errorf("%s: %s: vhostdm answered %q, file says ours: %q", where, c.Cmd, ours, want)
		}
		if len(c.Get("deviation")) > 0 {
			continue
		}
		if kerr := c.Get("error"); len(kerr) > 0 {
			if ours == "ok" {
				t.Errorf("%s: the kernel refused (%s) and vhostdm accepted", where, kerr[0])
			}
			continue
		}
		if len(c.Want) > 0 && ours != "ok" {
			t.Errorf("%s: the kernel accepted and vhostdm refused: %s", where, ours)
			continue
		}
		for _, key := range []string{"status", "table", "showkeys"} {
			want := c.Get(key)
			if len(want) == 0 {
				continue
			}
			if got := status[key]; !equalLines(got, want) {
				t.Errorf("%s: %s:\n got  %q\n want %q (kernel)", where, key, got, want)
			}
		}
	}
	if *Rewrite && changed {
		if err := os.WriteFile(path, []byte(g.Format()), 0o644); err != nil {
			t.Fatalf("%v", err)
		}
		t.Logf("rewrote %s", path)
	}
}

func equalLines(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if strings.TrimRight(a[i], " ") != strings.TrimRight(b[i], " ") {
			return false
		}
	}
	return true
}

// runOurs performs c on vhostdm and returns "ok" or the error text (with
// the core's "create t: line N: <type>: " context removed), and the status
// lines by key.
func runOurs(m *mapper.Manager, dev **mapper.Device, c *Case) (string, map[string][]string) {
	var err error
	switch c.Cmd {
	case "load":
		if *dev != nil {
			m.Remove("t", true)
			*dev = nil
		}
		var d *mapper.Device
		d, err = m.CreateTable("t", "", false, strings.Join(c.Input, "\n"))
		if err == nil {
			*dev = d
		}
	case "message":
		if *dev == nil {
			return "no device", nil
		}
		if len(c.Args) < 1 {
			return "message without sector", nil
		}
		sector, perr := strconv.ParseUint(c.Args[0], 10, 64)
		if perr != nil {
			return perr.Error(), nil
		}
		_, err = (*dev).Message(sector, c.Args[1:])
	case "read":
		if *dev == nil {
			return "no device", nil
		}
		buf := make([]byte, 4096)
		err = (*dev).Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 8, Data: [][]byte{buf}})
	}
	if err != nil {
		return stripContext(err.Error()), nil
	}
	st := map[string][]string{}
	if *dev != nil {
		for key, kind := range map[string]mapper.StatusKind{"status": mapper.StatusInfo, "table": mapper.StatusTable, "showkeys": StatusShowKeys} {
			for _, l := range (*dev).Status(kind, false) {
				st[key] = append(st[key], strings.TrimRight(l.String(), " "))
			}
		}
	}
	return "ok", st
}

// stripContext removes what the core adds in front of a target's reason:
// "create t: line 1: delay: " or, for messages, "t: multipath: ".
func stripContext(s string) string {
	s = strings.TrimPrefix(s, "create t: ")
	s = strings.TrimPrefix(s, "t: ")
	if strings.HasPrefix(s, "line ") {
		if _, rest, ok := strings.Cut(s, ": "); ok {
			s = rest
		}
	}
	if i := strings.Index(s, ": "); i > 0 && !strings.ContainsAny(s[:i], " \"") {
		s = s[i+2:]
	}
	return s
}
