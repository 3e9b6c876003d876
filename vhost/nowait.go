package vhost

import (
	"errors"

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
