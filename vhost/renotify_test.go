package vhost

import (
	"bytes"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// TestRenotifyLostInterrupt: a driver that was owed an interrupt and never
// acted on it (here: its used_event is made to point past the completion,
// so the back end's event-idx check says "no interrupt", as if the
// interrupt had been lost on its way) still gets its completion, through
// the queue's second look a second after the last kick.
func TestRenotifyLostInterrupt(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	const num = 128
	c := env.dial(t, frontend.Config{QueueSize: num})
	ctx := testCtx(t)
	data := pattern(7, 4096)
	if err := c.WriteAt(ctx, 0, data, 0); err != nil { // settles the rings
		t.Fatal(err)
	}
	if c.Features()&virtio.FeatureEventIdx == 0 {
		t.Fatal("the client did not negotiate event idx")
	}
	// The completion goroutine is parked on the call eventfd with
	// used_event == the used index it consumed; move used_event ahead of
	// the next completion.
	time.Sleep(50 * time.Millisecond)
	mem := c.Memory()
	_, usedIdx := virtio.LoadWord(mem[c.UsedRingGPA(0):])
	var fence uint32
	virtio.Store16(mem[c.AvailRingGPA(0):], 4+2*num, usedIdx+100, &fence)

	start := time.Now()
	got := make([]byte, 4096)
	if err := c.ReadAt(ctx, 0, got, 0); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if !bytes.Equal(got, data) {
		t.Fatal("read returned other data")
	}
	if took < lostInterruptAfter/2 {
		t.Fatalf("the read completed in %v: the back end notified although used_event asked it not to (the test's premise is broken)", took)
	}
	if took > lostInterruptAfter+5*time.Second {
		t.Fatalf("the read took %v: the owed interrupt came late", took)
	}
	env.exp.mu.Lock()
	n := env.exp.conn.dev.queues[0].renotifies.Load()
	env.exp.mu.Unlock()
	if n == 0 {
		t.Fatal("no renotify counted")
	}
	t.Logf("completion delivered after %v by %d renotify", took.Round(time.Millisecond), n)

	// A healthy idle queue is not signalled again: used_event is up to
	// date once the driver has consumed everything.
	time.Sleep(2*lostInterruptAfter + 200*time.Millisecond)
	env.exp.mu.Lock()
	n2 := env.exp.conn.dev.queues[0].renotifies.Load()
	env.exp.mu.Unlock()
	if n2 != n {
		t.Fatalf("an idle, up-to-date queue was signalled %d more times", n2-n)
	}
}

// TestRestartSignalsFirstCompletion: a queue (re)started on a ring whose
// used index is ahead of the driver's used_event (an earlier back end
// published completions 3 and 4 and went away before it signalled them)
// signals the first completion it publishes, although the event-idx test
// alone would say the driver needs no interrupt for it: the driver would
// otherwise wait until the second look, a second later.
func TestRestartSignalsFirstCompletion(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	h := dialHostile(t, env.socket)
	h.negotiate(virtio.FeatureEventIdx, 0)
	a := newHRegion(t, 0, 1<<20)
	h.memTable(a)
	const num = 16
	ring := newRing(t, num, a, 0, a, ringEnd(num, 0))
	ring.availIdx = 5
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&ring.avail[0])), 5<<16)
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&ring.used[0])), 5<<16)
	le.PutUint16(ring.avail[4+2*num:], 3) // used_event: told up to 3
	h.must(wire.ReqSetVringCall, wire.VringFD{Index: 0}, []int{ring.call})
	h.must(wire.ReqSetVringNum, wire.VringState{Index: 0, Num: num}, nil)
	h.must(wire.ReqSetVringBase, wire.VringState{Index: 0, Num: 5}, nil)
	h.must(wire.ReqSetVringAddr, wire.VringAddr{Index: 0, Desc: hostileUser + ring.dGPA, Avail: hostileUser + ring.aGPA, Used: hostileUser + ring.uGPA}, nil)
	h.must(wire.ReqSetVringKick, wire.VringFD{Index: 0}, []int{ring.kick})
	h.must(wire.ReqSetVringEnable, wire.VringState{Index: 0, Num: 1}, nil)

	hdr := ringEnd(num, 0) + 4096
	putHeader(a.mem[hdr:], virtio.BlkTypeIn, 0)
	ring.request(0, hdr, hdr+4096, 4096, hdr+64, true)
	ring.push(0)
	start := time.Now()
	ring.doKick()
	var b [8]byte
	for {
		if _, err := unix.Read(ring.call, b[:]); err == nil {
			break
		}
		if time.Since(start) > lostInterruptAfter/2 {
			t.Fatalf("first completion after the start not signalled within %v (used idx %d)", lostInterruptAfter/2, ring.usedIdx())
		}
		time.Sleep(time.Millisecond)
	}
	if ring.usedIdx() != 6 {
		t.Fatalf("used idx %d, want 6", ring.usedIdx())
	}
	t.Logf("signalled %v after the kick", time.Since(start).Round(time.Millisecond))
}
