package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// simpleClient negotiates export x without structured replies and returns
// the connection in transmission.
func simpleClient(t *testing.T, s *Server) net.Conn {
	t.Helper()
	cl, sv := net.Pipe()
	s.ServeConn(context.Background(), sv)
	t.Cleanup(func() { cl.Close(); s.Close() })
	cl.SetDeadline(time.Now().Add(10 * time.Second))
	hello := make([]byte, 18)
	if _, err := io.ReadFull(cl, hello); err != nil {
		t.Fatal(err)
	}
	b := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	b = opt(b, optGo, append(str(nil, "x"), 0, 0))
	go cl.Write(b)
	for {
		var h [20]byte
		if _, err := io.ReadFull(cl, h[:]); err != nil {
			t.Fatal(err)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		io.CopyN(io.Discard, cl, int64(binary.BigEndian.Uint32(h[16:])))
		if typ == repAck {
			return cl
		}
		if typ&repErrBit != 0 {
			t.Fatalf("GO refused: %#x", typ)
		}
	}
}

func simpleRequest(t *testing.T, cl net.Conn, flags, typ uint16, off uint64, n uint32) uint32 {
	t.Helper()
	go cl.Write(request(nil, flags, typ, off, n))
	var h [16]byte
	if _, err := io.ReadFull(cl, h[:]); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint32(h[4:])
}

// TestFastZero: FAST_ZERO succeeds where the range already reads as zeros
// and fails with ENOTSUP over data; without the flag, zeroing data works.
func TestFastZero(t *testing.T) {
	cl := simpleClient(t, testServer())
	// memDev: sectors 8-15 are a hole, 0-7 data.
	for _, tc := range []struct {
		flags uint16
		off   uint64
		n     uint32
		want  uint32
	}{
		{cmdFlagFastZero, 8 * 512, 8 * 512, 0},
		{cmdFlagFastZero, 0, 8 * 512, errNotSup},
		{cmdFlagFastZero, 8 * 512, 16 * 512, errNotSup},
		{0, 0, 8 * 512, 0},
		{cmdFlagFastZero | cmdFlagFUA, 24 * 512, 8 * 512, 0},
	} {
		if got := simpleRequest(t, cl, tc.flags, cmdWriteZeroes, tc.off, tc.n); got != tc.want {
			t.Errorf("write-zeroes flags %#x at %d+%d: errno %d, want %d", tc.flags, tc.off, tc.n, got, tc.want)
		}
	}
	// Block status without structured replies is refused, the
	// connection goes on.
	if got := simpleRequest(t, cl, 0, cmdBlockStatus, 0, 512); got != errInval {
		t.Errorf("block status without structured replies: errno %d", got)
	}
	if got := simpleRequest(t, cl, 0, cmdFlush, 0, 0); got != 0 {
		t.Errorf("flush: errno %d", got)
	}
}
