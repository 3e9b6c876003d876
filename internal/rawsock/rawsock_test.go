package rawsock

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

// TestRead: Read returns what the peer sent, waits in the poller for
// more, honours read deadlines, and reports the peer's close as io.EOF
// and its own as net.ErrClosed.
func TestRead(t *testing.T) {
	nc, peer := tcpPair(t)
	r := New(nc)
	if r == nil {
		t.Fatal("no raw connection for a TCP socket")
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
}

// TestWrite: Write writes all of a buffer larger than the socket holds to
// a slow reader (waiting in the poller when the socket is full), honours
// write deadlines and fails once the peer is gone.
func TestWrite(t *testing.T) {
	nc, peer := tcpPair(t)
	// Fixed buffers: loopback's autotuned ones grow to tens of MiB,
	// which the 8 MiB below would fit in without the writer ever
	// waiting (nor timing out).
	nc.(*net.TCPConn).SetWriteBuffer(64 << 10)
	peer.(*net.TCPConn).SetReadBuffer(64 << 10)
	w := New(nc)
	big := bytes.Repeat([]byte("fedcba9876543210"), 512<<10) // 8 MiB
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
}

// TestWritev: a batch of more buffers than one writev takes and more
// bytes than the socket buffers hold arrives whole and in order while the
// peer reads slowly (the writer waits in the poller for room, without
// losing its place in a partly written buffer); with a peer that does not
// read, the write deadline ends the wait with os.ErrDeadlineExceeded; a
// closed peer gives an error, not a hang or a signal.
func TestWritev(t *testing.T) {
	a, b := tcpPair(t)
	a.(*net.TCPConn).SetWriteBuffer(64 << 10)
	c := New(a)
	var bufs [][]byte
	var want []byte
	for i := range 3000 { // beyond maxIov, odd sizes, some empty
		n := (i * 7919) % 9000
		if i%100 == 0 {
			n = 0
		}
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(i + j)
		}
		bufs = append(bufs, p)
		want = append(want, p...)
	}
	got := make(chan []byte, 1)
	go func() {
		var out []byte
		buf := make([]byte, 4096)
		for len(out) < len(want) {
			time.Sleep(100 * time.Microsecond)
			n, err := b.Read(buf)
			out = append(out, buf[:n]...)
			if err != nil {
				break
			}
		}
		got <- out
	}()
	a.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if err := c.Writev(bufs); err != nil {
		t.Fatal(err)
	}
	if out := <-got; !bytes.Equal(out, want) {
		t.Fatalf("read %d bytes, not the %d written in order", len(out), len(want))
	}

	// Nobody reads: the deadline ends the write.
	a.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	big := make([]byte, 64<<20)
	if err := c.Writev([][]byte{big}); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write to a peer that does not read: %v, want a deadline error", err)
	}
	// A closed peer: an error, not a hang or a signal.
	b.Close()
	a.SetWriteDeadline(time.Now().Add(10 * time.Second))
	var err error
	for range 100 {
		if err = c.Writev([][]byte{big[:1<<20]}); err != nil {
			break
		}
	}
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write to a closed peer: %v", err)
	}
}

// TestNotASocket: a connection Go's poller does not manage gets no Conn.
func TestNotASocket(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if c := New(a); c != nil {
		t.Fatal("a pipe got a raw connection")
	}
}
