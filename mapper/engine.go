package mapper

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/internal/uring"
)

// IOQueue is the asynchronous I/O engine of one submitter (a vhost queue's
// ring goroutine): an io_uring on which [Device.SubmitAsync] queues reads
// and writes that a device's table sends, unchanged, to a file or block
// device backend, and a completion goroutine that reaps them in batches
// and reports each to the queue's complete function.
//
// Submission is batched per queue, in bounded chunks: SubmitAsync fills
// submission entries and hands them to the kernel itself, with one
// io_uring_enter, once SubmitBatch of them wait (DefaultSubmitBatch, 8);
// [IOQueue.Flush] submits the rest (the submitter calls it once per batch
// of requests it popped). The chunk bounds how long a request waits for
// the ones popped after it: io_uring issues a submission's requests to
// the block layer under one plug, so none reaches the device before the
// kernel has prepared the last (1-2 µs each for an O_DIRECT read). A
// client that sends a whole queue depth at once (a guest after one
// interrupt for 32 completions) would otherwise see its 32 requests
// reach the device together, after the ring goroutine popped and the
// kernel prepared all 32, and come back together: the device idles
// between such rounds, and the queue runs in lock-step with its client.
// Chunks of 8 let the device start on the first ones about a quarter of
// that time earlier and keep it busy with the rest (docs/PERFORMANCE.md,
// "O_DIRECT: submission in chunks"), for one more io_uring_enter per 8
// requests. Completion reaping is per queue too: one goroutine per IOQueue
// waits for the next completions, delivers every ready one, then calls the
// batch-end function once, so that a vhost queue publishes a batch of
// completions with one used-index store and at most one eventfd write.
//
// Neither side enters a system call through the Go scheduler on its usual
// path (one that does wakes the runtime's monitor thread whenever the
// process was idle, which then polls for about a millisecond: a cost per
// batch for a client that sends a few requests at a time). The
// completion goroutine waits on an eventfd registered with the ring, in
// Go's poller, and reads the completions from the shared ring without a
// system call; Flush submits with a raw io_uring_enter when every request
// in the batch has resident buffers (Request.Resident): io_uring never
// blocks its submitter (a request that would block goes to a kernel
// worker or waits on a poll; the submitters of a ring are serialised by
// mu, so there is no wait for its lock), and only a page fault on a
// buffer could, which for resident memory does no file I/O. Where the
// eventfd cannot be registered the completion goroutine waits in
// io_uring_enter, as a blocking system call.
//
// Buffered writes to regular files, which io_uring would serialise per
// file, go to the IOQueue's lane instead: a few goroutines of its own that
// perform them with blocking pwritev and deliver their completions in
// batches too (lane.go).
//
// SubmitAsync and Flush are called by one goroutine at a time (the
// submitter); complete, batchStart and batchEnd run on the completion
// goroutine, on lane goroutines, or for the rare short transfer on a
// goroutine that finishes it with a blocking call, so they must be safe
// to call concurrently with the submitter and with each other.
type IOQueue struct {
	ring       *uring.Ring
	complete   func(tag uint64, err error)
	batchStart func()
	batchEnd   func()
	log        *slog.Logger

	// efd is the eventfd registered with ring, in Go's poller, which the
	// completion goroutine waits on; nil: it waits in io_uring_enter.
	efd *os.File

	mu sync.Mutex // the submission side, and closing
	// submitBatch: queue submits once this many entries wait (immutable).
	submitBatch int
	// mixed: an entry queued and not yet consumed by the kernel has
	// buffers that are not resident, so the next submission goes
	// through the Go scheduler (guarded by mu).
	mixed   bool
	free    []uint32 // free slots, guarded by freeMu
	freeMu  sync.Mutex
	slots   []ioSlot
	pending atomic.Int32 // slots in use
	closing bool
	done    chan struct{}

	lane lane // buffered writes to regular files (lane.go)
}

// ioSlot is one request in flight on an IOQueue; the slot index is the
// submission's user data.
type ioSlot struct {
	tag     uint64
	dev     *Device
	fb      *fileBackend
	op      Op
	bufs    [][]byte
	off     int64
	want    int
	sector  uint64
	sectors uint64
	iov     []unix.Iovec
}

// closeTag is the user data of the no-op Close submits to wake the
// completion goroutine.
const closeTag = ^uint64(0)

// DefaultSubmitBatch is IOQueueConfig.SubmitBatch's default: SubmitAsync
// submits every 8 requests. Measured on a 2-CPU KVM guest whose virtual
// disk completes a burst of 32 4 KiB O_DIRECT reads with one interrupt,
// paired against submitting at Flush only (loaded, docs/PERFORMANCE.md):
// 8 served 1.01-1.23x the IOPS (1.10x median) for 0.3-1.1 µs more CPU
// per request; 16 served 0.95-1.16x; 4 served 0.99-1.10x for 1-2.6 µs
// more CPU per request; 1 (a system call per request, as
// qemu-storage-daemon makes) served 0.89x for 1.8x the CPU per request.
const DefaultSubmitBatch = 8

// ErrNoEngine wraps the reason NewIOQueue cannot set up an io_uring; the
// caller then performs blocking requests on worker goroutines.
var ErrNoEngine = errors.New("io_uring engine unavailable")

// IOQueueConfig configures NewIOQueue.
type IOQueueConfig struct {
	// Depth is the most requests in flight, 1 to 4096.
	Depth int
	// SubmitBatch is how many requests SubmitAsync queues before it
	// submits them itself, without waiting for Flush; 0 means
	// DefaultSubmitBatch.
	SubmitBatch int
	// Complete is called once per request SubmitAsync accepted, with the
	// tag it was given and the request's result. It runs with
	// debug.SetPanicOnFault on and must recover from its own panics.
	Complete func(tag uint64, err error)
	// BatchStart and BatchEnd, if not nil, are called by the completion
	// goroutine before and after each batch of completions it delivers
	// (a short transfer finished on another goroutine is delivered
	// outside any batch).
	BatchStart, BatchEnd func()
	// Log defaults to slog.Default().
	Log *slog.Logger
}

// NewIOQueue sets up an engine and starts its completion goroutine.
//
// It fails with an error wrapping ErrNoEngine when io_uring is
// unavailable: an old kernel, seccomp or kernel.io_uring_disabled, the
// locked-memory limit, or a build with the vhostdm_nouring tag.
func NewIOQueue(c IOQueueConfig) (*IOQueue, error) {
	if uringDisabled {
		return nil, fmt.Errorf("%w: built with the vhostdm_nouring tag", ErrNoEngine)
	}
	depth := c.Depth
	if depth <= 0 || depth > 4096 {
		return nil, fmt.Errorf("io queue depth %d: want 1 to 4096", depth)
	}
	r, err := uring.New(uint32(depth) + 1) // one more for Close's no-op
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoEngine, err)
	}
	log := c.Log
	if log == nil {
		log = slog.Default()
	}
	if err := r.SetMaxWorkers(uint32(depth)); err != nil {
		log.Debug("io_uring: io-wq worker limit unchanged", "err", err)
	}
	q := &IOQueue{ring: r, complete: c.Complete, batchStart: c.BatchStart, batchEnd: c.BatchEnd, log: log, done: make(chan struct{})}
	q.submitBatch = c.SubmitBatch
	if q.submitBatch <= 0 {
		q.submitBatch = DefaultSubmitBatch
	}
	if q.efd, err = registerEventfd(r); err != nil {
		log.Debug("io_uring: completions waited for in io_uring_enter", "err", err)
	}
	q.lane.cond.L = &q.lane.mu
	q.slots = make([]ioSlot, depth)
	q.free = make([]uint32, depth)
	for i := range q.free {
		q.free[i] = uint32(depth - 1 - i)
	}
	go q.reap()
	return q, nil
}

// registerEventfd returns a non-blocking eventfd, in Go's poller, that r
// signals for every completion it posts.
func registerEventfd(r *uring.Ring) (*os.File, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	if err := r.RegisterEventfd(fd); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// A non-blocking fd: os.NewFile adds it to the poller.
	return os.NewFile(uintptr(fd), "io_uring-eventfd"), nil
}

// Engine names the engine for logs: "io_uring".
func (q *IOQueue) Engine() string { return "io_uring" }

func (q *IOQueue) getSlot() (uint32, bool) {
	q.freeMu.Lock()
	defer q.freeMu.Unlock()
	if len(q.free) == 0 {
		return 0, false
	}
	i := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	return i, true
}

func (q *IOQueue) putSlot(i uint32) {
	q.freeMu.Lock()
	q.free = append(q.free, i)
	q.freeMu.Unlock()
}

// queue fills a submission entry for a read or write of bufs at byte off
// of fb, on behalf of dev's request at sector. ErrWouldBlock: no room.
// resident: bufs are resident memory (Request.Resident).
func (q *IOQueue) queue(dev *Device, fb *fileBackend, op Op, bufs [][]byte, off int64, sector, sectors, tag uint64, toLane, resident bool) error {
	if len(bufs) > maxIOV && !toLane {
		return ErrWouldBlock
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closing {
		return ErrWouldBlock
	}
	idx, ok := q.getSlot()
	if !ok {
		return ErrWouldBlock
	}
	if toLane {
		s := &q.slots[idx]
		*s = ioSlot{tag: tag, dev: dev, fb: fb, op: op, bufs: bufs, off: off, sector: sector, sectors: sectors, iov: s.iov[:0]}
		for _, b := range bufs {
			s.want += len(b)
		}
		q.pending.Add(1)
		q.pushLane(idx, s.want)
		return nil
	}
	e := q.ring.GetSQE()
	if e == nil {
		q.submitLocked()
		if e = q.ring.GetSQE(); e == nil {
			q.putSlot(idx)
			return ErrWouldBlock
		}
	}
	s := &q.slots[idx]
	*s = ioSlot{tag: tag, dev: dev, fb: fb, op: op, bufs: bufs, off: off, sector: sector, sectors: sectors, iov: s.iov[:0]}
	for _, b := range bufs {
		v := unix.Iovec{}
		if len(b) > 0 {
			v.Base = &b[0]
			v.SetLen(len(b))
		}
		s.iov = append(s.iov, v)
		s.want += len(b)
	}
	opcode := uint8(uring.OpReadv)
	if op == OpWrite {
		opcode = uring.OpWritev
	}
	var iov *unix.Iovec
	if len(s.iov) > 0 {
		iov = &s.iov[0]
	}
	e.PrepRW(opcode, fb.fd, iov, len(s.iov), off, uint64(idx))
	if op == OpRead && !fb.direct && s.want >= asyncReadBytes {
		e.Flags |= uring.SQEAsync
	}
	if !resident {
		q.mixed = true
	}
	q.pending.Add(1)
	if q.ring.Pending() >= q.submitBatch {
		q.submitLocked()
	}
	return nil
}

// asyncReadBytes is the size from which a buffered read goes to an io-wq
// thread at once (IOSQE_ASYNC) instead of being tried inline in
// io_uring_enter: a read the page cache serves is a memory copy of tens
// of µs per 128 KiB, which inline would run on the submitting ring
// goroutine's thread, one after another, while io-wq threads copy in
// parallel on every CPU.
const asyncReadBytes = 256 << 10

// Flush hands every request queued and not yet submitted to the kernel
// with one io_uring_enter.
func (q *IOQueue) Flush() {
	q.mu.Lock()
	q.submitLocked()
	q.mu.Unlock()
	q.kickLane()
}

func (q *IOQueue) submitLocked() {
	if q.ring.Pending() == 0 && q.ring.Unconsumed() == 0 {
		return
	}
	var err error
	if q.mixed {
		_, err = q.ring.Submit()
	} else {
		_, err = q.ring.SubmitRaw()
	}
	if err != nil {
		// EAGAIN or EBUSY: the kernel is short of memory or completion
		// slots. The entries stay published; the completion goroutine
		// submits them again after it has reaped.
		q.log.Debug("io_uring submit deferred", "err", err)
	}
	if q.ring.Unconsumed() == 0 {
		q.mixed = false
	}
}

// reap is the completion goroutine.
func (q *IOQueue) reap() {
	defer close(q.done)
	debug.SetPanicOnFault(true)
	closed := false
	for !closed || q.pending.Load() > 0 {
		if err := q.wait(); err != nil {
			q.log.Error("io_uring wait", "err", err)
			time.Sleep(time.Millisecond)
		}
		// The slots of the completions about to be read were filled under
		// mu before their submission: taking it orders those writes
		// before the reads here for the race detector too (the kernel's
		// ring is an ordering the detector cannot see).
		q.sync()
		started := false
		q.ring.Reap(func(c uring.CQE) {
			if c.UserData == closeTag {
				closed = true
				return
			}
			if !started && q.batchStart != nil {
				q.batchStart()
			}
			started = true
			q.completed(uint32(c.UserData), c.Res)
		})
		if started && q.batchEnd != nil {
			q.batchEnd()
		}
		q.retry()
	}
}

// wait blocks until a completion is ready: on the eventfd in Go's poller,
// or without one in io_uring_enter.
func (q *IOQueue) wait() error {
	if q.efd == nil {
		return q.ring.Wait()
	}
	for q.ring.Ready() == 0 {
		if q.ring.Overflowed() {
			// Cannot happen while the completion ring has room for
			// every slot; moved in by a system call if it does.
			if err := q.ring.FlushOverflow(); err != nil {
				return err
			}
			continue
		}
		if err := q.readEventfd(); err != nil {
			return err
		}
	}
	return nil
}

// readEventfd waits in Go's poller until the eventfd's counter is not
// zero, and resets it. The kernel adds to it after it posts completions,
// so a completion posted after the caller saw the ring empty ends the
// wait; one posted before leaves a count that ends the next wait at once.
func (q *IOQueue) readEventfd() error {
	rc, err := q.efd.SyscallConn()
	if err != nil {
		return err
	}
	var buf [8]byte
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			// The eventfd is this queue's own and non-blocking: a raw
			// read never blocks.
			_, _, e := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
			switch e {
			case 0:
				rerr = nil
				return true
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false
			}
			rerr = fmt.Errorf("io_uring eventfd: %w", e)
			return true
		}
	})
	if err != nil {
		return err
	}
	return rerr
}

// sync takes and releases mu: an ordering point, not a critical section.
func (q *IOQueue) sync() {
	q.mu.Lock()
	defer q.mu.Unlock()
}

// retry submits again entries a deferred submission left published.
func (q *IOQueue) retry() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.ring.Unconsumed() > 0 {
		q.submitLocked()
	}
}

// completed finishes the request in slot idx with the kernel's result.
func (q *IOQueue) completed(idx uint32, res int32) {
	s := &q.slots[idx]
	switch {
	case int(res) == s.want:
		q.finish(idx, nil)
	case res >= 0 || res == -int32(unix.EAGAIN) || res == -int32(unix.EINTR):
		// A short transfer (end of file, a signal): the rest with a
		// blocking call, off the completion goroutine.
		done := max(int(res), 0)
		go q.finishShort(idx, done)
	default:
		what := "read"
		if s.op == OpWrite {
			what = "write"
		}
		q.finish(idx, fmt.Errorf("%s %s at %d: %w", what, s.fb.name, s.off, unix.Errno(-res)))
	}
}

// finishShort completes a short transfer of which done bytes went through.
func (q *IOQueue) finishShort(idx uint32, done int) {
	s := &q.slots[idx]
	rest := advance(s.bufs, done)
	var err error
	if s.op == OpWrite {
		err = s.fb.writev(rest, s.off+int64(done), ioBlocking)
	} else {
		err = s.fb.readv(rest, s.off+int64(done), ioBlocking)
	}
	q.finish(idx, err)
}

// finish records a write, releases the device and the slot and reports
// the result.
func (q *IOQueue) finish(idx uint32, err error) {
	s := &q.slots[idx]
	tag, dev := s.tag, s.dev
	if s.op == OpWrite {
		if err == nil {
			s.fb.writeGen.Add(1)
		}
		// Recorded before the completion is reported, as Submit does.
		dev.recordWrite(s.sector, s.sectors)
	}
	s.bufs, s.dev, s.fb = nil, nil, nil
	clear(s.iov)
	q.putSlot(idx)
	q.pending.Add(-1)
	dev.exit()
	q.complete(tag, err)
}

// Close stops the completion goroutine and releases the ring. The caller
// must have seen the completion of every request it submitted.
func (q *IOQueue) Close() error {
	q.mu.Lock()
	if q.closing {
		q.mu.Unlock()
		return nil
	}
	q.closing = true
	e := q.ring.GetSQE()
	if e == nil {
		q.submitLocked()
		e = q.ring.GetSQE()
	}
	if e != nil {
		e.Opcode = uring.OpNop
		e.UserData = closeTag
	}
	q.submitLocked()
	q.mu.Unlock()
	if e == nil {
		return errors.New("io_uring close: no submission entry free")
	}
	<-q.done
	q.stopLane()
	err := q.ring.Close()
	if q.efd != nil {
		q.efd.Close()
	}
	return err
}

// Remapper is a target that sends reads and writes unchanged to one
// range of one backend (linear): the engine then performs them on the
// backend directly.
type Remapper interface {
	// Remap returns the backend and its sector that a read or write of
	// sectors at sector (relative to the target) goes to, or ok false
	// when the request is not such a pass-through.
	Remap(sector, sectors uint64) (b Backend, bsector uint64, ok bool)
}

// fileOf returns the file backend behind b, if it is one.
func fileOf(b Backend) *fileBackend {
	switch fb := b.(type) {
	case *fileBackend:
		return fb
	case *fileHandle:
		return fb.fileBackend
	}
	return nil
}

// SubmitAsync queues r on q when the live table sends it, unchanged, to a
// file or block device backend: a read, or a write without FUA to a block
// device or to any regular file (buffered writes to a regular file go to
// q's lane of blocking goroutines, lane.go), within one target that is a
// Remapper. It returns nil when r was queued (q's
// complete function then reports its result, with tag, once it was
// submitted: by SubmitAsync itself every SubmitBatch requests, or by
// q.Flush), ErrWouldBlock when r does not qualify or q is full (the
// caller performs it with Submit), or the error of a bad request, as
// Submit does. r.Data must stay valid until r completes; r itself may be
// reused at once.
func (d *Device) SubmitAsync(q *IOQueue, r *Request, tag uint64) error {
	d.inflight.Add(1)
	if d.suspended.Load() {
		d.exit()
		return ErrWouldBlock
	}
	err := d.submitAsync(q, r, tag)
	if err != nil {
		d.exit()
	}
	return err
}

func (d *Device) submitAsync(q *IOQueue, r *Request, tag uint64) error {
	t := d.live.Load()
	if t == nil {
		return fmt.Errorf("%s: %w", d.name, ErrNoTable)
	}
	if r.Op != OpRead && (r.Op != OpWrite || r.FUA) {
		return ErrWouldBlock
	}
	if err := d.check(t, r); err != nil {
		return err
	}
	if r.Op == OpWrite && t.readOnly {
		return ErrReadOnly
	}
	i := t.Find(r.Sector)
	var start uint64
	if i > 0 {
		start = t.ends[i-1]
	}
	if r.Sector+r.Sectors > t.ends[i] {
		return ErrWouldBlock
	}
	rm, ok := t.targets[i].(Remapper)
	if !ok {
		return ErrWouldBlock
	}
	b, bsector, ok := rm.Remap(r.Sector-start, r.Sectors)
	if !ok {
		return ErrWouldBlock
	}
	fb := fileOf(b)
	if fb == nil {
		return ErrWouldBlock
	}
	// Buffered writes to a regular file go to the lane (lane.go), not
	// to io_uring: ext4 has no non-blocking buffered writes, so io_uring
	// runs every one on its io-wq threads, which serialise buffered
	// writes per file (hashed work): 4k random writes at QD32 ran one at
	// a time, at about half the IOPS of parallel pwritev for the same CPU
	// per write (docs/PERFORMANCE.md). O_DIRECT writes (cache = "none")
	// do go to io_uring: the kernel issues an overwrite of allocated
	// blocks without blocking, and the ones it punts (extending writes,
	// writes into unwritten extents, timestamp updates) are not
	// serialised on file systems with parallel direct writes (ext4, xfs:
	// FOP_DIO_PARALLEL_WRITE, Linux 6.3). Block devices have no such
	// serialisation either.
	toLane := r.Op == OpWrite && !fb.block && !fb.direct
	off := int64(bsector << SectorShift)
	if fb.direct && !fb.aligned(r.Data, off) {
		return ErrWouldBlock // a worker bounces it
	}
	return q.queue(d, fb, r.Op, r.Data, off, r.Sector, r.Sectors, tag, toLane, r.Resident)
}
