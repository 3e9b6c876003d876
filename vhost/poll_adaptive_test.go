package vhost

import (
	"fmt"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// TestAdjustPoll: the adaptive poll time starts at 4 µs after a short
// wait for the driver, doubles after each wait longer than it up to
// 32 µs, stays after a wait within it, and drops to 0 after a wait longer
// than 32 µs.
func TestAdjustPoll(t *testing.T) {
	q := &queue{}
	us := func(n int64) int64 { return n * int64(time.Microsecond) }
	for i, step := range []struct{ block, want int64 }{
		{us(100), 0},     // a slow driver: no polling
		{us(10), us(4)},  // a short wait: start
		{us(3), us(4)},   // within the poll time: keep
		{us(10), us(8)},  // longer than it: double
		{us(10), us(16)}, // again
		{us(20), us(32)}, // up to the bound
		{us(31), us(32)}, // within it
		{us(33), 0},      // past the bound: stop
		{us(40), 0},
	} {
		q.adjustPoll(step.block)
		if q.pollNs != step.want {
			t.Fatalf("step %d: wait %v: poll %v, want %v", i, time.Duration(step.block), time.Duration(q.pollNs), time.Duration(step.want))
		}
	}
}

// TestAdaptivePoll: with adaptive polling (export.adaptive-poll), a queue
// does not poll for a driver that sends a request now and then: a slow
// guest costs no spinning. Without it, a queue never polls. (Whether a
// busy driver comes back within 32 µs depends on the machine:
// scripts/bench-vs-qsd.sh rows 1 and 2 measure what polling gives then.)
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
	for i := range 100 {
		if err := c.ReadAt(ctx, 0, buf, uint64(i*8)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	// The driver's next request comes 2 ms after the ring ran dry: a
	// poll could only start after a wait under 32 µs, which a loaded
	// machine may give a few times (the read's own completion racing
	// the re-arm of the kick), never per request.
	if n := q.polls.Load(); n > 20 || !adaptive && n != 0 {
		t.Fatalf("%d adaptive polls for 100 reads 2 ms apart (adaptive-poll %v)", n, adaptive)
	}
	// Back to back, without it: still none.
	if !adaptive {
		for i := range 300 {
			if err := c.ReadAt(ctx, 0, buf, uint64(i*8)); err != nil {
				t.Fatal(err)
			}
		}
		if n := q.polls.Load(); n != 0 {
			t.Fatalf("%d adaptive polls with adaptive-poll off", n)
		}
	}
}

// TestCheapBatch: a queue polls after a batch only when its requests took
// the ring goroutine at most 2 µs each (adaptivePollReqMax): a batch of
// null requests does, a batch of page-cache copies does not.
func TestCheapBatch(t *testing.T) {
	us := func(n int64) int64 { return n * int64(time.Microsecond) }
	for _, c := range []struct {
		ns, n int64
		want  bool
	}{
		{0, 0, true},         // no batch yet
		{us(25), 32, true},   // 32 null requests
		{us(64), 32, true},   // 2 µs each: the bound
		{us(65), 32, false},  // just above it
		{us(150), 32, false}, // 32 page-cache reads
		{us(3), 1, false},    // one costly request
		{us(3), 7, true},     // seven cheap ones
		{us(1000), 0, false}, // a stop between requests dispatched none
	} {
		q := &queue{batchNs: c.ns, batchN: c.n}
		if got := q.cheapBatch(); got != c.want {
			t.Errorf("%d requests in %v: cheap %v, want %v", c.n, time.Duration(c.ns), got, c.want)
		}
	}
}
