package agent

import "testing"

// TestPendReuse: the pending list keeps its array while acknowledgements
// take from its front and writes add at its end (no new array per lap),
// and holds every item in order.
func TestPendReuse(t *testing.T) {
	v := &agentVolume{}
	items := make([]qitem, 64)
	next, first := 0, 0
	add := func() {
		it := &items[next%len(items)]
		it.seq = uint64(next)
		v.pend(it)
		next++
	}
	for range 16 {
		add()
	}
	var arr **qitem
	for lap := range 1000 {
		if lap == 100 {
			arr = &v.pendArr[0] // grown to its size
		}
		// ack 5, queue 5: the backlog stays at 16
		clear(v.pending[:5])
		v.pending = v.pending[5:]
		first += 5
		for range 5 {
			add()
		}
		if len(v.pending) != 16 {
			t.Fatalf("lap %d: %d pending", lap, len(v.pending))
		}
		for i, it := range v.pending {
			if it.seq != uint64(first+i) {
				t.Fatalf("lap %d: item %d has sequence %d, want %d", lap, i, it.seq, first+i)
			}
		}
	}
	if &v.pendArr[0] != arr {
		t.Errorf("the pending list moved to a new array at a steady backlog")
	}
	// Everything acknowledged up to the array's end: the next item goes
	// to its start.
	for len(v.pending) < cap(v.pending) {
		add()
	}
	v.pending = v.pending[len(v.pending):]
	add()
	if &v.pending[0] != arr {
		t.Errorf("an emptied pending list did not restart at its array's start")
	}
}
