package vhost

import (
	"errors"
	"fmt"

	"github.com/vhostdm/vhostdm/mapper"
)

// NowaitDevice is a Device that can attempt a request without blocking;
// *mapper.Device implements it. An export whose device has it runs reads
// and writes to completion on the queue's ring goroutine whenever the
// device can serve them without waiting (targets that only remap, data in
// the page cache) and hands only the others to worker goroutines: no
// goroutine switch on the fast path, and no request that waits (for a
// disk, a delay, a suspend) ever holds up its queue.
type NowaitDevice interface {
	// TrySubmit performs r as Submit does, or returns
	// mapper.ErrWouldBlock without having completed it; the export then
	// submits r again with Submit from a worker. It must not block.
	TrySubmit(r *mapper.Request) error
}

// tryMaxBytes bounds the reads and writes a ring goroutine runs itself:
// a larger page-cache copy takes long enough (tens of µs per 128 KiB)
// that a worker, on another CPU, does it better while the ring goroutine
// pops the next requests.
const tryMaxBytes = 128 << 10

// try runs a prepared read or write to completion on the ring goroutine
// when the device can do it without blocking, and reports whether it did;
// otherwise the caller hands r to a worker. Writes of a writethrough
// device need a flush and always go to a worker.
func (q *blkQueue) try(r *blkReq) (done bool) {
	nd := q.dev.nowait
	if nd == nil || r.dataLen > tryMaxBytes {
		return false
	}
	switch r.typ {
	case BlkTypeIn:
	case BlkTypeOut:
		if !q.dev.writebackOn() {
			return false
		}
	default:
		return false
	}
	defer func() {
		if p := recover(); p != nil {
			done = true
			q.requestPanicked(r, p)
		}
	}()
	err := nd.TrySubmit(&r.mreq)
	if errors.Is(err, mapper.ErrWouldBlock) {
		return false
	}
	status, usedLen := q.result(r, err)
	q.finish(r, status, usedLen)
	return true
}

// AsyncDevice is a Device whose reads and writes can go to an
// asynchronous I/O engine; *mapper.Device implements it. An export over
// one gives each queue a mapper.IOQueue (io_uring): the ring goroutine
// queues the requests the engine takes, submits them with one system call
// per batch, and the engine's completion goroutine completes them, so
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
func (q *blkQueue) startEngine() {
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
func (q *blkQueue) stopEngine() {
	if q.ioq != nil {
		if err := q.ioq.Close(); err != nil {
			q.log.Warn("I/O engine close", "err", err)
		}
		q.ioq = nil
	}
}

// async queues a prepared read or write on the queue's engine and
// reports whether it did (or completed it with a bad request's error);
// otherwise the caller hands r to a worker. Writes of a writethrough
// device need a flush and go to a worker.
func (q *blkQueue) async(r *blkReq) bool {
	switch {
	case q.ioq == nil:
		return false
	case r.typ == BlkTypeIn:
	case r.typ == BlkTypeOut:
		if !q.dev.writebackOn() {
			return false
		}
	default:
		return false
	}
	ad := q.dev.exp.dev.(AsyncDevice)
	err := ad.SubmitAsync(q.ioq, &r.mreq, uint64(r.chain.head))
	if err == nil {
		return true
	}
	if errors.Is(err, mapper.ErrWouldBlock) {
		return false
	}
	status, usedLen := q.result(r, err)
	q.finish(r, status, usedLen)
	return true
}

// flushEngine submits what the ring goroutine queued on the engine.
func (q *blkQueue) flushEngine() {
	if q.ioq != nil {
		q.ioq.Flush()
	}
}

// engineDone completes a request the engine performed, on the engine's
// completion goroutine; a fault or panic is handled as on a worker.
func (q *blkQueue) engineDone(tag uint64, err error) {
	r := &q.reqs[tag]
	defer func() {
		if p := recover(); p != nil {
			q.requestPanicked(r, p)
		}
	}()
	status, usedLen := q.result(r, err)
	q.finish(r, status, usedLen)
}

// engineBatchStart and engineBatchEnd bracket a batch of engine
// completions as hold and release do the ring goroutine's batches: the
// used index is published, and the driver notified, once per batch. The
// batch holds engMu, so that halt, once every request has completed,
// waits for the batch's publication too (engineIdle) before the ring
// changes under it.
func (q *blkQueue) engineBatchStart() {
	q.engMu.Lock()
	q.finishing.Add(1)
}

func (q *blkQueue) engineBatchEnd() {
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
func (q *blkQueue) engineIdle() {
	q.engMu.Lock()
	defer q.engMu.Unlock()
}
