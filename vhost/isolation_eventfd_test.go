package vhost

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// blockingFullEventfd returns an eventfd that the test made blocking after
// handing it over (O_NONBLOCK belongs to the file description both sides
// share) and filled to 0xfffffffffffffffe, where any further write of the
// daemon's would block. fight keeps refilling it from a goroutine whenever
// the daemon empties it.
func blockingFullEventfd(t *testing.T, fd int, fight bool) {
	t.Helper()
	full := le.AppendUint64(nil, 0xfffffffffffffffe)
	var b [8]byte
	for {
		// Empty, then fill, while still non-blocking: the daemon may
		// signal in between.
		unix.Preadv2(fd, [][]byte{b[:]}, -1, unix.RWF_NOWAIT)
		if _, err := unix.Write(fd, full); err == nil {
			break
		} else if err != unix.EAGAIN {
			t.Fatal(err)
		}
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		t.Fatal(err)
	}
	if !fight {
		return
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			unix.Write(fd, full) // blocks while the counter is full
		}
	}()
	t.Cleanup(func() {
		stop.Store(true)
		for {
			// Empty the counter until the fighter's blocked write
			// returns and it sees stop.
			unix.Preadv2(fd, [][]byte{b[:]}, -1, unix.RWF_NOWAIT)
			done := make(chan struct{})
			go func() { wg.Wait(); close(done) }()
			select {
			case <-done:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	})
}

// TestIsolationBlockingEventfd is finding 4 with an eventfd: the front end
// clears O_NONBLOCK on its call and error fds after handing them over and
// keeps their counters full (one of them refilled from a thread whenever
// the daemon empties it), so that every write the daemon makes to them
// would block. Completions are still published, SET_VRING_CALL replacing
// a blocked fd and GET_VRING_BASE are answered at once, a ring error is
// handled, the other export serves, and SIGTERM stops the daemon within
// 5 s with the front end still connected.
func TestIsolationBlockingEventfd(t *testing.T) {
	d := startDaemon(t)
	h := dialHostile(t, d.hostile)
	h.negotiate(0, 0)
	a := newHRegion(t, 0, 1<<20)
	h.memTable(a)
	ring := newRing(t, 16, a, 0, a, ringEnd(16, 0))
	h.setup(ring, true)
	errfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(errfd) })
	h.must(wire.ReqSetVringErr, wire.VringFD{Index: 0}, []int{errfd})
	blockingFullEventfd(t, ring.call, true)
	blockingFullEventfd(t, errfd, false)

	hdr := ringEnd(16, 0) + 4096
	read := func(head uint16, sector uint64) {
		t.Helper()
		o := hdr + uint64(head)*8192
		putHeader(a.mem[o:], virtio.BlkTypeIn, sector)
		a.mem[o+64] = 0xff
		ring.request(head, o, o+4096, 4096, o+64, true)
		want := ring.usedIdx() + 1
		ring.push(head)
		ring.doKick()
		deadline := time.Now().Add(10 * time.Second)
		for ring.usedIdx() != want {
			if time.Now().After(deadline) {
				t.Fatalf("request %d not completed while the call eventfd is blocked full", head)
			}
			time.Sleep(5 * time.Millisecond)
		}
		if st := a.mem[o+64]; st != virtio.BlkStatusOK {
			t.Fatalf("request %d: status %d", head, st)
		}
	}
	read(0, 0)
	read(3, 8)

	// Replace the blocked call fd with another one, blocked and full
	// too: the reply comes at once, and the old fd's blocked write is
	// released by emptying the counter (the fighter refills it).
	call2, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(call2) })
	start := time.Now()
	h.must(wire.ReqSetVringCall, wire.VringFD{Index: 0}, []int{call2})
	blockingFullEventfd(t, call2, false)
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("SET_VRING_CALL answered after %v", el)
	}
	d.waitLog("keeps an eventfd full with O_NONBLOCK cleared")
	read(6, 16)
	d.checkHealthy()

	// A ring error signals the blocked error fd.
	off := d.logLen()
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&ring.avail[0])), uint32(ring.availIdx+100)<<16)
	ring.doKick()
	d.waitLogAfter(off, "virtqueue stopped")
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.must(wire.ReqGetVringBase, wire.VringState{Index: 0}, nil)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("GET_VRING_BASE not answered with blocked call and error fds")
	}
	d.checkHealthy()
	// The daemon stops with this front end connected and its fds full.
	d.stop()
}
