package vhost

import (
	"bytes"
	"testing"
	"time"
)

// TestRenotifyLostInterrupt: a driver that was owed an interrupt and never
// acted on it (here: its used_event is made to point past the completion,
// so the back end's event-idx check says "no interrupt", as if the
// interrupt had been lost on its way) still gets its completion, through
// the queue's second look a second after the last kick.
func TestRenotifyLostInterrupt(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	c := env.dial(t, ClientConfig{})
	ctx := testCtx(t)
	data := pattern(7, 4096)
	if err := c.WriteAt(ctx, 0, data, 0); err != nil { // settles the rings
		t.Fatal(err)
	}
	q := c.queues[0]
	if !q.eventIdx {
		t.Fatal("the client did not negotiate event idx")
	}
	// The completion goroutine is parked on the call eventfd with
	// used_event == lastUsed; move used_event ahead of the next
	// completion.
	time.Sleep(50 * time.Millisecond)
	store16(q.avail, 4+2*int(q.num), q.lastUsed+100, &q.fence)

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
