package frontend

import (
	"bytes"
	"context"
	"net"
	"time"

	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// RawRequest sends any header, payload and fds on the client's connection
// and, if reply is set, returns the next message read (for tests of hostile
// front ends). The header's Size is sent as given.
func (c *Client) RawRequest(h Header, payload []byte, fds []int, reply bool) (Header, []byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.uc == nil {
		return Header{}, nil, ErrClientClosed
	}
	if err := c.wc.WriteRaw(append(h.AppendTo(nil), payload...), fds, 30*time.Second); err != nil {
		return wire.Header{}, nil, err
	}
	if !reply {
		return wire.Header{}, nil, nil
	}
	c.uc.SetReadDeadline(time.Now().Add(10 * time.Second))
	rh, p, rfds, err := c.wc.ReadMsg()
	c.uc.SetReadDeadline(time.Time{})
	wire.CloseFDs(rfds)
	return rh, bytes.Clone(p), err
}

// RawConn is a bare vhost-user connection that sends whatever it is given.
type RawConn struct {
	uc *net.UnixConn
	wc *wire.Conn
}

// DialRaw connects to socket without any negotiation.
func DialRaw(ctx context.Context, socket string) (*RawConn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	uc := nc.(*net.UnixConn)
	return &RawConn{uc: uc, wc: wire.NewConn(uc)}, nil
}

// Send writes raw bytes (a header and payload, or any part of one) with fds.
func (r *RawConn) Send(b []byte, fds []int) error { return r.wc.WriteRaw(b, fds, 30*time.Second) }

// Recv reads one message, waiting at most timeout.
func (r *RawConn) Recv(timeout time.Duration) (Header, []byte, []int, error) {
	r.uc.SetReadDeadline(time.Now().Add(timeout))
	defer r.uc.SetReadDeadline(time.Time{})
	h, p, fds, err := r.wc.ReadMsg()
	return h, bytes.Clone(p), fds, err
}

// CloseWrite shuts down the sending side, as a peer that stops in the
// middle of a message.
func (r *RawConn) CloseWrite() error { return r.uc.CloseWrite() }

// Close closes the connection.
func (r *RawConn) Close() error { return r.uc.Close() }
