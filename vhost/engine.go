package vhost

import (
	"fmt"

	"github.com/vhostdm/vhostdm/mapper"
)

// AsyncDevice is a Device whose reads and writes can go to an
// asynchronous I/O engine; *mapper.Device implements it. An export over
// one gives each queue a mapper.IOQueue (io_uring): the ring goroutine
// queues the requests the engine takes, submits them with one system call
// per chunk of mapper.DefaultSubmitBatch and one for the rest of its batch,
// and the engine's completion goroutine completes them, so
// that no worker goroutine is involved. Requests the engine does not take
// (targets that do more than remap, flushes, FUA writes) go to workers as
// before; so does everything when io_uring is unavailable.
type AsyncDevice interface {
	// SubmitAsync queues r on q with tag, or returns
	// mapper.ErrWouldBlock (or a bad request's error) without queueing
	// it. It must not block.
	SubmitAsync(q *mapper.IOQueue, r *mapper.Request, tag uint64) error
}

// startEngine gives a starting queue an io_uring engine when its device
// takes one; without io_uring the queue runs on workers alone. Queue 0
// logs, at INFO, which engine runs and why.
func (q *queue) startEngine() {
	q.ioq = nil
	if _, ok := q.dev.exp.dev.(AsyncDevice); !ok {
		if q.index == 0 {
			q.log.Info("I/O engine", "engine", "threads", "reason", "the device takes no asynchronous requests (wrapped for metrics or replication)")
		}
		return
	}
	ioq, err := mapper.NewIOQueue(mapper.IOQueueConfig{
		Depth:      maxChainBufs,
		Complete:   q.engineDone,
		BatchStart: q.engineBatchStart,
		BatchEnd:   q.engineBatchEnd,
		Log:        q.log,
	})
	if err != nil {
		if q.index == 0 {
			q.log.Info("I/O engine", "engine", "threads", "reason", err)
		}
		return
	}
	if q.index == 0 {
		q.log.Info("I/O engine", "engine", ioq.Engine())
	}
	q.ioq = ioq
}

// stopEngine releases a stopped queue's engine; every request has
// completed.
func (q *queue) stopEngine() {
	if q.ioq != nil {
		if err := q.ioq.Close(); err != nil {
			q.log.Warn("I/O engine close", "err", err)
		}
		q.ioq = nil
	}
}

// async queues a prepared request on the queue's engine and reports
// whether it did (or completed it at once); otherwise the caller hands r
// to a worker.
func (q *queue) async(r *request) (done bool) {
	if q.ioq == nil {
		return false
	}
	defer func() {
		if p := recover(); p != nil {
			done = true
			q.requestPanicked(r, p)
		}
	}()
	status, usedLen, queued, now := q.h.asyncIO(q, r)
	switch {
	case queued:
		return true
	case now:
		q.finishOn(r, status, usedLen, true)
		return true
	}
	return false
}

// flushEngine submits what the ring goroutine queued on the engine.
func (q *queue) flushEngine() {
	if q.ioq != nil {
		q.ioq.Flush()
	}
}

// engineDone completes a request the engine performed, on the engine's
// completion goroutine; a fault or panic is handled as on a worker.
func (q *queue) engineDone(tag uint64, err error) {
	r := &q.reqs[tag]
	defer func() {
		if p := recover(); p != nil {
			q.requestPanicked(r, p)
		}
	}()
	status, usedLen := q.h.complete(q, r, err)
	q.finish(r, status, usedLen)
}

// engineBatchStart and engineBatchEnd bracket a batch of engine
// completions as hold and release do the ring goroutine's batches: the
// used index is published, and the driver notified, once per batch. The
// batch holds engMu, so that halt, once every request has completed,
// waits for the batch's publication too (engineIdle) before the ring
// changes under it.
func (q *queue) engineBatchStart() {
	q.engMu.Lock()
	q.finishing.Add(1)
}

func (q *queue) engineBatchEnd() {
	defer q.engMu.Unlock()
	defer func() {
		if p := recover(); p != nil { // a fault on the used ring
			q.dev.fault(fmt.Errorf("queue %d: publishing engine completions: %s", q.index, describePanic(p)))
		}
	}()
	if q.finishing.Add(-1) != 0 || q.dev.dead.Load() {
		return
	}
	if q.publish() {
		q.notify()
	}
}

// engineIdle waits for a batch of engine completions being delivered to
// be published.
func (q *queue) engineIdle() {
	q.engMu.Lock()
	defer q.engMu.Unlock()
}
