package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/qmp"
	_ "github.com/vhostdm/vhostdm/targets"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the expected output of testdata/ctl_* files")

// ctltest is a target for these tests only, under a name no real target
// uses: "ctltest" takes no arguments; message "ping" replies "pong" and
// "event KIND" raises a device event.
type ctltest struct{ event mapper.EventRaiser }

func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "ctltest", Version: [3]int{1, 0, 0}, New: func(c *mapper.Ctx, args []string) (mapper.Target, error) {
		if len(args) != 0 {
			return nil, fmt.Errorf("no arguments required, got %d", len(args))
		}
		return &ctltest{event: c.Event()}, nil
	}})
}

func (t *ctltest) Map(r *mapper.Request) error {
	if r.Op == mapper.OpRead {
		mapper.ZeroBufs(r.Data)
	}
	return nil
}
func (t *ctltest) Status(mapper.StatusKind) string { return "" }
func (t *ctltest) Close() error                    { return nil }
func (t *ctltest) Message(args []string) (string, error) {
	switch {
	case len(args) == 1 && args[0] == "ping":
		return "pong", nil
	case len(args) == 2 && args[0] == "event":
		t.event(args[1], map[string]any{"target": "ctltest"})
		return "", nil
	}
	return "", fmt.Errorf("unknown message %q", strings.Join(args, " "))
}

// memExports is an in-memory qmp.Exports.
type memExports struct {
	mu sync.Mutex
	m  map[string]qmp.ExportOptions
}

func (e *memExports) Add(o qmp.ExportOptions) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.m[o.ID] = o
	return nil
}

func (e *memExports) Del(id, mode string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.m, id)
	return nil
}

func (e *memExports) List() []qmp.ExportInfo {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []qmp.ExportInfo
	for _, o := range e.m {
		out = append(out, qmp.ExportInfo{Type: "vhost-user-blk", ID: o.ID, NodeName: o.NodeName})
	}
	slices.SortFunc(out, func(a, b qmp.ExportInfo) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// startCtlServer runs a QMP server over a fresh Manager and returns its
// socket path.
func startCtlServer(t *testing.T) (string, *mapper.Manager) {
	t.Helper()
	dir, err := os.MkdirTemp("", "ctl") // short: socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var srv *qmp.Server
	m := mapper.NewManager(mapper.ManagerOptions{Logger: log, Events: func(e mapper.Event) { srv.MapperEvent(e) }})
	srv = qmp.NewServer(qmp.Config{Manager: m, Exports: &memExports{m: map[string]qmp.ExportOptions{}}, Logger: log, Version: Version})
	sock := filepath.Join(dir, "qmp.sock")
	l, err := qmp.ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		m.Close()
	})
	return sock, m
}

// ctlRun runs vhostdm ctl with args and stdin.
func ctlRun(ctx context.Context, args []string, stdin string) (stdout, stderr string, code int) {
	var o, e bytes.Buffer
	code = ctlMain(ctx, args, strings.NewReader(stdin), &o, &e)
	return o.String(), e.String(), code
}

// TestCtlGolden replays testdata/ctl_*: each file runs against a fresh
// server.
//
//	# comment
//	$ VERB ARGS...   a ctl command line; --qmp SOCK is added. Words split
//	                 at spaces; "..." quotes, with \n for a newline.
//	< LINE           a line of stdin for the command above
//	1> LINE          expected stdout
//	2> LINE          expected stderr (the socket path reads SOCK)
//	exit N           expected exit status, when not 0
//
// With -rewrite the expected lines are regenerated; review the diff.
func TestCtlGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/ctl_*")
	if len(files) == 0 {
		t.Fatal("no testdata/ctl_* files")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) { runCtlGolden(t, f) })
	}
}

func runCtlGolden(t *testing.T, path string) {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sock, _ := startCtlServer(t)
	var out []string
	var cmd []string
	var stdin strings.Builder
	pending := false
	flush := func() {
		if !pending {
			return
		}
		pending = false
		o, e, code := ctlRun(context.Background(), append([]string{"--qmp", sock}, cmd...), stdin.String())
		for _, l := range lines(o) {
			out = append(out, "1> "+l)
		}
		for _, l := range lines(strings.ReplaceAll(e, sock, "SOCK")) {
			out = append(out, "2> "+l)
		}
		if code != 0 {
			out = append(out, "exit "+strconv.Itoa(code))
		}
	}
	for _, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		switch {
		case strings.HasPrefix(line, "< "):
			stdin.WriteString(line[2:] + "\n")
			out = append(out, line)
			continue
		case strings.HasPrefix(line, "1> "), strings.HasPrefix(line, "2> "), line == "1>", line == "2>", strings.HasPrefix(line, "exit "):
			continue
		}
		flush()
		switch {
		case strings.HasPrefix(line, "$ "):
			words, err := splitWords(line[2:])
			if err != nil {
				t.Fatalf("%s: %q: %v", path, line, err)
			}
			cmd, pending = words, true
			stdin.Reset()
		case line == "" || strings.HasPrefix(line, "#"):
		default:
			t.Fatalf("%s: unknown line %q", path, line)
		}
		out = append(out, line)
	}
	flush()
	have := strings.Join(out, "\n") + "\n"
	if *rewrite {
		if err := os.WriteFile(path, []byte(have), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	if want := string(data); have != want {
		wl, hl := strings.Split(want, "\n"), strings.Split(have, "\n")
		for i := 0; i < max(len(wl), len(hl)); i++ {
			var w, h string
			if i < len(wl) {
				w = wl[i]
			}
			if i < len(hl) {
				h = hl[i]
			}
			if w != h {
				t.Fatalf("%s:%d:\nwant %q\ngot  %q\n(run with -rewrite to regenerate, then review the diff)", path, i+1, w, h)
			}
		}
	}
}

// lines splits output into lines; an empty final line after the last
// newline is dropped, other empty lines are kept.
func lines(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(strings.TrimSuffix(s, "\n"), "\n")
}

// splitWords splits a test command line at spaces, honouring "..." with
// \n and \" escapes.
func splitWords(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	in, quoted := false, false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case quoted && ch == '\\' && i+1 < len(s):
			i++
			switch s[i] {
			case 'n':
				w.WriteByte('\n')
			default:
				w.WriteByte(s[i])
			}
		case ch == '"':
			quoted, in = !quoted, true
		case ch == ' ' && !quoted:
			if in {
				words = append(words, w.String())
				w.Reset()
				in = false
			}
		default:
			w.WriteByte(ch)
			in = true
		}
	}
	if quoted {
		return nil, errors.New("unterminated quote")
	}
	if in {
		words = append(words, w.String())
	}
	return words, nil
}

func TestCtlSocketFromEnvironment(t *testing.T) {
	sock, _ := startCtlServer(t)
	t.Setenv("VHOSTDM_QMP", sock)
	if o, e, code := ctlRun(context.Background(), []string{"ls"}, ""); code != 0 || o != "No devices found\n" {
		t.Fatalf("ls with VHOSTDM_QMP: %q %q %d", o, e, code)
	}
	t.Setenv("VHOSTDM_QMP", "")
	if o, e, code := ctlRun(context.Background(), []string{"ls"}, ""); code != 1 || o != "" || !strings.Contains(e, "no QMP socket") {
		t.Fatalf("ls without a socket: %q %q %d", o, e, code)
	}
	missing := filepath.Join(filepath.Dir(sock), "missing.sock")
	if _, e, code := ctlRun(context.Background(), []string{"--qmp", missing, "ls"}, ""); code != 1 || !strings.Contains(e, "vhostdm ctl: connect: ") {
		t.Fatalf("ls on a missing socket: %q %d", e, code)
	}
}

func TestCtlRegistered(t *testing.T) {
	var o, e bytes.Buffer
	if code := run([]string{"ctl", "--help"}, &o, &e); code != 0 || !strings.Contains(o.String(), "usage: vhostdm ctl") {
		t.Fatalf("vhostdm ctl --help: %d %q %q", code, o.String(), e.String())
	}
	for name := range ctlVerbs {
		if !strings.Contains(o.String(), "\n  "+name+" ") {
			t.Errorf("usage does not list %s", name)
		}
	}
}

// TestCtlEvents: events prints each event as a JSON line until
// interrupted, then exits 0.
func TestCtlEvents(t *testing.T) {
	sock, m := startCtlServer(t)
	if _, e, code := ctlRun(context.Background(), []string{"--qmp", sock, "create", "vm0", "--table", "0 8 ctltest"}, ""); code != 0 {
		t.Fatal(e)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	var stderr bytes.Buffer
	code := make(chan int, 1)
	go func() {
		code <- ctlMain(ctx, []string{"--qmp", sock, "events"}, strings.NewReader(""), pw, &stderr)
		pw.Close()
	}()
	// Events raised until the client has subscribed are lost, so keep
	// raising until one arrives.
	d, err := m.Get("vm0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			got <- sc.Text()
		}
		close(got)
	}()
	var first string
	deadline := time.After(10 * time.Second)
	for first == "" {
		if _, err := d.Message(0, []string{"event", "path_failed"}); err != nil {
			t.Fatal(err)
		}
		select {
		case first = <-got:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatal("no event printed")
		}
	}
	var ev struct {
		Event     string         `json:"event"`
		Data      map[string]any `json:"data"`
		Timestamp map[string]any `json:"timestamp"`
	}
	if err := json.Unmarshal([]byte(first), &ev); err != nil {
		t.Fatalf("event line %q: %v", first, err)
	}
	if ev.Event != qmp.EventDM || ev.Data["name"] != "vm0" || ev.Data["event"] != "path_failed" || ev.Data["target"] != "ctltest" || ev.Timestamp["seconds"] == nil {
		t.Fatalf("event line %q", first)
	}
	// A resize arrives too.
	if err := d.Reload("0 16 ctltest"); err != nil {
		t.Fatal(err)
	}
	for line := range got {
		if strings.Contains(line, qmp.EventDeviceResized) {
			if !strings.Contains(line, `"new-size":16`) || !strings.Contains(line, `"old-size":8`) {
				t.Fatalf("resize line %q", line)
			}
			break
		}
	}
	cancel()
	go func() {
		for range got {
		}
	}()
	select {
	case c := <-code:
		if c != 0 {
			t.Fatalf("events exited %d: %s", c, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("events did not stop when interrupted")
	}
}

func TestCtlParse(t *testing.T) {
	for _, c := range []struct {
		args    []string
		want    string
		wantErr string
	}{
		{args: []string{"--qmp", "/s", "create", "vm0", "--table", "0 8 zero", "--readonly"}, want: "/s create [vm0] map[readonly:true table:0 8 zero]"},
		{args: []string{"create", "--qmp=/s", "--uuid=U", "vm0"}, want: "/s create [vm0] map[uuid:U]"},
		{args: []string{"message", "vm0", "0", "--not-an-option", "x"}, want: " message [vm0 0 --not-an-option x] map[]"},
		{args: []string{"table", "--", "-odd-name"}, want: " table [-odd-name] map[]"},
		{args: []string{"-qmp", "/s", "ls"}, want: "/s ls [] map[]"},
		{args: nil, wantErr: "no verb given"},
		{args: []string{"frobnicate"}, wantErr: `unknown verb "frobnicate"`},
		{args: []string{"--force", "remove", "vm0"}, wantErr: "unknown option --force before the verb"},
		{args: []string{"remove", "vm0", "--frob"}, wantErr: "remove: unknown option --frob"},
		{args: []string{"remove", "vm0", "--force=yes"}, wantErr: "option --force takes no value"},
		{args: []string{"create", "vm0", "--table"}, wantErr: "option --table needs a value"},
		{args: []string{"remove", "vm0", "--force", "--force"}, wantErr: "remove: option --force given twice"},
		{args: []string{"--qmp", "a", "--qmp", "b", "ls"}, wantErr: "option --qmp given twice"},
		{args: []string{"remove"}, wantErr: "usage: vhostdm ctl remove NAME [--force]"},
		{args: []string{"ls", "extra"}, wantErr: "usage: vhostdm ctl ls "},
		{args: []string{"message", "vm0", "0"}, wantErr: "usage: vhostdm ctl message NAME SECTOR MESSAGE..."},
	} {
		sock, name, a, err := ctlParse(c.args)
		if c.wantErr != "" {
			if err == nil || err.Error() != c.wantErr {
				t.Errorf("ctlParse(%q): %v, want %q", c.args, err, c.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ctlParse(%q): %v", c.args, err)
			continue
		}
		if got := fmt.Sprintf("%s %s %v %v", sock, name, a.pos, a.flags); got != c.want {
			t.Errorf("ctlParse(%q) = %s, want %s", c.args, got, c.want)
		}
	}
}
