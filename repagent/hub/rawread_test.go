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

// TestRawReader: the hub's raw socket reader returns what the peer sent,
// waits in the poller for more, honours read deadlines, and reports the
// peer's close as io.EOF and its own as net.ErrClosed; a connection that
// is not a plain socket is read as it is.
func TestRawReader(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	nc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	r := newRawReader(nc)
	if _, ok := r.(*rawReader); !ok {
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
	// Not a socket: read as it is.
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if r := newRawReader(a); r != a {
		t.Fatalf("a pipe is read by %T", r)
	}
}
