package agent

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
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-acc
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

// TestWritevRaw: a batch of more buffers than one writev takes and more
// bytes than the socket buffers hold arrives whole and in order while the
// peer reads slowly (the writer waits in the poller for room, without
// losing its place in a partly written buffer); with a peer that does not
// read, the write deadline ends the wait with os.ErrDeadlineExceeded.
func TestWritevRaw(t *testing.T) {
	a, b := tcpPair(t)
	a.SetWriteBuffer(64 << 10)
	c := &agentConn{nc: a, rc: rawConn(a)}
	if c.rc == nil {
		t.Fatal("no raw connection for a TCP socket")
	}
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
	if err := c.writevRaw(bufs); err != nil {
		t.Fatal(err)
	}
	if out := <-got; !bytes.Equal(out, want) {
		t.Fatalf("read %d bytes, not the %d written in order", len(out), len(want))
	}

	// Nobody reads: the deadline ends the write.
	a.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	big := make([]byte, 64<<20)
	if err := c.writevRaw([][]byte{big}); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write to a peer that does not read: %v, want a deadline error", err)
	}
	// A closed peer: an error, not a hang or a signal.
	b.Close()
	io.Copy(io.Discard, io.LimitReader(a, 0))
	a.SetWriteDeadline(time.Now().Add(10 * time.Second))
	var err error
	for range 100 {
		if err = c.writevRaw([][]byte{big[:1<<20]}); err != nil {
			break
		}
	}
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write to a closed peer: %v", err)
	}
}

// TestPendReuse: the pending list keeps its array while acknowledgements
// take from its front and writes add at its end (no new array per lap),
// and holds every item in order.
func TestPendReuse(t *testing.T) {
	v := &agentVolume{}
	items := make([]qitem, 64)
	next, first := 0, 0
	add := func() {
		it := &items[next%len(items)]
		it.seq = uint64(next)
		v.pend(it)
		next++
	}
	for range 16 {
		add()
	}
	var arr **qitem
	for lap := range 1000 {
		if lap == 100 {
			arr = &v.pendArr[0] // grown to its size
		}
		// ack 5, queue 5: the backlog stays at 16
		clear(v.pending[:5])
		v.pending = v.pending[5:]
		first += 5
		for range 5 {
			add()
		}
		if len(v.pending) != 16 {
			t.Fatalf("lap %d: %d pending", lap, len(v.pending))
		}
		for i, it := range v.pending {
			if it.seq != uint64(first+i) {
				t.Fatalf("lap %d: item %d has sequence %d, want %d", lap, i, it.seq, first+i)
			}
		}
	}
	if &v.pendArr[0] != arr {
		t.Errorf("the pending list moved to a new array at a steady backlog")
	}
	// Everything acknowledged up to the array's end: the next item goes
	// to its start.
	for len(v.pending) < cap(v.pending) {
		add()
	}
	v.pending = v.pending[len(v.pending):]
	add()
	if &v.pending[0] != arr {
		t.Errorf("an emptied pending list did not restart at its array's start")
	}
}
