package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// FuzzQMPCommand feeds arbitrary bytes to a negotiated client's reader and
// dispatcher against a fresh server. It checks that nothing panics or hangs
// and that every message gets one well-formed reply: ASCII JSON,
// CRLF-terminated, with exactly one of "return" and "error", a known error
// class, and the request's id when it had one. The seed corpus is in
// testdata/fuzz/FuzzQMPCommand.
func FuzzQMPCommand(f *testing.F) {
	f.Add([]byte(`{"execute":"dm-create","arguments":{"name":"vm0","table":"0 8 qmptest a"}}{"execute":"dm-info","arguments":{"name":"vm0"},"id":1}`))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f.Fuzz(func(t *testing.T, data []byte) {
		// A hang is a failure too: it would stall the client for good.
		errc := make(chan error, 1)
		go func() { errc <- fuzzSession(log, data) }()
		select {
		case err := <-errc:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("input %q: no reply within 10s", data)
		}
	})
}

// fuzzSession runs data as one client's input, at most 64 messages.
func fuzzSession(log *slog.Logger, data []byte) error {
	var s *Server
	m := mapper.NewManager(mapper.ManagerOptions{Logger: log, Events: func(e mapper.Event) { s.MapperEvent(e) }})
	defer m.Close()
	s = NewServer(Config{Manager: m, Exports: newFakeExports(), Logger: log, OnQuit: func() {}})
	c := &client{s: s, log: log, out: make(chan outMsg, 1), done: make(chan struct{})}
	c.commandMode = true
	rd := newMsgReader(bytes.NewReader(data), 4096)
	for range 64 {
		raw, err := rd.next()
		var r response
		var qe *Error
		switch {
		case errors.As(err, &qe):
			r = response{Error: qe}
		case err != nil:
			return nil
		default:
			r, _, _ = c.handle(raw)
		}
		b, err := encode(r)
		if err != nil {
			return fmt.Errorf("reply to %q does not encode: %v", raw, err)
		}
		if err := checkReply(raw, b); err != nil {
			return err
		}
	}
	return nil
}

// checkReply checks one encoded reply b to the request req.
func checkReply(req, b []byte) error {
	if !bytes.HasSuffix(b, []byte("\r\n")) || bytes.Count(b, []byte("\n")) != 1 {
		return fmt.Errorf("reply %q is not one CRLF-terminated line", b)
	}
	for _, x := range b {
		if x >= 0x80 {
			return fmt.Errorf("reply %q is not ASCII", b)
		}
	}
	var r struct {
		Return *json.RawMessage `json:"return"`
		Error  *Error           `json:"error"`
		ID     json.RawMessage  `json:"id"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("reply %q: %v", b, err)
	}
	if (r.Return == nil) == (r.Error == nil) {
		return fmt.Errorf("reply %q to %q: want exactly one of return and error", b, req)
	}
	if r.Error != nil {
		switch r.Error.Class {
		case ClassGenericError, ClassCommandNotFound, ClassDeviceNotFound:
		default:
			return fmt.Errorf("reply %q: unknown class", b)
		}
		if r.Error.Desc == "" {
			return fmt.Errorf("reply %q: empty desc", b)
		}
	}
	var in map[string]json.RawMessage
	if json.Unmarshal(req, &in) == nil {
		if id, ok := in["id"]; ok && !jsonEqual(id, r.ID) {
			return fmt.Errorf("reply %q to %q: id not echoed", b, req)
		}
	}
	return nil
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xb, _ := json.Marshal(x)
	yb, _ := json.Marshal(y)
	return bytes.Equal(xb, yb)
}
