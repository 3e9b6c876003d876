package vhost

import (
	"errors"

	"github.com/vhostdm/vhostdm/mapper"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
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

// tryMaxBytes bounds the writes a ring goroutine runs itself, and
// tryMaxReadBytes the reads.
//
// A read the page cache serves costs about one memory copy wherever it
// runs. Handed to io_uring's io-wq threads (IOSQE_ASYNC), as reads of
// 256 KiB or more were, every 1 MiB read also cost the wake-up of an io-wq
// thread and of the engine's completion goroutine: on a quiet machine
// (idle CPUs to wake) 1.7x qemu-storage-daemon's CPU per read, where QSD
// copies inline in io_uring_enter. So reads up to 1 MiB are tried inline
// with RWF_NOWAIT like small ones, and the completions of inline reads are published every
// publishBytes (drain), so that the driver has the first ones back while
// the ring goroutine copies the next. Measured on a loaded 2-CPU machine
// against QSD on the same image (docs/PERFORMANCE.md): 1.1 to 1.45
// context switches per read instead of 1.8 to 2.1, CPU per read (median)
// 1.07x QSD's instead of 1.14x. Sending every other large read to io-wq
// instead, so that two CPUs copy, cost 1.45x QSD's CPU and 2.2 to 2.5
// context switches per read. A read the page cache cannot serve whole
// goes to the engine (io-wq), so a slow read never holds up its queue.
const (
	tryMaxBytes     = 128 << 10
	tryMaxReadBytes = 1 << 20
)

// tryIO runs a prepared read or write on the ring goroutine when the
// device can do it without blocking (done); otherwise the runtime hands r
// to a worker. Writes of a writethrough device need a flush and always go
// to a worker.
func (d *blkDev) tryIO(q *queue, rq *request) (status byte, usedLen uint32, done bool) {
	r := &rq.blk
	nd := d.nowait
	if nd == nil {
		return 0, 0, false
	}
	switch r.typ {
	case virtio.BlkTypeIn:
		if r.dataLen > tryMaxReadBytes {
			return 0, 0, false
		}
	case virtio.BlkTypeOut:
		if r.dataLen > tryMaxBytes || !d.writebackOn() {
			return 0, 0, false
		}
	default:
		return 0, 0, false
	}
	err := nd.TrySubmit(&r.mreq)
	if errors.Is(err, mapper.ErrWouldBlock) {
		return 0, 0, false
	}
	status, usedLen = d.result(q, rq, err)
	return status, usedLen, true
}

// asyncIO queues a prepared read or write on the queue's engine. Writes
// of a writethrough device need a flush and go to a worker.
func (d *blkDev) asyncIO(q *queue, rq *request) (status byte, usedLen uint32, queued, done bool) {
	r := &rq.blk
	switch r.typ {
	case virtio.BlkTypeIn:
	case virtio.BlkTypeOut:
		if !d.writebackOn() {
			return 0, 0, false, false
		}
	default:
		return 0, 0, false, false
	}
	ad, ok := d.exp.dev.(AsyncDevice)
	if !ok {
		return 0, 0, false, false
	}
	err := ad.SubmitAsync(q.ioq, &r.mreq, uint64(rq.chain.head))
	if err == nil {
		return 0, 0, true, false
	}
	if errors.Is(err, mapper.ErrWouldBlock) {
		return 0, 0, false, false
	}
	status, usedLen = d.result(q, rq, err)
	return status, usedLen, false, true
}

// complete gives the status of a read or write the engine performed.
func (d *blkDev) complete(q *queue, rq *request, err error) (status byte, usedLen uint32) {
	return d.result(q, rq, err)
}
