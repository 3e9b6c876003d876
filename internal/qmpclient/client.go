// Package qmpclient is the QMP client of vhostdm's and repagent-hub's
// command-line tools: one connection to a QMP socket, commands run one at
// a time, asynchronous events delivered on a channel to whoever asks for
// them and dropped otherwise.
//
// It replaces github.com/digitalocean/go-qemu/qmp's SocketMonitor, whose
// reader hands a command's response over in its bufio.Scanner's buffer and
// goes on scanning into that buffer: an event that arrives while the caller
// decodes the response overwrites it (the race detector reported it in the
// hub's crash test, where events and query-repagent interleave).
package qmpclient

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// maxLine bounds one message from the server (a query-block of many
// devices is a few hundred KiB).
const maxLine = 64 << 20

// Error is an error the server answered a command with.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error returns the server's description, as QMP clients show it.
func (e *Error) Error() string { return e.Desc }

// Event is an asynchronous QMP event.
type Event struct {
	Event     string         `json:"event"`
	Data      map[string]any `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// ErrClosed is returned by Run once the connection has ended.
var ErrClosed = errors.New("qmp: connection closed by the server")

// Client is a negotiated QMP connection.
type Client struct {
	conn net.Conn

	mu sync.Mutex // one command at a time

	resp      chan []byte // responses, in order (fresh memory each)
	events    chan Event
	listening atomic.Bool
	done      chan struct{} // closed when the reader ends
	readErr   error         // why it ended; set before done is closed
	closing   chan struct{} // closed by Close
	closeOnce sync.Once
}

// Dial connects to the QMP socket at addr ("unix" or "tcp" network),
// reads the server's greeting and negotiates capabilities; ctx bounds all
// of it.
func Dial(ctx context.Context, network, addr string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	greeting, err := readLine(br)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	var g struct {
		QMP *json.RawMessage `json:"QMP"`
	}
	if err := json.Unmarshal(greeting, &g); err != nil || g.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: not a QMP server: %.100q", greeting)
	}
	if _, err := conn.Write([]byte(`{"execute":"qmp_capabilities"}` + "\n")); err != nil {
		conn.Close()
		return nil, err
	}
	for {
		line, err := readLine(br)
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("qmp_capabilities: %w", err)
		}
		if isEvent(line) {
			continue
		}
		if err := responseErr(line); err != nil {
			conn.Close()
			return nil, fmt.Errorf("qmp_capabilities: %w", err)
		}
		break
	}
	conn.SetDeadline(time.Time{})
	c := &Client{conn: conn, resp: make(chan []byte, 1), events: make(chan Event, 64),
		done: make(chan struct{}), closing: make(chan struct{})}
	go c.read(br)
	return c, nil
}

// readLine returns the next line, in memory of its own.
func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		b, err := br.ReadSlice('\n')
		line = append(line, b...)
		if len(line) > maxLine {
			return nil, fmt.Errorf("qmp: message longer than %d bytes", maxLine)
		}
		switch {
		case err == nil:
			if b := bytes.TrimSpace(line); len(b) > 0 {
				return b, nil
			}
			line = line[:0]
		case errors.Is(err, bufio.ErrBufferFull):
		default:
			return nil, err
		}
	}
}

func isEvent(line []byte) bool {
	var m struct {
		Event *string `json:"event"`
	}
	return json.Unmarshal(line, &m) == nil && m.Event != nil
}

// responseErr returns the QMP error a response carries, or nil.
func responseErr(line []byte) error {
	var r struct {
		Error *Error `json:"error"`
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return fmt.Errorf("qmp: bad response %.100q: %w", line, err)
	}
	if r.Error != nil {
		return r.Error
	}
	return nil
}

// read hands responses and events over until the connection ends.
func (c *Client) read(br *bufio.Reader) {
	defer close(c.done)
	defer close(c.events)
	for {
		line, err := readLine(br)
		if err != nil {
			c.readErr = err
			return
		}
		if !isEvent(line) {
			select {
			case c.resp <- line:
			case <-c.closing:
				return
			}
			continue
		}
		if !c.listening.Load() {
			continue
		}
		var ev Event
		if json.Unmarshal(line, &ev) != nil {
			continue
		}
		select {
		case c.events <- ev:
		case <-c.closing:
			return
		}
	}
}

// Run sends one command (a JSON object) and returns the server's response
// line; a QMP error is returned as *Error along with the line.
func (c *Client) Run(command []byte) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.conn.Write(append(bytes.TrimSpace(command), '\n')); err != nil {
		return nil, err
	}
	select {
	case line := <-c.resp:
		return line, responseErr(line)
	case <-c.done:
		// A response read just before the end still counts.
		select {
		case line := <-c.resp:
			return line, responseErr(line)
		default:
		}
		if c.readErr != nil && !errors.Is(c.readErr, io.EOF) && !errors.Is(c.readErr, net.ErrClosed) {
			return nil, fmt.Errorf("%w: %v", ErrClosed, c.readErr)
		}
		return nil, ErrClosed
	}
}

// Events returns the channel events arrive on from now on; it is closed
// when the connection ends. Events that arrive before the first call are
// dropped.
func (c *Client) Events() <-chan Event {
	c.listening.Store(true)
	return c.events
}

// Close ends the connection and waits for its reader.
func (c *Client) Close() error {
	c.closeOnce.Do(func() { close(c.closing) })
	err := c.conn.Close()
	<-c.done
	return err
}
