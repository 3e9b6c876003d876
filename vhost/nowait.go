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

// tryMaxBytes bounds the reads and writes a ring goroutine runs itself:
// a larger page-cache copy takes long enough (tens of µs per 128 KiB)
// that io-wq threads or a worker, on another CPU, do it better while the
// ring goroutine pops the next requests. Reads up to 1 MiB on the ring
// goroutine (RWF_NOWAIT, published every 256 KiB) were measured too: on a
// quiet 2-CPU machine, same run, they cost about half the CPU per 1 MiB
// read (0.87x qemu-storage-daemon's instead of 1.62x) but served 15%
// fewer of them (0.77x QSD's IOPS instead of 0.90x), and also fewer at
// load 8-21 (docs/PERFORMANCE.md, "1 MiB reads on the ring goroutine").
const tryMaxBytes = 128 << 10

// tryIO runs a prepared read or write on the ring goroutine when the
// device can do it without blocking (done); otherwise the runtime hands r
// to a worker. Writes of a writethrough device need a flush and always go
// to a worker.
func (d *blkDev) tryIO(q *queue, rq *request) (status byte, usedLen uint32, done bool) {
	r := &rq.blk
	nd := d.nowait
	if nd == nil || r.dataLen > tryMaxBytes {
		return 0, 0, false
	}
	switch r.typ {
	case virtio.BlkTypeIn:
	case virtio.BlkTypeOut:
		if !d.writebackOn() {
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
