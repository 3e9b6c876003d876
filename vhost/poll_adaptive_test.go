package vhost

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// TestPollFor: a queue that runs dry polls for export.poll-us when it is
// set; otherwise, with adaptive polling, 1 µs per request it completed
// itself since it last ran dry, up to 256 µs; without, not at all.
func TestPollFor(t *testing.T) {
	us := func(n int64) time.Duration { return time.Duration(n) * time.Microsecond }
	for _, c := range []struct {
		cfg    ExportConfig
		served int64
		want   time.Duration
	}{
		{ExportConfig{}, 0, 0},            // woken with nothing to do: no poll
		{ExportConfig{}, 1, us(1)},        // one request now and then
		{ExportConfig{}, 32, us(32)},      // a batch of queue depth 32
		{ExportConfig{}, 110, us(110)},    // overlapping with the driver
		{ExportConfig{}, 256, us(256)},    // the bound
		{ExportConfig{}, 100000, us(256)}, // never longer
		{ExportConfig{NoAdaptivePoll: true}, 32, 0},
		{ExportConfig{Poll: us(50)}, 0, us(50)}, // fixed: whatever was served
		{ExportConfig{Poll: us(50)}, 1000, us(50)},
		{ExportConfig{Poll: us(50), NoAdaptivePoll: true}, 3, us(50)},
	} {
		q := &queue{dev: &queueRuntime{exp: &Export{cfg: c.cfg}}}
		if got := q.pollFor(c.served); got != c.want {
			t.Errorf("poll %v, adaptive %v, %d served: poll for %v, want %v", c.cfg.Poll, !c.cfg.NoAdaptivePoll, c.served, got, c.want)
		}
	}
}

// TestAdaptivePoll: with adaptive polling (export.adaptive-poll), a
// driver that sends a request now and then costs about 1 µs of spinning
// per request, and a driver that makes a deep batch available gets a
// poll as long as the batch; without it, a queue never polls. The reads
// (of a file in the page cache) complete on the ring goroutine.
func TestAdaptivePoll(t *testing.T) {
	for _, adaptive := range []bool{true, false} {
		t.Run(fmt.Sprint("adaptive=", adaptive), func(t *testing.T) { testAdaptivePoll(t, adaptive) })
	}
}

func testAdaptivePoll(t *testing.T, adaptive bool) {
	env := newTestEnv(t, 16<<20, ExportConfig{NumQueues: 1, NoAdaptivePoll: !adaptive})
	c := env.dial(t, frontend.Config{NumQueues: 1, QueueSize: 128, Indirect: true})
	ctx := testCtx(t)
	env.exp.mu.Lock()
	q := env.exp.conn.dev.queues[0]
	env.exp.mu.Unlock()

	// Slow: one read every 2 ms.
	buf, err := c.Buf(4096)
	if err != nil {
		t.Fatal(err)
	}
	const slow = 100
	for i := range slow {
		if err := c.ReadAt(ctx, 0, buf, uint64(i*8)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	polls, spin := q.polls.Load(), time.Duration(q.pollSpin.Load())
	if !adaptive {
		if polls != 0 {
			t.Fatalf("%d polls with adaptive-poll off", polls)
		}
	} else {
		// One poll of 1 µs after each read. The bound leaves room for
		// a spinning thread preempted on a loaded machine; a poll that
		// did not scale with the requests served (a fixed 32 µs, say)
		// spins 3.2 ms here.
		if polls < slow/2 || polls > slow+10 {
			t.Errorf("%d polls for %d reads 2 ms apart, want one after each", polls, slow)
		}
		if spin > 2*time.Millisecond {
			t.Errorf("%v spent polling for %d reads 2 ms apart, want about 1 µs each", spin, slow)
		}
	}

	// Deep: 32 reads made available at once, then none for 10 ms. The
	// queue serves them and polls about 32 µs for more before it sleeps.
	bufs := make([][]byte, 32)
	for i := range bufs {
		if bufs[i], err = c.Buf(4096); err != nil {
			t.Fatal(err)
		}
	}
	polls0, spin0 := q.polls.Load(), q.pollSpin.Load()
	done := make(chan frontend.Result, len(bufs))
	c.HoldKicks(0)
	for i, b := range bufs {
		r := &frontend.BlkRequest{Type: frontend.BlkTypeIn, Sector: uint64(i * 8), Data: [][]byte{b}}
		if err := c.Submit(0, r, func(r frontend.Result) { done <- r }); err != nil {
			t.Fatal(err)
		}
	}
	c.ReleaseKicks(0)
	for range bufs {
		select {
		case r := <-done:
			if r.Err != nil || r.Status != frontend.BlkStatusOK {
				t.Fatalf("read: %+v", r)
			}
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
	time.Sleep(10 * time.Millisecond)
	polls, spin = q.polls.Load()-polls0, time.Duration(q.pollSpin.Load()-spin0)
	if !adaptive {
		if polls != 0 {
			t.Fatalf("%d polls with adaptive-poll off", polls)
		}
		return
	}
	if polls == 0 {
		t.Fatal("no poll after a batch of 32 requests")
	}
	// 32 served in one or more runs: about 32 µs of polling in all.
	if spin < 20*time.Microsecond {
		t.Errorf("%v spent polling after a batch of 32, want about 32 µs", spin)
	}
}

// TestAdaptivePollHandedOff: requests the ring goroutine hands to a
// worker or the I/O engine earn no poll: their completions come from
// elsewhere, and a poll would take the CPU that the worker, the engine
// and the driver need (scripts/bench-vs-qsd.sh row 3).
func TestAdaptivePollHandedOff(t *testing.T) {
	dir := t.TempDir()
	e, err := NewExport(ExportConfig{ID: "handoff", Socket: dir + "/s", NumQueues: 1, Logger: testLogger()}, zeroDevice{})
	if err != nil {
		t.Fatal(err)
	}
	go e.Serve(context.Background())
	defer e.Close()
	c, err := frontend.Dial(testCtx(t), frontend.Config{Socket: dir + "/s", NumQueues: 1, QueueSize: 128, Indirect: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	for slot := range 32 {
		buf, err := c.Buf(4096)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		left := 100
		var next func(frontend.Result)
		next = func(r frontend.Result) {
			if r.Err != nil || r.Status != virtio.BlkStatusOK {
				t.Errorf("read: %+v", r)
				wg.Done()
				return
			}
			if left--; left == 0 {
				wg.Done()
				return
			}
			if err := c.Submit(0, &frontend.BlkRequest{Type: virtio.BlkTypeIn, Sector: uint64(slot * 8), Data: [][]byte{buf}}, next); err != nil {
				t.Error(err)
				wg.Done()
			}
		}
		if err := c.Submit(0, &frontend.BlkRequest{Type: virtio.BlkTypeIn, Sector: uint64(slot * 8), Data: [][]byte{buf}}, next); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	e.mu.Lock()
	q := e.conn.dev.queues[0]
	e.mu.Unlock()
	if n := q.polls.Load(); n != 0 {
		t.Fatalf("%d polls for 3200 reads handed to workers", n)
	}
}
