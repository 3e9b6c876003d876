package wire

import (
	"fmt"
	"io"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// Conn frames vhost-user messages on a unix stream socket: a message is a
// header, with any fds as SCM_RIGHTS on its first bytes, then its payload.
// Both sides of the protocol read and write through it: the back end its
// front end's requests and the back-end channel's replies, the front end
// the back end's replies and back-end requests. A Conn is not safe for
// concurrent readers or concurrent writers.
type Conn struct {
	uc      *net.UnixConn
	strict  bool
	onStart func()
	hbuf    [HeaderSize]byte
	pbuf    [MaxPayload]byte
	oob     []byte
	wbuf    []byte
}

// ConnOption configures a Conn.
type ConnOption func(*Conn)

// Strict makes ReadMsg check each header with DecodeHeader (version,
// flags, size) before it reads the payload, as a back end reads its front
// end's requests. Without it only the size bound is checked.
func Strict() ConnOption { return func(c *Conn) { c.strict = true } }

// OnStart makes ReadMsg call fn once the first bytes of a message have
// arrived, before it reads the rest (a back end bounds the time the rest
// may take).
func OnStart(fn func()) ConnOption { return func(c *Conn) { c.onStart = fn } }

// NewConn frames messages on uc.
func NewConn(uc *net.UnixConn, opts ...ConnOption) *Conn {
	c := &Conn{uc: uc, oob: make([]byte, unix.CmsgSpace(MaxFDs*4)), wbuf: make([]byte, 0, HeaderSize+MaxPayload)}
	for _, o := range opts {
		o(c)
	}
	return c
}

// UnixConn returns the socket.
func (c *Conn) UnixConn() *net.UnixConn { return c.uc }

// ReadMsg reads one message: the header with any fds, then the payload. The
// payload is valid until the next ReadMsg; the caller owns the fds (also
// on error: none are returned then, they are closed). A message with more
// than MaxFDs fds is an error.
func (c *Conn) ReadMsg() (Header, []byte, []int, error) {
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(c.hbuf[:], c.oob)
	if err == nil && n > 0 && c.onStart != nil {
		c.onStart()
	}
	var fds []int
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(c.oob[:oobn])
		if perr == nil {
			for _, m := range msgs {
				if f, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, f...)
				}
			}
		}
	}
	fail := func(err error) (Header, []byte, []int, error) {
		CloseFDs(fds)
		return Header{}, nil, nil, err
	}
	if err != nil {
		return fail(err)
	}
	if n == 0 {
		return fail(io.EOF)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return fail(fmt.Errorf("message carries more than %d file descriptors", MaxFDs))
	}
	if n < HeaderSize {
		if _, err := io.ReadFull(c.uc, c.hbuf[n:]); err != nil {
			return fail(fmt.Errorf("short header: %w", err))
		}
	}
	var h Header
	if c.strict {
		if h, err = DecodeHeader(c.hbuf[:]); err != nil {
			return fail(err)
		}
	} else {
		h = Header{Code: ReqCode(le.Uint32(c.hbuf[:])), Flags: le.Uint32(c.hbuf[4:]), Size: le.Uint32(c.hbuf[8:])}
		if h.Size > MaxPayload {
			return fail(fmt.Errorf("%s: payload of %d bytes exceeds %d", h.Code, h.Size, MaxPayload))
		}
	}
	p := c.pbuf[:h.Size]
	if _, err := io.ReadFull(c.uc, p); err != nil {
		return fail(fmt.Errorf("%s: short payload: %w", h.Code, err))
	}
	return h, p, fds, nil
}

// WriteMsg sends one message, code with flags and payload pl, with fds, in
// one sendmsg that must complete within timeout.
func (c *Conn) WriteMsg(code ReqCode, flags uint32, pl Payload, fds []int, timeout time.Duration) error {
	c.wbuf = pl.AppendTo(c.wbuf[:HeaderSize])
	Header{Code: code, Flags: flags, Size: uint32(len(c.wbuf) - HeaderSize)}.AppendTo(c.wbuf[:0])
	return c.WriteRaw(c.wbuf, fds, timeout)
}

// WriteRaw sends b as it is, with fds, in one sendmsg that must complete
// within timeout (for tests of peers that break the protocol).
func (c *Conn) WriteRaw(b []byte, fds []int, timeout time.Duration) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	c.uc.SetWriteDeadline(time.Now().Add(timeout))
	_, _, err := c.uc.WriteMsgUnix(b, oob, nil)
	return err
}

// CloseFDs closes the fds that are not -1 and marks them -1.
func CloseFDs(fds []int) {
	for i, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
			fds[i] = -1
		}
	}
}
