package wire

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// socketPair returns two connected unix stream sockets.
func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "sock")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// TestConnRoundTrip: a message written with fds is read back with its
// header, payload and fds, which refer to the same files.
func TestConnRoundTrip(t *testing.T) {
	a, b := socketPair(t)
	w, r := NewConn(a), NewConn(b, Strict())
	f, err := os.CreateTemp(t.TempDir(), "fd")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteString("payload-of-the-file")
	st := VringState{Index: 3, Num: 256}
	if err := w.WriteMsg(ReqSetVringNum, FlagVersion|FlagNeedReply, st, []int{int(f.Fd())}, time.Second); err != nil {
		t.Fatal(err)
	}
	h, p, fds, err := r.ReadMsg()
	if err != nil {
		t.Fatal(err)
	}
	defer CloseFDs(fds)
	if h.Code != ReqSetVringNum || !h.NeedReply() || h.IsReply() || h.Size != 8 {
		t.Fatalf("header %+v", h)
	}
	pl, err := DecodePayload(h.Code, p)
	if err != nil || pl != st {
		t.Fatalf("payload %+v, %v, want %+v", pl, err, st)
	}
	if len(fds) != 1 {
		t.Fatalf("%d fds, want 1", len(fds))
	}
	buf := make([]byte, 7)
	if _, err := unix.Pread(fds[0], buf, 0); err != nil || string(buf) != "payload" {
		t.Fatalf("the fd reads %q, %v", buf, err)
	}
	// EOF once the peer closes.
	a.Close()
	if _, _, _, err := r.ReadMsg(); !errors.Is(err, io.EOF) {
		t.Fatalf("after close: %v, want EOF", err)
	}
}

// TestConnStrict: a strict reader refuses a header of another version
// before waiting for its payload; a lenient one reads it.
func TestConnStrict(t *testing.T) {
	a, b := socketPair(t)
	w := NewConn(a)
	msg := Header{Code: ReqGetFeatures, Flags: 2 | FlagReply, Size: 8}.AppendTo(nil)
	if err := w.WriteRaw(msg, nil, time.Second); err != nil { // no payload follows
		t.Fatal(err)
	}
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, _, err := NewConn(b, Strict()).ReadMsg(); err == nil || !strings.Contains(err.Error(), "version 2") {
		t.Fatalf("strict read: %v, want a version error", err)
	}

	a, b = socketPair(t)
	w = NewConn(a)
	if err := w.WriteRaw(U64(7).AppendTo(msg), nil, time.Second); err != nil {
		t.Fatal(err)
	}
	h, p, _, err := NewConn(b).ReadMsg()
	if err != nil || h.Flags != 2|FlagReply || len(p) != 8 || le.Uint64(p) != 7 {
		t.Fatalf("lenient read: %+v %x %v", h, p, err)
	}
}

// TestConnTooManyFDs: a message with more than MaxFDs fds is an error, and
// none of them is left open.
func TestConnTooManyFDs(t *testing.T) {
	a, b := socketPair(t)
	fds := make([]int, MaxFDs+2)
	for i := range fds {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		fds[i] = fd
	}
	if err := NewConn(a).WriteMsg(ReqSetOwner, FlagVersion, NoPayload{}, fds, time.Second); err != nil {
		t.Fatal(err)
	}
	if _, _, got, err := NewConn(b, Strict()).ReadMsg(); err == nil || got != nil {
		t.Fatalf("read %d fds, %v; want an error", len(got), err)
	}
}

// TestOnStart: OnStart runs once the first bytes of a message arrived,
// before the reader waits for the rest.
func TestOnStart(t *testing.T) {
	a, b := socketPair(t)
	started := make(chan struct{}, 1)
	r := NewConn(b, Strict(), OnStart(func() { started <- struct{}{} }))
	msg := U64(1).AppendTo(Header{Code: ReqSetFeatures, Flags: FlagVersion, Size: 8}.AppendTo(nil))
	if _, err := a.Write(msg[:HeaderSize]); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, _, _, err := r.ReadMsg()
		done <- err
	}()
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("OnStart not called after the header arrived")
	}
	if _, err := a.Write(msg[HeaderSize:]); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
