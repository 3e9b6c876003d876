package mapper

import (
	"sync"
	"time"
)

// The lane of an IOQueue performs the requests io_uring serves badly —
// buffered writes to regular files, which ext4 cannot issue without
// blocking and which io_uring's io-wq would run one at a time per file —
// with blocking pwritev on a few goroutines of its own. Unlike a worker
// per request it costs no goroutine hand-off per request: the submitter
// only appends to the lane's queue, and wakes a lane goroutine once per
// batch (at Flush) when none is running; a lane goroutine takes requests
// one at a time while the queue has any and delivers their completions in
// batches (one publication of used elements, one notification), as the
// completion goroutine does for io_uring's.
//
// A request that blocks for long (dirty-page throttling, a stalled disk,
// a hung network file system) must not hold up the requests queued behind
// it: when the queue has requests, no lane goroutine is idle and none has
// made progress for laneStall, another lane goroutine starts (up to
// laneMax); the extra ones exit once the queue is empty.

const (
	// laneBase is the number of lane goroutines kept: one. ext4
	// serialises buffered writes to a file on its inode lock, so a
	// second goroutine mostly waits for that lock, at the price of a
	// sleep and a wake-up per write: with two, 4k random writes at QD32
	// ran at about 0.75x the IOPS of one for the same CPU per write.
	laneBase = 1
	// laneMax bounds the lane goroutines of one IOQueue.
	laneMax = 64
	// laneBatch is the most completions a lane goroutine holds before
	// delivering them.
	laneBatch = 16
	// laneStall is how long the lane may go without progress, with
	// requests queued, before another lane goroutine starts.
	laneStall = 2 * time.Millisecond
	// laneRefill is the queued work, in bytes, below which a lane
	// goroutine delivers the completions it holds (when they add up to
	// at least as much) instead of waiting for its queue to empty: the
	// submitter gets them back, and sends the next requests, while the
	// lane still copies the last ones (about 100 µs per MiB), so the lane
	// does not sit idle for a round trip through the driver after every
	// wave of large writes. Small requests are unaffected: 16 of them
	// (laneBatch) are delivered long before they add up to laneRefill.
	laneRefill = 1 << 20
)

// lane is an IOQueue's blocking lane; mu guards every field.
type lane struct {
	mu       sync.Mutex
	cond     sync.Cond
	queue    []uint32 // slots waiting, from head on
	head     int
	bytes    int   // the bytes of the requests waiting
	idle     int   // lane goroutines waiting for work
	n        int   // lane goroutines running
	progress int64 // laneClock when a lane goroutine last finished a request or went idle
	stop     bool
	timer    *time.Timer // the stall check, while armed
	wg       sync.WaitGroup
}

// laneEpoch is the origin of laneClock.
var laneEpoch = time.Now()

// laneClock returns monotonic nanoseconds.
func laneClock() int64 { return int64(time.Since(laneEpoch)) }

// laneDone is a request a lane goroutine performed, to be delivered.
type laneDone struct {
	idx uint32
	err error
}

// pushLane queues the filled slot idx, of n bytes, on the lane; Flush
// wakes a lane goroutine for it.
func (q *IOQueue) pushLane(idx uint32, n int) {
	l := &q.lane
	l.mu.Lock()
	l.queue = append(l.queue, idx)
	l.bytes += n
	l.mu.Unlock()
}

// kickLane makes sure a lane goroutine will take the queued requests:
// it wakes an idle one, starts one (up to laneBase, or more when the
// running ones have stalled), or arms the stall check.
func (q *IOQueue) kickLane() {
	l := &q.lane
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.head == len(l.queue) || l.stop {
		return
	}
	switch {
	case l.idle > 0:
		l.cond.Signal()
	case l.n < laneBase || (l.n < laneMax && laneClock()-l.progress > int64(laneStall)):
		l.progress = laneClock()
		l.n++
		l.wg.Add(1)
		go q.runLane()
	case l.timer == nil:
		l.timer = time.AfterFunc(laneStall, func() {
			l.mu.Lock()
			l.timer = nil
			l.mu.Unlock()
			q.kickLane()
		})
	}
}

// runLane is a lane goroutine.
func (q *IOQueue) runLane() {
	l := &q.lane
	defer l.wg.Done()
	done := make([]laneDone, 0, laneBatch)
	doneBytes := 0
	l.mu.Lock()
	for {
		if l.head == len(l.queue) {
			l.queue, l.head = l.queue[:0], 0
			if len(done) > 0 {
				l.mu.Unlock()
				q.deliver(done)
				done, doneBytes = done[:0], 0
				l.mu.Lock()
				continue
			}
			l.progress = laneClock()
			if l.stop || l.n > laneBase {
				l.n--
				l.mu.Unlock()
				return
			}
			l.idle++
			l.cond.Wait()
			l.idle--
			continue
		}
		idx := l.queue[l.head]
		l.head++
		n := q.slots[idx].want
		l.bytes -= n
		if l.head < len(l.queue) && l.idle > 0 {
			l.cond.Signal()
		}
		l.mu.Unlock()
		done = append(done, laneDone{idx, q.laneIO(idx)})
		doneBytes += n
		if len(done) == laneBatch {
			q.deliver(done)
			done, doneBytes = done[:0], 0
		}
		l.mu.Lock()
		l.progress = laneClock()
		if doneBytes >= laneRefill && l.bytes <= laneRefill && l.head < len(l.queue) {
			l.mu.Unlock()
			q.deliver(done)
			done, doneBytes = done[:0], 0
			l.mu.Lock()
		}
	}
}

// laneIO performs the request in slot idx with a blocking call.
func (q *IOQueue) laneIO(idx uint32) error {
	s := &q.slots[idx]
	if s.op == OpWrite {
		return s.fb.writev(s.bufs, s.off, ioBlocking)
	}
	return s.fb.readv(s.bufs, s.off, ioBlocking)
}

// deliver reports a lane goroutine's completions as one batch.
func (q *IOQueue) deliver(done []laneDone) {
	if q.batchStart != nil {
		q.batchStart()
	}
	for _, d := range done {
		q.finish(d.idx, d.err)
	}
	if q.batchEnd != nil {
		q.batchEnd()
	}
}

// stopLane ends the lane goroutines; every request has completed.
func (q *IOQueue) stopLane() {
	l := &q.lane
	l.mu.Lock()
	l.stop = true
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
	l.cond.Broadcast()
	l.mu.Unlock()
	l.wg.Wait()
}
