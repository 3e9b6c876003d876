package snapshot

import "sync"

// rangeLock locks ranges of sectors, shared or exclusive: two holders
// conflict when their ranges overlap and either is exclusive. Waiters are
// woken on every unlock; the number of holders is the number of requests
// in flight, so a linear scan is cheap.
type rangeLock struct {
	mu   sync.Mutex
	cond *sync.Cond
	held map[*heldRange]struct{}
}

type heldRange struct {
	start, end uint64 // [start, end)
	excl       bool
}

func (l *rangeLock) conflicts(h *heldRange) bool {
	for o := range l.held {
		if o.start < h.end && h.start < o.end && (o.excl || h.excl) {
			return true
		}
	}
	return false
}

// lock takes [start, end) and returns the function that releases it.
func (l *rangeLock) lock(start, end uint64, excl bool) (unlock func()) {
	h := &heldRange{start: start, end: end, excl: excl}
	l.mu.Lock()
	if l.cond == nil {
		l.cond = sync.NewCond(&l.mu)
		l.held = map[*heldRange]struct{}{}
	}
	for l.conflicts(h) {
		l.cond.Wait()
	}
	l.held[h] = struct{}{}
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		delete(l.held, h)
		l.cond.Broadcast()
		l.mu.Unlock()
	}
}
