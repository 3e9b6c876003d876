package qmpclient

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// server is a QMP server for the client's tests: it sends a burst of
// events before every response, so that a client that kept a response in
// a buffer it reads events into would return garbage (the race detector
// catches that too).
func server(t *testing.T, events int) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				fmt.Fprintf(c, `{"QMP": {"version": {"qemu": {"major": 10}}, "capabilities": []}}`+"\r\n")
				sc := bufio.NewScanner(c)
				for n := 0; sc.Scan(); n++ {
					var cmd struct {
						Execute   string         `json:"execute"`
						Arguments map[string]any `json:"arguments"`
					}
					if err := json.Unmarshal(sc.Bytes(), &cmd); err != nil {
						return
					}
					for i := range events {
						fmt.Fprintf(c, `{"event": "TICK", "data": {"n": %d, "pad": %q}, "timestamp": {"seconds": 1, "microseconds": 2}}`+"\n", i, strings.Repeat("x", 100*i))
					}
					switch cmd.Execute {
					case "fail":
						fmt.Fprintf(c, `{"error": {"class": "GenericError", "desc": "it failed"}}`+"\n")
					case "bye":
						return
					default:
						b, _ := json.Marshal(map[string]any{"return": map[string]any{"cmd": cmd.Execute, "n": n, "args": cmd.Arguments}})
						fmt.Fprintf(c, "%s\n", b)
					}
				}
			}()
		}
	}()
	return sock
}

func dial(t *testing.T, sock string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestRunBetweenEvents: responses are returned intact while events stream
// in around them, in order, from concurrent callers.
func TestRunBetweenEvents(t *testing.T) {
	c := dial(t, server(t, 40))
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 25 {
				want := fmt.Sprintf("cmd-%d-%d", g, i)
				line, err := c.Run([]byte(fmt.Sprintf(`{"execute": %q, "arguments": {"k": %q}}`, want, strings.Repeat("v", i*50))))
				if err != nil {
					t.Error(err)
					return
				}
				var r struct {
					Return struct {
						Cmd  string         `json:"cmd"`
						Args map[string]any `json:"args"`
					} `json:"return"`
				}
				if err := json.Unmarshal(line, &r); err != nil || r.Return.Cmd != want || r.Return.Args["k"] != strings.Repeat("v", i*50) {
					t.Errorf("response %q (%v), want the answer to %s", line, err, want)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// TestErrorsAndEvents: a QMP error is an *Error with the server's class
// and description; events arrive once asked for; a server that goes away
// ends Run with ErrClosed and closes the event channel.
func TestErrorsAndEvents(t *testing.T) {
	c := dial(t, server(t, 3))
	ev := c.Events()
	_, err := c.Run([]byte(`{"execute": "fail"}`))
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "GenericError" || qe.Desc != "it failed" || err.Error() != "it failed" {
		t.Fatalf("error response: %v", err)
	}
	for i := range 3 {
		select {
		case e := <-ev:
			if e.Event != "TICK" || e.Data["n"] != float64(i) || e.Timestamp.Seconds != 1 || e.Timestamp.Microseconds != 2 {
				t.Errorf("event %d: %+v", i, e)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("event %d did not arrive", i)
		}
	}
	if _, err := c.Run([]byte(`{"execute": "bye"}`)); !errors.Is(err, ErrClosed) {
		t.Errorf("run on a connection the server closed: %v, want ErrClosed", err)
	}
	deadline := time.After(5 * time.Second)
	for open := true; open; {
		select {
		case _, open = <-ev:
		case <-deadline:
			t.Fatal("event channel not closed after the connection ended")
		}
	}
}

// TestNotQMP: a socket that does not greet as QMP is refused at Dial.
func TestNotQMP(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			fmt.Fprintf(c, "220 smtp ready\r\n")
			time.Sleep(time.Second)
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c, err := Dial(ctx, "unix", sock); err == nil || !strings.Contains(err.Error(), "not a QMP server") {
		if c != nil {
			c.Close()
		}
		t.Fatalf("dial of a non-QMP socket: %v", err)
	}
}
