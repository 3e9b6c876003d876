package uring

import (
	"encoding/binary"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestEventfdCompletions: with an eventfd registered, completions of
// no-ops submitted by Submit and by SubmitRaw make the eventfd readable
// and are counted by Ready and delivered by Reap, in order, without a
// wait in io_uring_enter.
func TestEventfdCompletions(t *testing.T) {
	r, err := New(8)
	if err != nil {
		t.Fatalf("io_uring: %v (this test needs Linux >= 5.5 with io_uring allowed)", err)
	}
	defer r.Close()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if err := r.RegisterEventfd(efd); err != nil {
		t.Fatal(err)
	}
	var buf [8]byte
	if _, err := unix.Read(efd, buf[:]); err != unix.EAGAIN {
		t.Fatalf("eventfd before any completion: %v, want EAGAIN", err)
	}
	next := uint64(1)
	for _, submit := range []func() (int, error){r.Submit, r.SubmitRaw} {
		for range 3 {
			e := r.GetSQE()
			e.Opcode = OpNop
			e.UserData = next
			next++
		}
		if n, err := submit(); err != nil || n != 3 {
			t.Fatalf("submit: %d, %v; want 3", n, err)
		}
		if r.Pending() != 0 || r.Unconsumed() != 0 {
			t.Fatalf("after submit: %d pending, %d unconsumed", r.Pending(), r.Unconsumed())
		}
		// The eventfd is readable once the no-ops have completed.
		fds := []unix.PollFd{{Fd: int32(efd), Events: unix.POLLIN}}
		if n, err := unix.Poll(fds, int((5 * time.Second).Milliseconds())); err != nil || n != 1 {
			t.Fatalf("poll eventfd: %d, %v", n, err)
		}
		if _, err := unix.Read(efd, buf[:]); err != nil || binary.NativeEndian.Uint64(buf[:]) == 0 {
			t.Fatalf("eventfd read: %v", err)
		}
		if got := r.Ready(); got != 3 {
			t.Fatalf("Ready() = %d, want 3", got)
		}
		want := next - 3
		if n := r.Reap(func(c CQE) {
			if c.UserData != want || c.Res != 0 {
				t.Errorf("completion %+v, want user data %d, result 0", c, want)
			}
			want++
		}); n != 3 {
			t.Fatalf("Reap delivered %d, want 3", n)
		}
		if r.Ready() != 0 || r.Overflowed() {
			t.Fatalf("after Reap: %d ready, overflowed %v", r.Ready(), r.Overflowed())
		}
	}
}
