package vhost

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// TestNotifierDirectAndUnstick: while the call eventfd is non-blocking,
// signal writes it on the caller's goroutine (the counter counts every
// signal, no goroutine in between); a write the front end managed to
// block (it cleared O_NONBLOCK between the check and the write, with the
// counter full) is released by unstick, which empties only a full
// counter.
func TestNotifierDirectAndUnstick(t *testing.T) {
	n, peer := newTestNotifier(t)
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

// TestNotifierRingNeverBlocks: a signal submitted on the notifier's
// io_uring (the direct path) never blocks its caller, even when the front
// end has cleared O_NONBLOCK after the check and keeps the counter full
// (the race writeDirect cannot rule out): the write waits in the kernel,
// and lands once the front end reads the counter. Closing the notifier
// with such a write pending does not wait for it.
func TestNotifierRingNeverBlocks(t *testing.T) {
	n, peer := newTestNotifier(t)
	n.signal()
	var b [8]byte
	if _, err := unix.Read(peer, b[:]); err != nil || le.Uint64(b[:]) != 1 {
		t.Fatalf("counter %d (%v) after a signal, want 1", le.Uint64(b[:]), err)
	}
	n.ringMu.Lock()
	onRing := n.ring != nil
	n.ringMu.Unlock()
	if notifyUringOff {
		// The vhostdm_nouring tag: the write(2) path, checked above.
		if onRing {
			t.Fatal("the signal went through io_uring under the vhostdm_nouring tag")
		}
		n.close()
		return
	}
	if !onRing {
		t.Fatal("the signal did not go through io_uring (kernel before 5.17, or io_uring forbidden)")
	}

	// The race: O_NONBLOCK cleared and the counter full at the write.
	if _, err := unix.Write(peer, le.AppendUint64(nil, 0xfffffffffffffffe)); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(peer, false); err != nil {
		t.Fatal(err)
	}
	ok := make(chan bool, 1)
	go n.rc.Write(func(fd uintptr) bool {
		ok <- n.writeRing(fd)
		return true
	})
	select {
	case r := <-ok:
		if !r {
			t.Fatal("writeRing refused the write")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a ring write to a full blocking eventfd blocked its caller")
	}
	if _, err := unix.Preadv2(peer, [][]byte{b[:]}, -1, unix.RWF_NOWAIT); err != nil || le.Uint64(b[:]) != 0xfffffffffffffffe {
		t.Fatalf("counter %#x (%v), want the front end's own value", le.Uint64(b[:]), err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := unix.Preadv2(peer, [][]byte{b[:]}, -1, unix.RWF_NOWAIT); err == nil {
			if le.Uint64(b[:]) != 1 {
				t.Fatalf("counter %d after the pending write landed, want 1", le.Uint64(b[:]))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the ring write never landed after the counter was read")
		}
		time.Sleep(time.Millisecond)
	}

	// Another write left pending on a full counter; close does not wait.
	if _, err := unix.Write(peer, le.AppendUint64(nil, 0xfffffffffffffffe)); err != nil {
		t.Fatal(err)
	}
	go n.rc.Write(func(fd uintptr) bool {
		ok <- n.writeRing(fd)
		return true
	})
	if !<-ok {
		t.Fatal("writeRing refused the write")
	}
	n.close()
	select {
	case <-n.done:
	case <-time.After(5 * time.Second):
		t.Fatal("close waited for a ring write the front end keeps pending")
	}
}

// TestUnstickWhileBlocked: a halting queue's unstick timer is armed only
// while a write is in progress. Watching an idle notifier for 150 ms
// costs no timer wake-up (a 10 ms ticker would have fired about 15
// times); a write the front end blocks (O_NONBLOCK cleared, counter full)
// arms it, and the unstick releases the write.
func TestUnstickWhileBlocked(t *testing.T) {
	n, peer := newTestNotifier(t)
	defer n.close()
	var ticks atomic.Uint64
	stop := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		unstickWhileBlocked(stop, &ticks, n, nil)
	}()
	defer func() {
		close(stop)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			t.Error("unstickWhileBlocked did not return after stop")
		}
	}()
	time.Sleep(150 * time.Millisecond)
	if k := ticks.Load(); k != 0 {
		t.Fatalf("%d timer wake-ups while no write was in progress, want 0", k)
	}

	// Block the front end's way: counter full, O_NONBLOCK cleared; the
	// signal goes to the notifier's goroutine, whose write blocks.
	if _, err := unix.Write(peer, le.AppendUint64(nil, 0xfffffffffffffffe)); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(peer, false); err != nil {
		t.Fatal(err)
	}
	n.signal()
	// Leave the counter alone (reading it would release the write) until
	// the timer has fired and the write is done.
	deadline := time.Now().Add(5 * time.Second)
	for ticks.Load() == 0 || n.blocked() {
		if time.Now().After(deadline) {
			t.Fatalf("blocked write not released (ticks %d)", ticks.Load())
		}
		time.Sleep(time.Millisecond)
	}
	var b [8]byte
	if k, err := unix.Preadv2(peer, [][]byte{b[:]}, -1, unix.RWF_NOWAIT); err != nil || k != 8 || le.Uint64(b[:]) != 1 {
		t.Fatalf("counter %d (%v) after the released write, want 1", le.Uint64(b[:]), err)
	}
	// Idle again: the timer is not re-armed.
	time.Sleep(30 * time.Millisecond) // a timer armed during the write may fire once
	k := ticks.Load()
	time.Sleep(100 * time.Millisecond)
	if k2 := ticks.Load(); k2 != k {
		t.Fatalf("%d timer wake-ups after the write was released, want 0", k2-k)
	}
}

// TestHaltSlowRequestNoTicks: GET_VRING_BASE on a queue whose request is
// in a slow device (300 ms) waits for it without the unstick timer firing:
// no signal is blocked, so the halt costs no periodic wake-ups.
func TestHaltSlowRequestNoTicks(t *testing.T) {
	dir := t.TempDir()
	e, err := NewExport(ExportConfig{ID: "slow", Socket: dir + "/s", Writable: true, Logger: testLogger()},
		slowDevice{Device: zeroDevice{}, delay: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	go e.Serve(context.Background())
	defer e.Close()
	c, err := frontend.Dial(testCtx(t), frontend.Config{Socket: dir + "/s", QueueSize: 128})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf, err := c.Buf(4096)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan frontend.Result, 1)
	// Sector 16: an odd 16-sector block, which slowDevice delays.
	if err := c.Submit(0, &frontend.BlkRequest{Type: virtio.BlkTypeOut, Sector: 16, Data: [][]byte{buf}}, func(r frontend.Result) { done <- r }); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond) // popped and in the device
	start := time.Now()
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 200*time.Millisecond {
		t.Fatalf("GET_VRING_BASE answered after %v, before the slow request completed (the test's premise is broken)", el)
	}
	select {
	case r := <-done:
		if r.Status != virtio.BlkStatusOK {
			t.Fatalf("status %d", r.Status)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("slow request not completed")
	}
	e.mu.Lock()
	q := e.conn.dev.queues[0]
	e.mu.Unlock()
	if k := q.unstickTicks.Load(); k != 0 {
		t.Fatalf("%d unstick timer wake-ups during a halt with no blocked signal, want 0", k)
	}
}

// newTestNotifier returns a notifier of a new non-blocking call eventfd
// and the front end's end of the same file description (a dup, closed
// when the test ends).
func newTestNotifier(t *testing.T) (*notifier, int) {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	peer, err := unix.Dup(fd)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(peer) })
	return newNotifier(fd, "call", testLogger()), peer
}
