package agent

import (
	"testing"
	"time"
)

// TestTimeoutCountsTheDrain: a timeout fall-behind threshold trips once
// the oldest write's age plus the time the hub needs to acknowledge the
// backlog at its measured rate would pass it, not only once the age
// does; the volume goes back to asynchronous mirroring only under half of
// it; the rate is measured only over windows that end with a backlog
// (an idle guest's trickle is not the hub's rate); and before it is
// measured, a first burst counts as draining one write per age.
func TestTimeoutCountsTheDrain(t *testing.T) {
	t0 := time.Now()
	v := &agentVolume{opts: VolumeOptions{FallBehind: FallBehind{Timeout: 300 * time.Millisecond}}}
	queue := func(at time.Time, n int64) {
		v.pend(&qitem{write: true, bytes: n, t: at})
		v.pendIOs++
		v.pendB += n
	}

	// No rate measured yet (a first burst): the backlog counts as
	// draining one write of the oldest's size per age. One write alone
	// is behind once its age passes half the threshold.
	queue(t0, 64<<10)
	if v.behind(t0.Add(140 * time.Millisecond)) {
		t.Fatal("behind at 140 ms of age, one write queued, no rate measured")
	}
	if !v.behind(t0.Add(151 * time.Millisecond)) {
		t.Fatal("not behind at 151 ms of age, one write queued, no rate measured (heading for 302 ms)")
	}
	// Sixteen writes queued: behind at a tenth of that age, where the
	// age alone would have let the guest queue on for 300 ms.
	for range 15 {
		queue(t0, 64<<10)
	}
	if v.behind(t0.Add(10 * time.Millisecond)) {
		t.Fatal("behind at 10 ms of age, 16 writes queued (heading for 170 ms)")
	}
	if !v.behind(t0.Add(20 * time.Millisecond)) {
		t.Fatal("not behind at 20 ms of age, 16 writes queued (heading for 340 ms)")
	}

	// An idle window (the backlog emptied) measures nothing.
	v.noteAcked(0, t0)
	v.pendIOs, v.pendB = 0, 0
	v.noteAcked(4096, t0.Add(5*time.Millisecond))
	if v.ackRate != 0 {
		t.Fatalf("rate %v from a window that ended without a backlog", v.ackRate)
	}
	v.pendIOs, v.pendB = 1, 8<<20

	// The first busy window: 1 MiB acknowledged in 4 ms (a tenth of the
	// window is enough for the first estimate): 250 MiB/s.
	v.rateFrom, v.ackedB = t0, 0
	v.noteAcked(1<<20, t0.Add(4*time.Millisecond))
	if r := v.ackRate; r < 240<<20 || r > 260<<20 {
		t.Fatalf("rate %.0f B/s, want 250 MiB/s", r)
	}
	// 8 MiB at 250 MiB/s is 32 ms of drain: behind only once the age
	// passes 268 ms, where the age alone would wait for 300 ms.
	if v.behind(t0.Add(260 * time.Millisecond)) {
		t.Error("behind at 260 ms of age with 32 ms of drain")
	}
	if !v.behind(t0.Add(275 * time.Millisecond)) {
		t.Error("not behind at 275 ms of age with 32 ms of drain (RPO heading for 307 ms)")
	}
	// 100 MiB queued: 400 ms of drain, past the threshold at any age.
	v.pendB = 100 << 20
	if !v.behind(t0) {
		t.Error("not behind with 400 ms of drain queued")
	}
	// Back under the threshold but over half of it: still synchronous.
	v.pendB = 8 << 20
	if v.caughtUp(t0.Add(200 * time.Millisecond)) {
		t.Error("caught up at 232 ms of 300 (the hysteresis is half the timeout)")
	}
	if !v.caughtUp(t0.Add(100 * time.Millisecond)) {
		t.Error("not caught up at 132 ms of 300")
	}
}
