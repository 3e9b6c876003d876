package harness

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"time"
)

// QMP is a minimal QMP client for the harness: greeting, capabilities
// negotiation, execute, skipping events. It serves tests that drive
// qemu-storage-daemon or vhostdm's QMP socket.
type QMP struct {
	conn net.Conn
	r    *bufio.Reader
	id   int
	// Events holds the events read while waiting for replies.
	Events []json.RawMessage
}

// DialQMP connects to a QMP socket and negotiates capabilities.
func DialQMP(path string, timeout time.Duration) (*QMP, error) {
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", path, err)
	}
	q := &QMP{conn: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(timeout))
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	line, err := q.r.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &greeting)
	}
	if err != nil || greeting.QMP == nil {
		c.Close()
		return nil, fmt.Errorf("qmp %s: no greeting (%v): %q", path, err, line)
	}
	if _, err := q.Execute("qmp_capabilities", nil, timeout); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

// QMPError is an error reply.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error implements error.
func (e *QMPError) Error() string { return e.Class + ": " + e.Desc }

// Execute runs a command and returns its "return" value.
func (q *QMP) Execute(cmd string, args any, timeout time.Duration) (json.RawMessage, error) {
	q.id++
	req := map[string]any{"execute": cmd, "id": q.id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	q.conn.SetDeadline(time.Now().Add(timeout))
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *QMPError       `json:"error"`
			Event  string          `json:"event"`
			ID     json.RawMessage `json:"id"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("qmp %s: bad reply %q: %v", cmd, line, err)
		}
		if resp.Event != "" {
			q.Events = append(q.Events, json.RawMessage(line))
			continue
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, resp.Error)
		}
		return resp.Return, nil
	}
}

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }
