package agent

import (
	"testing"
	"time"
)

// TestStampNeverLate: a write's stamp, from which the RPO counts, is never
// later than the write (the RPO is never understated), stamps stay in
// queue order, and a stamp reused from the write before is read afresh
// after maxStampReuse writes, after a wait, and when the queue's last
// frame is not the write stamped last.
func TestStampNeverLate(t *testing.T) {
	a := &Agent{}
	queue := func(st time.Time) {
		a.queue = append(a.queue, &qitem{write: true, t: st})
	}
	var prev time.Time
	check := func(i int, st time.Time) {
		t.Helper()
		if st.After(time.Now()) {
			t.Fatalf("write %d: stamped %v, later than now", i, st)
		}
		if st.Before(prev) {
			t.Fatalf("write %d: stamped %v, before the write queued before it (%v)", i, st, prev)
		}
		prev = st
	}

	// The first write of a batch reads the clock.
	before := time.Now()
	st := a.stamp(false)
	if st.Before(before) {
		t.Fatalf("first write of a batch stamped %v, before it was queued (%v): the clock was not read", st, before)
	}
	check(0, st)
	queue(st)

	// Writes joining the batch reuse the stamp, up to maxStampReuse in a
	// row; then the clock is read again.
	time.Sleep(2 * time.Millisecond)
	fresh := 0
	for i := 1; i <= 3*(maxStampReuse+1); i++ {
		before := time.Now()
		st := a.stamp(false)
		check(i, st)
		if !st.Before(before) {
			fresh++
		}
		queue(st)
		time.Sleep(10 * time.Microsecond)
	}
	if fresh != 3 {
		t.Errorf("%d of %d writes joining a batch read the clock, want one in %d", fresh, 3*(maxStampReuse+1), maxStampReuse+1)
	}

	// A write that waited reads the clock.
	time.Sleep(time.Millisecond)
	before = time.Now()
	if st := a.stamp(true); st.Before(before) {
		t.Errorf("a write that waited was stamped %v, before it was queued (%v)", st, before)
	} else {
		queue(st)
	}

	// A frame that is not a write queued after the last write: the next
	// write reads the clock (the last stamp may be old).
	a.queue = append(a.queue, &qitem{t: time.Now()})
	time.Sleep(time.Millisecond)
	before = time.Now()
	if st := a.stamp(false); st.Before(before) {
		t.Errorf("a write queued after a dirty map was stamped %v, before it was queued (%v)", st, before)
	}

	// The sender took the batch: the next write reads the clock.
	a.queue = a.queue[:0]
	time.Sleep(time.Millisecond)
	before = time.Now()
	if st := a.stamp(false); st.Before(before) {
		t.Errorf("the first write after the sender took the batch was stamped %v, before it was queued (%v)", st, before)
	}
}
