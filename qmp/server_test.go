package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"github.com/vhostdm/vhostdm/mapper"
)

func TestGreeting(t *testing.T) {
	e := startEnv(t, func(c *Config) { c.Version = "1.22.333-rc1" })
	c := e.dial()
	g := c.recv()
	want := `map[QMP:map[capabilities:[] version:map[package:vhostdm 1.22.333-rc1 qemu:map[major:1 micro:333 minor:22]]]]`
	if got := fmt.Sprint(g); got != want {
		t.Fatalf("greeting %s, want %s", got, want)
	}
}

func TestSocketIsPrivate(t *testing.T) {
	e := startEnv(t, nil)
	fi, err := os.Stat(e.sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a socket with 0600", fi.Mode())
	}
	// No temporary names are left in the directory.
	ents, _ := os.ReadDir(filepath.Dir(e.sock))
	if len(ents) != 1 {
		t.Fatalf("directory holds %v, want only the socket", ents)
	}
}

func TestListenUnix(t *testing.T) {
	dir := shortDir(t)
	path := filepath.Join(dir, "s")

	l, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	// A live socket is not taken over.
	if _, err := ListenUnix(path); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("second listen: %v, want address already in use", err)
	}
	l.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}

	// A stale socket is replaced.
	stale, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	l, err = ListenUnix(path)
	if err != nil {
		t.Fatalf("listen over a stale socket: %v", err)
	}
	l.Close()

	// Another kind of file is left alone.
	os.WriteFile(path, []byte("data"), 0o644)
	if _, err := ListenUnix(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen over a file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "data" {
		t.Fatal("file was replaced")
	}
}

func TestMessagesNeedNoSeparator(t *testing.T) {
	e := startEnv(t, nil)
	c := e.dial()
	c.recv()
	// Two messages in one write, one message split over several writes.
	c.send(`{"execute":"qmp_capabilities","id":1}{"execute":"query-version","id":2}`)
	for _, id := range []float64{1, 2} {
		if r := c.recv(); r["id"] != id || r["return"] == nil {
			t.Fatalf("reply %v, want a return with id %v", r, id)
		}
	}
	for _, part := range []string{`{"exec`, `ute": "dm-li`, `st", "id"`, `: 3}`} {
		c.send(part)
		time.Sleep(time.Millisecond)
	}
	if r := c.recv(); r["id"] != float64(3) {
		t.Fatalf("reply %v", r)
	}
}

// TestResetByte: a 0xFF byte ends a half-sent message with an error, as the
// QMP specification promises clients, and the next message is served.
func TestResetByte(t *testing.T) {
	e := startEnv(t, nil)
	c := e.negotiated()
	c.send("{\"execute\": \"dm-list\", \"arguments\": {\"name\xff")
	if r := c.recv(); r["error"] == nil {
		t.Fatalf("after 0xFF: %v, want an error", r)
	}
	c.ok("dm-list", nil)
}

func TestOversizeMessage(t *testing.T) {
	e := startEnv(t, func(c *Config) { c.MaxMessageBytes = 4096 })
	c := e.negotiated()

	// A long string, far beyond the limit, in one message.
	big := `{"execute":"dm-create","arguments":{"name":"` + strings.Repeat("x", 1<<20) + `"},"id":9}`
	c.send(big)
	class, desc := c.fails("dm-list", nil) // the reply to big comes first
	if class != ClassGenericError || !strings.Contains(desc, "longer than 4096 bytes") {
		t.Fatalf("oversize: %s %q", class, desc)
	}
	if got := c.ok("dm-list", nil); fmt.Sprint(got) != "[]" {
		t.Fatalf("dm-list after oversize: %v (the oversize message ran?)", got)
	}

	// Deep nesting, within the byte limit of the default server.
	e2 := startEnv(t, nil)
	c2 := e2.negotiated()
	c2.send(`{"execute":"dm-list","id":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + "}")
	r := c2.recv()
	if e, _ := r["error"].(map[string]any); e == nil || !strings.Contains(e["desc"].(string), "nesting deeper than 1024") {
		t.Fatalf("deep nesting: %v", r)
	}
	c2.ok("dm-list", nil)
}

func TestInvalidTableLeavesLiveTable(t *testing.T) {
	e := startEnv(t, nil)
	c := e.negotiated()
	c.ok("dm-create", map[string]any{"name": "vm0", "table": "0 1024 qmptest a\n1024 1024 qmptest b"})
	before := c.ok("dm-table", map[string]any{"name": "vm0"})
	for _, cmd := range []string{"dm-reload", "dm-load"} {
		class, desc := c.fails(cmd, map[string]any{"name": "vm0", "table": "0 1024 qmptest a\n1024 1024 qmptest b\n3000 10 qmptest c"})
		if class != ClassGenericError || !strings.Contains(desc, "line 3: gap in table") {
			t.Fatalf("%s: %s %q, want GenericError naming line 3", cmd, class, desc)
		}
	}
	if after := c.ok("dm-table", map[string]any{"name": "vm0"}); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("live table changed: %v, was %v", after, before)
	}
	d, _ := e.m.Get("vm0")
	if i := d.Info(); !i.LiveTable || i.InactiveTable || i.Size != 2048 || i.Suspended {
		t.Fatalf("device after invalid reloads: %+v", i)
	}
}

func TestRemoveBusy(t *testing.T) {
	e := startEnv(t, nil)
	c := e.negotiated()
	c.ok("dm-create", map[string]any{"name": "vm0", "table": "0 8 qmptest a"})
	d, _ := e.m.Get("vm0")
	d.Open()
	if class, desc := c.fails("dm-remove", map[string]any{"name": "vm0"}); class != ClassGenericError || !strings.Contains(desc, "device is open") {
		t.Fatalf("remove of an open device: %s %q", class, desc)
	}
	if info := c.ok("dm-info", map[string]any{"name": "vm0"}).(map[string]any); info["open-count"] != float64(1) {
		t.Fatalf("open-count %v", info["open-count"])
	}
	c.ok("dm-remove", map[string]any{"name": "vm0", "force": true})
}

func TestExportOptionsPassed(t *testing.T) {
	e := startEnv(t, nil)
	c := e.negotiated()
	c.ok("dm-create", map[string]any{"name": "vm0", "table": "0 8 qmptest a"})
	c.ok("block-export-add", map[string]any{"type": "vhost-user-blk", "id": "d0", "node-name": "vm0",
		"addr": map[string]any{"type": "unix", "path": "/run/d0.sock"}, "writable": true, "num-queues": 4,
		"logical-block-size": 4096, "serial": "S0", "socket-owner": "root", "socket-group": "0", "socket-mode": "0660"})
	c.ok("block-export-add", map[string]any{"type": "vhost-user-blk", "id": "d1", "node-name": "vm0",
		"addr": map[string]any{"type": "unix", "path": "/run/d1.sock"}})
	for _, bad := range []struct{ key, val, want string }{
		{"socket-owner", "no-such-user-vhostdm", `socket-owner "no-such-user-vhostdm": no such user`},
		{"socket-group", "no-such-group-vhostdm", `socket-group "no-such-group-vhostdm": no such group`},
		{"socket-mode", "0999", `socket-mode "0999": want an octal mode`},
	} {
		class, desc := c.fails("block-export-add", map[string]any{"type": "vhost-user-blk", "id": "d2", "node-name": "vm0",
			"addr": map[string]any{"type": "unix", "path": "/run/d2.sock"}, bad.key: bad.val})
		if class != ClassGenericError || !strings.Contains(desc, bad.want) {
			t.Errorf("%s %q: %s %q, want %q", bad.key, bad.val, class, desc, bad.want)
		}
	}
	want := map[string]ExportOptions{
		"d0": {Type: "vhost-user-blk", ID: "d0", NodeName: "vm0", Socket: "/run/d0.sock", Writable: true, NumQueues: 4, LogicalBlockSize: 4096, Serial: "S0",
			SocketOwner: "root", SocketGroup: "0", SocketMode: 0o660},
		"d1": {Type: "vhost-user-blk", ID: "d1", NodeName: "vm0", Socket: "/run/d1.sock", NumQueues: 1, LogicalBlockSize: 512},
	}
	if _, ok := e.exports.get("d2"); ok {
		t.Error("an export with bad socket keys was added")
	}
	for id, w := range want {
		if got, _ := e.exports.get(id); !reflect.DeepEqual(got, w) {
			t.Errorf("export %s: %+v, want %+v", id, got, w)
		}
	}
}

func TestNoExports(t *testing.T) {
	e := startEnv(t, func(c *Config) { c.Exports = nil })
	c := e.negotiated()
	if got := c.ok("query-block-exports", nil); fmt.Sprint(got) != "[]" {
		t.Fatalf("query-block-exports: %v", got)
	}
	c.ok("dm-create", map[string]any{"name": "vm0", "table": "0 8 qmptest a"})
	class, _ := c.fails("block-export-add", map[string]any{"type": "vhost-user-blk", "id": "d0", "node-name": "vm0",
		"addr": map[string]any{"type": "unix", "path": "/run/d0.sock"}})
	class2, _ := c.fails("block-export-del", map[string]any{"id": "d0"})
	if class != ClassGenericError || class2 != ClassGenericError {
		t.Fatalf("export commands without Exports: %s, %s", class, class2)
	}
}

// TestEventsToEveryClient: every negotiated client gets every event; a
// client still negotiating gets none.
func TestEventsToEveryClient(t *testing.T) {
	e := startEnv(t, nil)
	a, b := e.negotiated(), e.negotiated()
	late := e.dial()
	late.recv() // greeting only

	a.ok("dm-create", map[string]any{"name": "vm0", "table": "0 1024 qmptest a"})
	a.send(`{"execute":"dm-reload","arguments":{"name":"vm0","table":"0 1024 qmptest a\n1024 1024 qmptest b"}}`)
	reply, events := a.reply()
	if reply["return"] == nil || len(events) != 1 || events[0]["event"] != EventDeviceResized {
		t.Fatalf("client a: reply %v after events %v", reply, events)
	}
	got := b.recv()
	data := got["data"].(map[string]any)
	if got["event"] != EventDeviceResized || data["name"] != "vm0" || data["old-size"] != float64(1024) || data["new-size"] != float64(2048) {
		t.Fatalf("client b got %v", got)
	}
	ts := got["timestamp"].(map[string]any)
	if sec := ts["seconds"].(float64); sec < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Fatalf("timestamp %v", ts)
	}

	e.srv.Emit(EventVhostUserConnected, map[string]string{"id": "disk0"})
	for _, c := range []*rawClient{a, b} {
		if m := c.recv(); m["event"] != EventVhostUserConnected || fmt.Sprint(m["data"]) != "map[id:disk0]" {
			t.Fatalf("got %v", m)
		}
	}
	// The late client's first message is its negotiation reply: no event
	// was queued for it.
	if r := late.cmd("qmp_capabilities", nil); r["return"] == nil {
		t.Fatalf("late client: %v", r)
	}
	e.srv.Emit(EventVhostUserDisconnected, map[string]string{"id": "disk0"})
	if m := late.recv(); m["event"] != EventVhostUserDisconnected {
		t.Fatalf("late client after negotiation: %v", m)
	}
}

// TestSlowClientDisconnected: Emit never blocks; a client that does not
// read is disconnected once its queue is full, and others carry on.
func TestSlowClientDisconnected(t *testing.T) {
	e := startEnv(t, nil)
	slow := e.negotiated()
	fast := e.negotiated()
	const batches, batch = 100, 100
	for i := 0; i < batches; i++ {
		for j := 0; j < batch; j++ {
			e.srv.Emit(EventDM, map[string]any{"name": "vm0", "target": "t", "event": "e", "data": map[string]int{"n": i*batch + j}})
		}
		// fast reads everything.
		for j := 0; j < batch; j++ {
			if m := fast.recv(); m["event"] != EventDM {
				t.Fatalf("fast client: %v", m)
			}
		}
	}
	// slow gets some events, then the end of the connection.
	slow.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var err error
	n := 0
	for err == nil {
		_, err = slow.r.ReadString('\n')
		n++
	}
	if n >= batches*batch || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("slow client read %d messages, then %v; want disconnection", n, err)
	}
	if !strings.Contains(e.logs.String(), "client does not read its events") {
		t.Fatal("no log line about the slow client")
	}
	fast.ok("dm-list", nil)
}

func TestQuit(t *testing.T) {
	e := startEnv(t, nil)
	c := e.negotiated()
	if r := c.cmd("quit", nil); r["return"] == nil {
		t.Fatalf("quit: %v", r)
	}
	select {
	case <-e.quits:
	case <-time.After(10 * time.Second):
		t.Fatal("OnQuit not called")
	}
}

func TestQuitWithoutHookClosesServer(t *testing.T) {
	m := mapper.NewManager(mapper.ManagerOptions{})
	srv := NewServer(Config{Manager: m})
	l, err := ListenUnix(filepath.Join(shortDir(t), "s"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	conn, err := goqmp.NewSocketMonitor("unix", l.Addr().String(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.Connect(); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Run([]byte(`{"execute":"quit"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrServerClosed) {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server still running after quit")
	}
	conn.Disconnect()
}

func TestServeStopsWithContext(t *testing.T) {
	srv := NewServer(Config{Manager: mapper.NewManager(mapper.ManagerOptions{})})
	path := filepath.Join(shortDir(t), "s")
	l, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	conn.Read(buf) // greeting
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Read(buf); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client still connected after Serve returned: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
	if err := srv.Serve(context.Background(), l); err == nil {
		t.Fatal("Serve on a closed listener succeeded")
	}
	srv.Close()
	if err := srv.Serve(context.Background(), l); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
}

// TestHalfClose: a client that sends its commands and shuts down its
// writing side still gets every reply.
func TestHalfClose(t *testing.T) {
	e := startEnv(t, nil)
	c := e.dial()
	c.send(`{"execute":"qmp_capabilities"}` + strings.Repeat(`{"execute":"query-version"}`, 50))
	c.conn.(*net.UnixConn).CloseWrite()
	c.recv()
	for i := 0; i < 51; i++ {
		if r := c.recv(); r["return"] == nil {
			t.Fatalf("reply %d: %v", i, r)
		}
	}
}

// TestGoQEMU drives the server with the client library vhostdm ctl uses.
func TestGoQEMU(t *testing.T) {
	e := startEnv(t, nil)
	mon, err := goqmp.NewSocketMonitor("unix", e.sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := mon.Connect(); err != nil {
		t.Fatal(err)
	}
	if mon.Version.Package != "vhostdm 0.1.0" || mon.Version.String() != "0.1.0" {
		t.Fatalf("version %+v", mon.Version)
	}
	ctx, cancel := context.WithCancel(context.Background())
	events, err := mon.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	run := func(cmd string, args any) (json.RawMessage, error) {
		b, _ := json.Marshal(goqmp.Command{Execute: cmd, Args: args})
		out, err := mon.Run(b)
		if err != nil {
			return nil, err
		}
		var r struct {
			Return json.RawMessage `json:"return"`
		}
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		return r.Return, nil
	}
	must := func(cmd string, args any) string {
		t.Helper()
		r, err := run(cmd, args)
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		return string(r)
	}
	must("dm-create", map[string]any{"name": "vm0", "table": "0 8 qmptest a"})
	if got := must("dm-list", nil); got != `[{"name":"vm0","size":8}]` {
		t.Fatalf("dm-list: %s", got)
	}
	if got := must("dm-message", map[string]any{"name": "vm0", "sector": 0, "message": "ping"}); got != `{"reply":"pong"}` {
		t.Fatalf("dm-message: %s", got)
	}
	if _, err := run("dm-info", map[string]any{"name": "nope"}); err == nil || err.Error() != "device nope not found" {
		t.Fatalf("dm-info nope: %v", err)
	}
	if _, err := run("no-such-command", nil); err == nil || !strings.Contains(err.Error(), "has not been found") {
		t.Fatalf("unknown command: %v", err)
	}
	if _, err := run("dm-info", map[string]any{"name": 1}); err == nil || !strings.Contains(err.Error(), "Invalid parameter type") {
		t.Fatalf("wrong type: %v", err)
	}
	// go-qemu hands events over unbuffered, so they are read while the
	// command runs.
	reloaded := make(chan error, 1)
	go func() {
		_, err := run("dm-reload", map[string]any{"name": "vm0", "table": "0 16 qmptest b"})
		reloaded <- err
	}()
	select {
	case ev := <-events:
		if ev.Event != EventDeviceResized || ev.Data["name"] != "vm0" || ev.Data["new-size"] != float64(16) {
			t.Fatalf("event %+v", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no event")
	}
	if err := <-reloaded; err != nil {
		t.Fatalf("dm-reload: %v", err)
	}
	cancel()
	if err := mon.Disconnect(); err != nil {
		t.Fatal(err)
	}
}

func TestHideKeys(t *testing.T) {
	for _, c := range []struct{ target, in, want string }{
		{"crypt", "aes-xts-plain64 0123abcd 0 /dev/sda 0", "aes-xts-plain64 00000000 0 /dev/sda 0"},
		{"crypt", "aes-xts-plain64 :64:logon:vm0 0 /dev/sda 0", "aes-xts-plain64 :64:logon:vm0 0 /dev/sda 0"},
		{"crypt", "aes-xts-plain64", "aes-xts-plain64"},
		{"crypt", "aes-xts-plain64 ffff", "aes-xts-plain64 0000"},
		{"integrity", "/dev/sda 0 32 J 2 internal_hash:hmac(sha256):abcd journal_mac:hmac(sha256):ef01", "/dev/sda 0 32 J 2 internal_hash:hmac(sha256):0000 journal_mac:hmac(sha256):0000"},
		{"integrity", "/dev/sda 0 32 J 1 internal_hash:crc32c", "/dev/sda 0 32 J 1 internal_hash:crc32c"},
		{"linear", "/dev/sda 0123abcd", "/dev/sda 0123abcd"},
	} {
		if got := hideKeys(c.target, c.in); got != c.want {
			t.Errorf("hideKeys(%s, %q) = %q, want %q", c.target, c.in, got, c.want)
		}
	}
}

func TestMsgReader(t *testing.T) {
	in := "  {\"a\": \"}\\\"{\"}\n[1,[2]] 42 true\"s\"'q\\'\"' {'x': 'y\\n'} } {\"b\":1"
	want := []string{`{"a": "}\"{"}`, `[1,[2]]`, `42`, `true`, `"s"`, `"q'\""`, `{"x": "y\n"}`, "error", "EOF"}
	r := newMsgReader(strings.NewReader(in), 100)
	for i, w := range want {
		b, err := r.next()
		got := string(b)
		var qe *Error
		switch {
		case errors.As(err, &qe):
			got = "error"
		case err != nil:
			got = err.Error()
		}
		if got != w {
			t.Fatalf("message %d: %q, want %q", i, got, w)
		}
	}
}

func TestVersionParsing(t *testing.T) {
	for in, want := range map[string]string{
		"":          "{{0 0 0} vhostdm}",
		"2":         "{{2 0 0} vhostdm 2}",
		"0.1.0":     "{{0 1 0} vhostdm 0.1.0}",
		"10.20.30x": "{{10 20 30} vhostdm 10.20.30x}",
		"1.2.3.4":   "{{1 2 3} vhostdm 1.2.3.4}",
	} {
		if got := fmt.Sprint(parseVersion(in)); got != want {
			t.Errorf("parseVersion(%q) = %s, want %s", in, got, want)
		}
	}
}

// TestEventRightAfterNegotiation: once a client has read the reply to
// qmp_capabilities, it gets every event; none comes before that reply.
func TestEventRightAfterNegotiation(t *testing.T) {
	e := startEnv(t, nil)
	stop := make(chan struct{})
	emitted := make(chan struct{})
	go func() { // events raised all along must never precede the reply
		defer close(emitted)
		for {
			select {
			case <-stop:
				return
			default:
				e.srv.Emit("NOISE", nil)
				time.Sleep(100 * time.Microsecond)
			}
		}
	}()
	for i := 0; i < 50; i++ {
		c := e.dial()
		c.recv()
		c.send(`{"execute":"qmp_capabilities"}`)
		if r := c.recv(); r["return"] == nil {
			t.Fatalf("round %d: first message after qmp_capabilities: %v", i, r)
		}
		e.srv.Emit(EventVhostUserConnected, map[string]string{"id": "d"})
		for {
			m := c.recv()
			if m["event"] == EventVhostUserConnected {
				break
			}
			if m["event"] != "NOISE" {
				t.Fatalf("round %d: %v", i, m)
			}
		}
		c.conn.Close()
	}
	close(stop)
	<-emitted
}
