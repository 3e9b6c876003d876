package hub

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close() })
	nc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return nc, peer
}

// TestRawConn: the hub's raw socket reader returns what the peer sent,
// waits in the poller for more, honours read deadlines, and reports the
// peer's close as io.EOF and its own as net.ErrClosed; its writer writes
// all of a large buffer to a slow reader (waiting in the poller when the
// socket is full), honours write deadlines and fails once the peer is
// gone; a connection that is not a plain socket is used as it is.
func TestRawConn(t *testing.T) {
	nc, peer := tcpPair(t)
	r := newRawConn(nc)
	if _, ok := r.(*rawConn); !ok {
		t.Fatalf("a TCP connection is read by %T", r)
	}
	want := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	go func() {
		time.Sleep(20 * time.Millisecond) // the reader waits first
		for p := want; len(p) > 0; p = p[min(len(p), 3000):] {
			peer.Write(p[:min(len(p), 3000)])
		}
	}()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(r, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read %v, data equal %v", err, bytes.Equal(got, want))
	}
	nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := r.Read(got); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("past the deadline: %v, want a timeout", err)
	}
	nc.SetReadDeadline(time.Time{})
	peer.Close()
	if n, err := r.Read(got); n != 0 || err != io.EOF {
		t.Fatalf("after the peer closed: %d, %v, want EOF", n, err)
	}
	nc.Close()
	if _, err := r.Read(got); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("after close: %v, want net.ErrClosed", err)
	}

	// Writes: 8 MiB, more than the socket holds, to a slow reader.
	nc, peer = tcpPair(t)
	w := newRawConn(nc)
	big := bytes.Repeat([]byte("fedcba9876543210"), 512<<10)
	recv := make(chan []byte)
	go func() {
		time.Sleep(50 * time.Millisecond) // the writer fills the socket first
		b, _ := io.ReadAll(io.LimitReader(peer, int64(len(big))))
		recv <- b
	}()
	if n, err := w.Write(big); n != len(big) || err != nil {
		t.Fatalf("write: %d, %v, want %d", n, err, len(big))
	}
	if b := <-recv; !bytes.Equal(b, big) {
		t.Fatalf("the peer read %d bytes, not what was written", len(b))
	}
	nc.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := w.Write(big); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write past the deadline to a peer that does not read: %v, want a timeout", err)
	}
	nc.SetWriteDeadline(time.Time{})
	peer.Close() // with unread data: a reset
	var err error
	for range 100 {
		if _, err = w.Write([]byte("x")); err != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if !errors.As(err, new(*net.OpError)) {
		t.Fatalf("writes to a closed peer: %v, want a net.OpError", err)
	}

	// Not a socket: used as it is.
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if r := newRawConn(a); r != a {
		t.Fatalf("a pipe is used through %T", r)
	}
}
