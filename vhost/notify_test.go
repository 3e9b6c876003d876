package vhost

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestNotifierDirectAndUnstick: while the call eventfd is non-blocking,
// signal writes it on the caller's goroutine (the counter counts every
// signal, no goroutine in between); a write the front end managed to
// block (it cleared O_NONBLOCK between the check and the write, with the
// counter full) is released by unstick, which empties only a full
// counter.
func TestNotifierDirectAndUnstick(t *testing.T) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	peer, err := unix.Dup(fd) // the front end's end of the description
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(peer)
	n := newNotifier(fd, "call", testLogger())
	defer n.close()
	for range 3 {
		n.signal()
	}
	var b [8]byte
	if _, err := unix.Read(peer, b[:]); err != nil || le.Uint64(b[:]) != 3 {
		t.Fatalf("counter %d (%v) after 3 direct signals, want 3", le.Uint64(b[:]), err)
	}

	// A counter that is not full is left alone.
	n.signal()
	n.direct.Add(1) // as if a write were in progress
	n.unstick()
	n.direct.Add(-1)
	if _, err := unix.Read(peer, b[:]); err != nil || le.Uint64(b[:]) != 1 {
		t.Fatalf("unstick took a pending signal: counter %d (%v)", le.Uint64(b[:]), err)
	}

	// A blocked write, as the race leaves it.
	if _, err := unix.Write(peer, le.AppendUint64(nil, 0xfffffffffffffffe)); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(peer, false); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	n.direct.Add(1)
	go func() {
		defer close(done)
		unix.Write(peer, eventfdOne[:]) // blocks while the counter is full
		n.direct.Add(-1)
	}()
	select {
	case <-done:
		t.Fatal("write to a full blocking eventfd did not block")
	case <-time.After(50 * time.Millisecond):
	}
	n.unstick()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("unstick did not release the blocked write")
	}
	if _, err := unix.Preadv2(peer, [][]byte{b[:]}, -1, unix.RWF_NOWAIT); err != nil || le.Uint64(b[:]) != 1 {
		t.Fatalf("counter %d (%v) after the released write, want 1 (the front end is still told)", le.Uint64(b[:]), err)
	}
	// Blocking now: signal goes through the notifier's goroutine.
	n.signal()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := unix.Preadv2(peer, [][]byte{b[:]}, -1, unix.RWF_NOWAIT); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("signal on a blocking eventfd never written")
		}
		time.Sleep(time.Millisecond)
	}
}
