package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// qmptest is a target for these tests only (the real ones live in package
// targets), under a name no real target uses:
//
//	qmptest <label>
//
// TABLE is the label, INFO is "ok <label>". A label "fail" is refused.
// Messages: "ping" replies "pong"; "event KIND" raises a device event of
// that kind; "panic" panics; anything else is an error.
type qmptest struct {
	label string
	event mapper.EventRaiser
}

func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "qmptest", Version: [3]int{1, 0, 0}, New: func(c *mapper.Ctx, args []string) (mapper.Target, error) {
		a := mapper.NewArgs(args)
		label, err := a.Next("label")
		if err != nil {
			return nil, err
		}
		if err := a.Done(); err != nil {
			return nil, err
		}
		if label == "fail" {
			return nil, fmt.Errorf("label %q: refused", label)
		}
		return &qmptest{label: label, event: c.Event()}, nil
	}})
}

func (t *qmptest) Map(r *mapper.Request) error {
	if r.Op == mapper.OpRead {
		mapper.ZeroBufs(r.Data)
	}
	return nil
}

func (t *qmptest) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusTable {
		return t.label
	}
	return "ok " + t.label
}

func (t *qmptest) Close() error { return nil }

func (t *qmptest) Message(args []string) (string, error) {
	switch {
	case len(args) == 1 && args[0] == "ping":
		return "pong", nil
	case len(args) == 2 && args[0] == "event":
		t.event(args[1], map[string]any{"target": "qmptest", "label": t.label})
		return "", nil
	case len(args) == 1 && args[0] == "panic":
		panic("qmptest asked to panic")
	}
	return "", fmt.Errorf("unknown message %q", strings.Join(args, " "))
}

// fakeExports is an Exports kept in memory.
type fakeExports struct {
	mu sync.Mutex
	m  map[string]*fakeExport
}

type fakeExport struct {
	o         ExportOptions
	connected bool
}

func newFakeExports() *fakeExports { return &fakeExports{m: map[string]*fakeExport{}} }

func (f *fakeExports) Add(o ExportOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if strings.HasPrefix(o.Socket, "/nonexistent/") {
		return fmt.Errorf("listen %s: %w", o.Socket, os.ErrNotExist)
	}
	f.m[o.ID] = &fakeExport{o: o}
	return nil
}

func (f *fakeExports) Del(id, mode string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	e := f.m[id]
	if e.connected && mode == "safe" {
		return errors.New("export is in use by a front end")
	}
	delete(f.m, id)
	return nil
}

func (f *fakeExports) List() []ExportInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []ExportInfo
	for _, e := range f.m {
		out = append(out, ExportInfo{Type: "vhost-user-blk", ID: e.o.ID, NodeName: e.o.NodeName})
	}
	slices.SortFunc(out, func(a, b ExportInfo) int { return strings.Compare(a.ID, b.ID) })
	return out
}

func (f *fakeExports) get(id string) (ExportOptions, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.m[id]
	if !ok {
		return ExportOptions{}, false
	}
	return e.o, true
}

func (f *fakeExports) connect(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.m[id].connected = true
}

// env is a running server on a unix socket.
type env struct {
	t       testing.TB
	srv     *Server
	m       *mapper.Manager
	exports *fakeExports
	sock    string
	quits   chan struct{}
	logs    *syncBuffer
}

// syncBuffer collects logs from many goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// shortDir returns a directory with a short path: unix socket paths are
// limited to 107 bytes and test names make t.TempDir long.
func shortDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func startEnv(t testing.TB, mod func(*Config)) *env {
	t.Helper()
	e := &env{t: t, exports: newFakeExports(), quits: make(chan struct{}, 4), logs: &syncBuffer{}}
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e.m = mapper.NewManager(mapper.ManagerOptions{Logger: log, Events: func(ev mapper.Event) { e.srv.MapperEvent(ev) }})
	cfg := Config{Manager: e.m, Exports: e.exports, Logger: log, Version: "0.1.0",
		OnQuit: func() { e.quits <- struct{}{} }}
	if mod != nil {
		mod(&cfg)
	}
	e.srv = NewServer(cfg)
	e.sock = filepath.Join(shortDir(t), "qmp.sock")
	l, err := ListenUnix(e.sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		e.m.Close()
		if t.Failed() {
			t.Logf("server log:\n%s", e.logs.String())
		}
	})
	return e
}

// rawClient speaks QMP by hand: bytes out, lines in.
type rawClient struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

func (e *env) dial() *rawClient {
	e.t.Helper()
	conn, err := net.Dial("unix", e.sock)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return &rawClient{t: e.t, conn: conn, r: bufio.NewReader(conn)}
}

// negotiated dials, reads the greeting and negotiates capabilities.
func (e *env) negotiated() *rawClient {
	e.t.Helper()
	c := e.dial()
	c.recv()
	if r := c.cmd("qmp_capabilities", nil); r["return"] == nil {
		e.t.Fatalf("qmp_capabilities: %v", r)
	}
	return c
}

func (c *rawClient) send(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.conn, s); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// recvLine reads one message line, CRLF removed.
func (c *rawClient) recvLine() string {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("recv: %v (partial %q)", err, line)
	}
	if !strings.HasSuffix(line, "\r\n") {
		c.t.Fatalf("message %q does not end with CRLF", line)
	}
	for _, b := range []byte(line) {
		if b >= 0x80 {
			c.t.Fatalf("message %q is not ASCII", line)
		}
	}
	return strings.TrimSuffix(line, "\r\n")
}

func (c *rawClient) recv() map[string]any {
	c.t.Helper()
	line := c.recvLine()
	var m map[string]any
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		c.t.Fatalf("message %q: %v", line, err)
	}
	return m
}

// reply reads messages until a reply, returning it and the events before it.
func (c *rawClient) reply() (map[string]any, []map[string]any) {
	c.t.Helper()
	var events []map[string]any
	for {
		m := c.recv()
		if _, ok := m["event"]; ok {
			events = append(events, m)
			continue
		}
		return m, events
	}
}

// cmd runs a command and returns its reply, ignoring events.
func (c *rawClient) cmd(name string, args any) map[string]any {
	c.t.Helper()
	req := map[string]any{"execute": name}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	c.send(string(b) + "\n")
	r, _ := c.reply()
	return r
}

// ok runs a command that must succeed and returns its "return".
func (c *rawClient) ok(name string, args any) any {
	c.t.Helper()
	r := c.cmd(name, args)
	if _, ok := r["return"]; !ok {
		c.t.Fatalf("%s %v: %v", name, args, r)
	}
	return r["return"]
}

// fails runs a command that must fail and returns its class and desc.
func (c *rawClient) fails(name string, args any) (class, desc string) {
	c.t.Helper()
	r := c.cmd(name, args)
	e, ok := r["error"].(map[string]any)
	if !ok {
		c.t.Fatalf("%s %v: want an error, got %v", name, args, r)
	}
	return e["class"].(string), e["desc"].(string)
}
