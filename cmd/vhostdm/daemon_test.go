package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/config"
)

// childEnv makes the test binary run `vhostdm` with its arguments instead
// of the tests: the daemon as a real child process, for kill -9, SIGTERM
// and hostile peers.
const childEnv = "VHOSTDM_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// child is `vhostdm serve` running as a child process.
type child struct {
	cmd  *exec.Cmd
	log  *syncBuffer
	done chan struct{} // closed when the process has exited; err is then set
	err  error
}

// syncBuffer is the child's output, written by the exec goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startChild starts `vhostdm serve -c config` and waits until every socket
// in waitFor answers a connect. The child is killed at the end of the test
// and its output logged if the test failed.
func startChild(t *testing.T, config string, waitFor ...string) *child {
	t.Helper()
	c := &child{cmd: exec.Command(os.Args[0], "serve", "-c", config), log: &syncBuffer{}, done: make(chan struct{})}
	c.cmd.Env = append(os.Environ(), childEnv+"=1")
	c.cmd.Stdout, c.cmd.Stderr = c.log, c.log
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.err = c.cmd.Wait(); close(c.done) }()
	t.Cleanup(func() {
		c.cmd.Process.Kill()
		<-c.done
		if t.Failed() {
			t.Logf("daemon %s output:\n%s", config, c.log.String())
		}
	})
	c.waitSockets(t, waitFor...)
	return c
}

// waitSockets waits until every socket answers a connect.
func (c *child) waitSockets(t *testing.T, socks ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, s := range socks {
		for {
			conn, err := net.Dial("unix", s)
			if err == nil {
				conn.Close()
				break
			}
			select {
			case <-c.done:
				t.Fatalf("daemon exited (%v) before %s answered:\n%s", c.err, s, c.log.String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s does not answer: %v", s, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// signal sends sig and returns the exit code and how long the exit took.
func (c *child) signal(t *testing.T, sig syscall.Signal) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	c.cmd.Process.Signal(sig)
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("daemon did not exit after %v", sig)
	}
	return c.cmd.ProcessState.ExitCode(), time.Since(start)
}

// kill kills the daemon with SIGKILL (kill -9) and waits for it to be gone.
func (c *child) kill(t *testing.T) {
	t.Helper()
	c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
}

// stop sends SIGTERM and requires exit status 0 within 5 s.
func (c *child) stop(t *testing.T) {
	t.Helper()
	code, took := c.signal(t, syscall.SIGTERM)
	if code != 0 || took > 5*time.Second {
		t.Errorf("SIGTERM: exit %d after %v, want 0 within 5 s", code, took)
	}
	t.Logf("daemon stopped %v after SIGTERM", took.Round(time.Millisecond))
}

// qmpConn is a minimal QMP client for the tests.
type qmpConn struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

// dialQMP connects to a QMP socket (retrying for 5 s while it appears)
// and negotiates capabilities.
func dialQMP(t *testing.T, path string) *qmpConn {
	t.Helper()
	var c net.Conn
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err = net.DialTimeout("unix", path, 5*time.Second); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("QMP %s: %v", path, err)
	}
	t.Cleanup(func() { c.Close() })
	q := &qmpConn{t: t, c: c, r: bufio.NewReader(c)}
	q.c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := q.r.ReadBytes('\n'); err != nil {
		t.Fatalf("QMP greeting on %s: %v", path, err)
	}
	q.must("qmp_capabilities", nil)
	return q
}

// exec runs a command and returns its return value or its error text
// ("Class: desc").
func (q *qmpConn) exec(cmd string, args any) (json.RawMessage, error) {
	q.c.SetDeadline(time.Now().Add(20 * time.Second))
	msg := map[string]any{"execute": cmd}
	if args != nil {
		msg["arguments"] = args
	}
	b, _ := json.Marshal(msg)
	if _, err := q.c.Write(b); err != nil {
		return nil, err
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("%s: %w", cmd, err)
		}
		var r struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, fmt.Errorf("%s: %q: %w", cmd, line, err)
		}
		switch {
		case r.Event != "":
			continue
		case r.Error != nil:
			return nil, &qmpError{class: r.Error.Class, desc: r.Error.Desc}
		}
		return r.Return, nil
	}
}

// qmpError is a QMP error reply.
type qmpError struct{ class, desc string }

func (e *qmpError) Error() string { return e.class + ": " + e.desc }

// call runs a command; it returns the return value or the error's desc.
// A broken connection fails the test.
func (q *qmpConn) call(cmd string, args any) (json.RawMessage, string) {
	q.t.Helper()
	r, err := q.exec(cmd, args)
	if qe, ok := err.(*qmpError); ok {
		return nil, qe.desc
	}
	if err != nil {
		q.t.Fatal(err)
	}
	return r, ""
}

// must runs a command that must succeed.
func (q *qmpConn) must(cmd string, args any) json.RawMessage {
	q.t.Helper()
	r, e := q.call(cmd, args)
	if e != "" {
		q.t.Fatalf("%s %v: %s", cmd, args, e)
	}
	return r
}

// serveInProcess loads the configuration at path and starts the daemon in
// this process; the daemon is closed and the context cancelled when the
// test ends.
func serveInProcess(t *testing.T, path string) (*daemon, context.Context) {
	t.Helper()
	c, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	// The daemon's warnings and errors are shown if the test fails (a
	// front end sees only that a request failed, not why).
	logs := new(syncBuffer)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log (warnings and errors):\n%s", logs.String())
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	d, err := startDaemon(ctx, c, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close(); cancel() })
	return d, ctx
}
