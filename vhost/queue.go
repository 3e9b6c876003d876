package vhost

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

	"github.com/vhostdm/vhostdm/mapper"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// This file is the queue runtime: the ring goroutine that pops descriptor
// chains, the worker hand-off, batched publication of used elements,
// inflight tracking and completion. It knows nothing of virtio-blk: it
// walks a chain, finds its status byte and hands the request to its
// requestHandler (blk.go), which gives the chain a meaning and performs
// the I/O.

// requestHandler is the device a queue serves. The runtime owns the ring,
// the walked chain (request.chain), the status byte and completion; the
// handler reads the chain, keeps its per-request state in request.blk and
// performs the I/O. prepare and tryIO run on the ring goroutine, io on a
// worker goroutine; all may touch guest memory and may panic on a fault,
// which the runtime recovers.
type requestHandler interface {
	// prepare parses and checks the request. It returns async=true when
	// the request needs I/O, else the status and used length to complete
	// it with now.
	prepare(q *queue, r *request) (status byte, usedLen uint32, async bool)
	// tryIO performs a prepared request's I/O if it can do so without
	// blocking; done=false means r must go to a worker (io).
	tryIO(q *queue, r *request) (status byte, usedLen uint32, done bool)
	// io performs a prepared request's I/O; it may block.
	io(q *queue, r *request) (status byte, usedLen uint32)
	// asyncIO queues a prepared request's I/O on the queue's engine
	// (q.ioq, not nil) without blocking: queued=true, and the engine
	// completes it through complete; or done=true with the status to
	// complete it with now (a bad request); or neither, and r goes to a
	// worker.
	asyncIO(q *queue, r *request) (status byte, usedLen uint32, queued, done bool)
	// complete gives the status of a request the engine performed.
	complete(q *queue, r *request, err error) (status byte, usedLen uint32)
}

// maxWorkersPerRing bounds the worker goroutines of one queue.
const maxWorkersPerRing = 256

// queueRuntime holds the queues of one connection and what they share:
// whether shared memory faulted. It never sees the socket.
type queueRuntime struct {
	exp    *Export
	log    *slog.Logger
	queues []*queue

	// dead is set when a goroutine faulted on memory the front end shares
	// (guest memory, the dirty log): from then on nothing touches that
	// memory again, requests still in flight complete without a used
	// element (dropped counts them), and onFault disconnects the front end.
	dead    atomic.Bool
	dropped atomic.Uint64
	onFault func(err error)
}

// fault makes the device dead after a fault on shared memory (or a panic
// on a goroutine that walks the rings) and disconnects the front end.
func (d *queueRuntime) fault(err error) {
	if d.dead.Swap(true) {
		return
	}
	if d.onFault != nil {
		d.onFault(err)
	}
}

// describePanic names a recovered panic for the log: the address of a
// memory fault, or the value and stack of anything else (a bug).
func describePanic(p any) string {
	if f, ok := p.(interface{ Addr() uintptr }); ok {
		return fmt.Sprintf("memory fault at %#x", f.Addr())
	}
	return fmt.Sprintf("panic: %v\n%s", p, debug.Stack())
}

// isFault reports whether a recovered panic value is a memory fault that
// debug.SetPanicOnFault turned into a panic (runtime errors that carry the
// faulting address), as opposed to a bug such as a nil dereference.
func isFault(p any) bool {
	_, ok := p.(interface{ Addr() uintptr })
	return ok
}

// newQueueRuntime returns the stopped queues of a connection to e, served
// by h.
func newQueueRuntime(e *Export, log *slog.Logger, h requestHandler) *queueRuntime {
	d := &queueRuntime{exp: e, log: log}
	for i := range e.cfg.NumQueues {
		d.queues = append(d.queues, &queue{dev: d, h: h, index: i, log: log.With("queue", i)})
	}
	return d
}

// queue is one virtqueue and the goroutines that serve it: the ring
// goroutine pops chains and runs the requests that do not block itself, and
// hands the others to workers; requests complete out of order, and used-ring
// updates and notifications are batched. The connection goroutine changes
// its configuration only through its methods (queueconf.go), while the queue
// is stopped or paused.
type queue struct {
	dev   *queueRuntime
	h     requestHandler
	index int
	log   *slog.Logger

	// Set by the connection goroutine while the queue is stopped or paused.
	num      uint16
	addr     wire.VringAddr
	addrSet  bool
	base     uint16
	baseHi   uint16 // bits 16-31 of SET_VRING_BASE (a packed ring's used position)
	ring     splitRing
	packed   *packedRing // non-nil: VIRTIO_F_RING_PACKED (packed.go), ring unused
	mem      *Mem
	dlog     *dirtyLog // non-nil while VHOST_F_LOG_ALL is on
	logUsed  bool      // VHOST_VRING_F_LOG: log used-ring writes at addr.Log
	inflight *inflightQueue
	resubmit []uint16
	kick     *os.File // nil: poll (SET_VRING_KICK with the no-fd bit)
	kickSet  bool
	state    queueState
	done     chan struct{} // closed when the ring goroutine exits
	work     chan *request
	reqs     []request // by head descriptor index
	nworkers int
	ioq      *mapper.IOQueue // the io_uring engine, nil: workers only (engine.go)
	engMu    sync.Mutex      // held by the engine's completion goroutine during a batch
	// pool holds the chain buffers (translated segments, data slices) of
	// the requests in flight: at most maxChainBufs per queue, reused, so
	// that the queue's memory does not depend on the chains' shape.
	pool   chan *chainBuf
	nbufs  int
	local  []*chainBuf // buffers of requests the ring goroutine completed, its own
	cur    uint16      // head being dispatched by the ring goroutine, if curSet
	curSet bool

	call    atomic.Pointer[notifier]
	errf    atomic.Pointer[notifier]
	enabled atomic.Bool
	stopReq atomic.Bool
	broken  atomic.Bool
	idle    atomic.Int32 // idle workers minus queued requests
	wake    chan struct{}
	active  sync.WaitGroup // requests popped and not yet completed
	depth   atomic.Int32   // the same count, for metrics
	workers sync.WaitGroup
	badLogs atomic.Uint32

	renotifies atomic.Uint64 // call eventfd signalled again by renotify
	polls      atomic.Uint64 // polls of the available ring (pollDry)
	pollSpin   atomic.Int64  // nanoseconds spent in them
	notified   atomic.Uint64 // call eventfd writes
	kicks      atomic.Uint64 // kick eventfd reads that found a kick
	parks      atomic.Uint64 // times the ring goroutine waited for a kick in the poller
	// unstickTicks counts the wake-ups of halt's unstick timer, armed
	// only while a call or error eventfd write is in progress.
	unstickTicks atomic.Uint64

	// Owned by the ring goroutine.
	held       bool  // the ring goroutine holds finishing for a batch
	served     int64 // requests completed on the ring goroutine since it last ran dry (pollFor)
	renotified bool  // renotify has warned for the current stall

	// Used side, guarded by usedMu.
	usedMu sync.Mutex
	// finishing counts completers between their I/O and the used lock,
	// plus one while the ring goroutine runs a batch: whoever brings it to
	// zero publishes the used index and notifies for everyone.
	finishing atomic.Int32
	batch     []uint16
	one       [8]byte
	kbuf      [8]byte
	kvec      unix.Iovec // kbuf, for the raw preadv2
}

type queueState int

const (
	queueStopped queueState = iota
	queueRunning
	queuePaused
)

// request is one request in flight, kept per head descriptor index so that
// the hot path does not allocate. blk is the handler's state of the
// request; the runtime only clears it (blkReq.release).
type request struct {
	busy      atomic.Bool // popped and not yet in the used ring
	owed      atomic.Bool // counted in active and depth
	buf       *chainBuf   // from the queue's pool while in flight
	chain     chain
	status    []byte
	statusGPA uint64
	blk       blkReq
}

// chainBuf is the reusable memory of one request in flight: its chain's
// translated segments, and the handler's (blkBuf: data slices handed to
// the mapper, discard ranges).
type chainBuf struct {
	segs []seg
	blk  blkBuf
}

// maxChainBufs bounds the requests a queue has popped and not completed:
// each holds a chainBuf of up to maxSegments segments (40 B) and data
// slices (24 B), 64 KiB at most, so a queue's chain memory stays under
// maxChainBufs * 64 KiB (16 MiB) whatever the chains look like
// (docs/REFERENCE.md, "Limits"). It matches the worker pool.
const maxChainBufs = maxWorkersPerRing

// setupRing translates the ring through mem and applies the negotiated
// features; the queue is stopped or paused.
func (q *queue) setupRing(env ringEnv) error {
	mem, features, dlog := env.mem, env.features, env.dlog
	if mem == nil {
		return errors.New("no guest memory table")
	}
	if features&virtio.FeatureRingPacked != 0 {
		if err := q.setupPacked(mem, features); err != nil {
			return err
		}
	} else {
		q.packed = nil
		if q.num&(q.num-1) != 0 {
			return fmt.Errorf("split ring of %d entries: not a power of 2", q.num)
		}
		if _, err := q.ring.setup(mem, q.num, q.addr); err != nil {
			return err
		}
	}
	q.mem = mem
	q.ring.eventIdx = features&virtio.FeatureEventIdx != 0 && q.packed == nil
	q.ring.indirect = features&virtio.FeatureIndirectDesc != 0
	q.dlog = nil
	if features&virtio.FeatureLogAll != 0 {
		q.dlog = dlog
	}
	q.logUsed = q.dlog != nil && q.addr.Flags&wire.VringAddrFlagLog != 0
	return nil
}

// start starts a stopped queue: it sets up the ring, recovers in-flight
// requests from the inflight region if there is one, and starts the ring
// goroutine.
func (q *queue) start(env ringEnv) error {
	inf := env.inflight
	if err := q.setupRing(env); err != nil {
		return err
	}
	if q.packed != nil {
		if err := q.startPacked(inf); err != nil {
			return err
		}
	} else {
		q.startSplit(inf)
	}
	q.startRuntime()
	return nil
}

// startSplit sets the indices of a starting split ring and recovers the
// requests an earlier back end left in the inflight region.
func (q *queue) startSplit(inf *inflightRegion) {
	q.ring.lastAvail = q.base
	used := q.ring.usedRingIdx()
	q.ring.restart(used)
	q.inflight, q.resubmit = nil, nil
	if inf != nil {
		iq, err := inf.queue(q.index, q.num)
		if err != nil {
			q.log.Warn("inflight tracking off", "err", err)
		} else {
			last, resubmit, recovered := iq.start(used, q.base)
			q.inflight, q.resubmit = iq, resubmit
			if recovered {
				q.ring.lastAvail = last
				q.log.Info("inflight region recovered", "resubmit", len(resubmit), "used_idx", used, "last_avail", last)
			}
		}
	}
}

// startRuntime starts the ring goroutine of a queue whose ring is set up.
func (q *queue) startRuntime() {
	if len(q.reqs) != int(q.num) {
		q.reqs = make([]request, q.num)
	}
	for i := range q.reqs {
		q.reqs[i].busy.Store(false)
		q.reqs[i].owed.Store(false)
	}
	q.pool = make(chan *chainBuf, maxChainBufs)
	q.nbufs = 0
	q.local = q.local[:0]
	q.curSet = false
	q.work = make(chan *request, q.num)
	q.nworkers = 0
	q.finishing.Store(0)
	q.held = false
	q.idle.Store(0)
	q.broken.Store(false)
	q.wake = make(chan struct{}, 1)
	q.startEngine()
	q.state = queueRunning
	q.runLoop()
}

// runLoop starts the ring goroutine.
func (q *queue) runLoop() {
	q.served = 0
	q.stopReq.Store(false)
	q.done = make(chan struct{})
	go q.run(q.done)
}

// halt stops the ring goroutine and waits for the requests in flight.
func (q *queue) halt() {
	q.stopReq.Store(true)
	q.nudge()
	stop := make(chan struct{})
	defer close(stop)
	go unstickWhileBlocked(stop, &q.unstickTicks, q.call.Load(), q.errf.Load())
	<-q.done
	if q.kick != nil {
		q.kick.SetReadDeadline(time.Time{})
	}
	q.active.Wait()
	q.engineIdle()
}

// pause stops a running queue and waits for its requests, keeping its
// workers and indices; resume restarts it, maybe on a new memory table.
// It reports whether it paused the queue.
func (q *queue) pause() bool {
	if q.state != queueRunning {
		return false
	}
	q.halt()
	q.state = queuePaused
	return true
}

func (q *queue) resume(env ringEnv) {
	if q.state != queuePaused {
		return
	}
	if err := q.setupRing(env); err != nil {
		q.fail(fmt.Errorf("ring after memory change: %w", err))
	}
	q.state = queueRunning
	q.runLoop()
}

// stop stops the queue for good (GET_VRING_BASE, reset, disconnect): the
// ring goroutine and workers exit once every request has completed. It
// returns the next avail index.
func (q *queue) stop() uint16 {
	if q.state == queueStopped {
		return q.base
	}
	if q.state == queueRunning {
		q.halt()
	}
	close(q.work)
	q.workers.Wait()
	q.stopEngine()
	q.state = queueStopped
	b := q.availBase()
	q.base, q.baseHi = uint16(b), uint16(b>>16)
	q.inflight, q.resubmit = nil, nil
	// Every request has completed: drop the chain buffers.
	q.pool, q.nbufs = nil, 0
	clear(q.local)
	q.local = q.local[:0]
	return q.base
}

// nudge wakes the ring goroutine so that it looks at its flags again.
func (q *queue) nudge() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
	if q.kick != nil {
		q.kick.SetReadDeadline(time.Now())
	}
}

// fail marks the ring broken after a driver error that concerns the whole
// ring, logs why and signals the error eventfd.
func (q *queue) fail(err error) {
	if q.broken.Swap(true) {
		return
	}
	q.log.Error("virtqueue stopped", "err", err)
	q.errf.Load().signal()
}

// run is the ring goroutine.
func (q *queue) run(done chan struct{}) {
	defer close(done)
	// Guest memory is a shared mapping the front end could truncate: a
	// fault becomes a panic this goroutine recovers from, and a
	// connection error. The recovery touches no shared memory.
	debug.SetPanicOnFault(true)
	defer func() {
		if p := recover(); p != nil {
			q.ringPanicked(p)
			q.waitStop()
		}
	}()
	le.PutUint64(q.one[:], 1)
	q.kvec = unix.Iovec{Base: &q.kbuf[0], Len: uint64(len(q.kbuf))}
	for !q.stopReq.Load() && !q.dev.dead.Load() {
		if q.enabled.Load() && !q.broken.Load() {
			for len(q.resubmit) > 0 && !q.stopReq.Load() && !q.dev.dead.Load() {
				b := q.getBuf()
				if b == nil {
					break
				}
				h := q.resubmit[0]
				q.resubmit = q.resubmit[1:]
				q.admit(h, b)
				q.dispatch(h)
				q.curSet = false
			}
			q.flushEngine()
			if err := q.drain(); err != nil {
				q.fail(err)
			}
		}
		q.waitKick()
	}
}

// ringPanicked handles a panic of the ring goroutine: the device is dead
// and the front end disconnected; the request being dispatched, if the
// panic left it unaccounted, is accounted. Nothing here touches shared
// memory.
func (q *queue) ringPanicked(p any) {
	q.dev.fault(fmt.Errorf("queue %d: ring goroutine: %s", q.index, describePanic(p)))
	if q.curSet {
		q.account(&q.reqs[q.cur])
		q.curSet = false
	}
	if q.held {
		q.held = false
		q.finishing.Add(-1)
	}
}

// admit takes head h, just popped, into flight with chain buffer b.
func (q *queue) admit(h uint16, b *chainBuf) {
	r := &q.reqs[h]
	r.buf = b
	r.chain.segs = b.segs[:0]
	r.blk.acquire(&b.blk)
	r.busy.Store(true)
	r.owed.Store(true)
	q.active.Add(1)
	q.depth.Add(1)
	q.cur, q.curSet = h, true
}

// account ends the accounting of a request that will not complete
// normally (a fault): idempotent with finish.
func (q *queue) account(r *request) {
	if r.owed.Swap(false) {
		q.dev.dropped.Add(1)
		q.putBuf(r, false)
		q.depth.Add(-1)
		q.active.Done()
	}
}

// getBuf returns a chain buffer from the pool, allocating one while fewer
// than maxChainBufs exist, else waiting for a request to complete. It
// returns nil when the queue is asked to stop (or the device died) first.
// The ring goroutine calls it.
func (q *queue) getBuf() *chainBuf {
	if n := len(q.local); n > 0 {
		b := q.local[n-1]
		q.local[n-1] = nil
		q.local = q.local[:n-1]
		return b
	}
	select {
	case b := <-q.pool:
		return b
	default:
	}
	if q.nbufs < maxChainBufs {
		q.nbufs++
		return &chainBuf{}
	}
	// Publish what completed so far before waiting.
	held := q.held
	q.release()
	defer func() {
		if held {
			q.hold()
		}
	}()
	for {
		select {
		case b := <-q.pool:
			return b
		case <-q.wake:
		}
		if q.stopReq.Load() || q.dev.dead.Load() {
			return nil
		}
	}
}

// putBuf returns r's chain buffer to the pool, or with ring set (the
// caller is the ring goroutine) to the ring goroutine's own list: no
// channel operation for a request run to completion.
func (q *queue) putBuf(r *request, ring bool) {
	b := r.buf
	if b == nil {
		return
	}
	r.buf = nil
	b.segs = r.chain.segs[:0]
	r.chain.segs = nil
	r.blk.release(&b.blk)
	if ring {
		q.local = append(q.local, b)
		return
	}
	q.pool <- b // never blocks: at most maxChainBufs exist
}

// waitStop blocks until the connection asks the goroutine to stop.
func (q *queue) waitStop() {
	for !q.stopReq.Load() {
		<-q.wake
	}
}

// waitKick waits for a kick, a nudge, or (without a kick fd) a poll tick.
func (q *queue) waitKick() {
	if q.broken.Load() {
		<-q.wake // until the connection stops the queue
		return
	}
	if q.kick == nil {
		t := time.NewTimer(time.Millisecond)
		select {
		case <-q.wake:
		case <-t.C:
		}
		t.Stop()
		return
	}
	watch := q.ring.eventIdx || q.packed != nil && q.packed.eventIdx
	var armed time.Time
	if watch {
		armed = time.Now()
		// Wake after lostInterruptAfter without a kick to look for
		// completions the driver was never told of. A nudge sends on
		// wake before it moves the deadline: one that came before this
		// deadline was set is seen here, a later one moves it again.
		q.kick.SetReadDeadline(armed.Add(lostInterruptAfter))
		select {
		case <-q.wake:
			q.kick.SetReadDeadline(time.Time{})
			return
		default:
		}
	}
	err := q.readKick()
	if err == nil {
		q.kicks.Add(1)
		return
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// A nudge or the lost-interrupt timer: clear the deadline, then
		// the loop re-reads the flags that were set before the nudge.
		q.kick.SetReadDeadline(time.Time{})
		if watch && time.Since(armed) >= lostInterruptAfter { // not a nudge
			q.renotify()
		}
		return
	}
	q.fail(fmt.Errorf("kick eventfd: %w", err))
}

// lostInterruptAfter is how long a queue waits without a kick before it
// checks whether the driver has consumed every completion it published.
const lostInterruptAfter = time.Second

// renotify signals the call eventfd again when the driver, a second after
// the last kick, still has not consumed every published completion: with
// event idx the driver's used_event is the index of the next completion it
// expects to be told about, so used_event != used idx means it was owed an
// interrupt it did not act on. A guest has been seen waiting forever on
// completions this back end had published and signalled (issue 21; the
// same hang happens with qemu-storage-daemon), so an interrupt can be lost
// between the back end and the guest driver; an extra interrupt is
// harmless (the driver finds nothing new and returns).
func (q *queue) renotify() {
	q.usedMu.Lock()
	pub, event := q.pubAndEvent()
	q.usedMu.Unlock()
	if pub == event || q.broken.Load() {
		q.renotified = false
		return
	}
	if !q.renotified {
		q.log.Warn("driver has not consumed published completions for a second: signalling the queue again",
			"queue", q.index, "used_idx", pub, "used_event", event)
		q.renotified = true
	}
	q.renotifies.Add(1)
	q.dev.exp.renotifies.Add(1)
	q.notify()
}

// readKick reads the kick eventfd's counter, waiting in the poller until
// it is non-zero or the read deadline (a nudge) passes. The read asks for
// RWF_NOWAIT itself instead of relying on O_NONBLOCK, a flag of the file
// description the front end shares and could clear to make the read block
// in the kernel, where no nudge reaches it.
func (q *queue) readKick() error {
	rc, err := q.kick.SyscallConn()
	if err != nil {
		return err
	}
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			// RWF_NOWAIT never blocks: a raw system call, without
			// the scheduler's bookkeeping (nor the wake-up of its
			// monitor thread that a system call may cost).
			rerr = nil
			if _, _, e := unix.RawSyscall6(unix.SYS_PREADV2, fd, uintptr(unsafe.Pointer(&q.kvec)), 1, ^uintptr(0), 0, unix.RWF_NOWAIT); e != 0 {
				rerr = e
			}
			if rerr == unix.EOPNOTSUPP { // kernels before 5.12: eventfd without RWF_NOWAIT
				_, rerr = unix.Read(int(fd), q.kbuf[:])
			}
			if rerr == unix.EAGAIN {
				q.parks.Add(1)
				return false
			}
			if rerr != unix.EINTR {
				return true
			}
		}
	})
	if err != nil {
		return err
	}
	return rerr
}

// drain pops every available chain and dispatches it, then re-arms the
// kick and pops again if the driver added more meanwhile. It looks at the
// stop request between requests.
func (q *queue) drain() error {
	if q.packed != nil {
		return q.drainPacked()
	}
	polled := false
	for !q.stopReq.Load() && !q.dev.dead.Load() {
		n, err := q.ring.pending()
		if err != nil {
			return err
		}
		if n == 0 {
			// Poll before arming the kick: while avail_event lags,
			// the driver does not kick (virtio 1.x 2.7.10).
			if !polled {
				polled = true
				if q.pollDry() {
					continue
				}
			}
			if !q.ring.armKick() {
				return nil
			}
			continue
		}
		polled = false
		// Hold the used index while the batch is dispatched, so that
		// requests completed on the ring goroutine, and workers'
		// completions meanwhile, are published together: one used-index
		// store and at most one call-eventfd write (when event-idx says
		// the driver wants one) per batch, every publishBatch requests
		// and at the end.
		q.hold()
		var bad error
		for i := 0; i < int(n); i++ {
			if q.stopReq.Load() || q.dev.dead.Load() {
				break
			}
			b := q.getBuf()
			if b == nil {
				break
			}
			h := q.ring.availHead(q.ring.lastAvail)
			if h >= q.num {
				bad = fmt.Errorf("available ring entry %d names descriptor %d of %d", q.ring.lastAvail, h, q.num)
			} else if q.reqs[h].busy.Load() {
				bad = fmt.Errorf("available ring entry %d names descriptor %d, which is in flight", q.ring.lastAvail, h)
			}
			if bad != nil {
				q.pool <- b
				break
			}
			q.ring.lastAvail++
			q.admit(h, b)
			if q.inflight != nil {
				q.markPopped(h)
			}
			q.dispatch(h)
			q.curSet = false
			if i%publishBatch == publishBatch-1 && i != int(n)-1 {
				q.release()
				q.hold()
			}
		}
		q.release()
		if bad != nil {
			return bad
		}
	}
	return nil
}

// publishBatch is how many requests a batch dispatches before their used
// elements are published and the driver is notified. 64 covers a whole
// queue depth of 32 or 64 in one publication (16, before, published twice
// per 32 requests, with a second eventfd write whenever the driver had
// caught up meanwhile, and cost about 10% more CPU per request); a
// deeper batch still publishes every 64 so that its first completions are
// not held back long (64 page-cache reads take about 100 µs).
const publishBatch = 64

// monoBase is the origin of mono.
var monoBase = time.Now()

// mono returns monotonic nanoseconds.
func mono() int64 { return int64(time.Since(monoBase)) }

// adaptivePollPerReq is how long a queue with adaptive polling
// (export.adaptive-poll) may poll, once its ring runs dry, for each
// request the ring goroutine completed itself since it last ran dry
// (pollFor): a poll that finds nothing costs at most this much CPU per
// request served, less than the wake-ups it saves when it does find the
// driver's next request (a park and a kick: a kick eventfd write, an
// eventfd read and the return from idle of the ring goroutine's thread,
// several µs of CPU on the two sides together).
const adaptivePollPerReq = int64(time.Microsecond)

// adaptivePollMax bounds one adaptive poll.
const adaptivePollMax = int64(256 * time.Microsecond)

// pollFor returns how long the queue polls its available ring once it
// runs dry, the ring goroutine having completed served requests itself
// since it last ran dry: export.poll-us when set; otherwise, with
// adaptive polling, served × adaptivePollPerReq up to adaptivePollMax; 0
// to arm the kick at once.
//
// Why the poll scales with the requests served, not with how long the
// driver took to come back, as QEMU's IOThreads adapt theirs
// (util/aio-posix.c: grow while the waits stay under poll-max-ns, 32 µs
// by default, drop to 0 after a longer one): on a virtual machine whose
// idle CPUs are slow to wake, a driver with 32 requests in flight comes
// back 16-128 µs after a batch, and the two sides fall into lock-step
// (the ring sleeps while the driver drains and resubmits, the driver
// sleeps while the ring serves), each waiting for the other's wake-up,
// so that the waits themselves stay too long for a wait-based poll to
// start. Polling for as long as the batch was deep lets the ring see the
// driver's first resubmission while the driver is still draining, and
// the two then overlap (docs/PERFORMANCE.md, session 9); a driver that
// sends a request now and then gets a poll of 1 µs per request.
//
// Requests handed to a worker or the I/O engine do not count: their
// completions wake the driver from another goroutine, and a poll
// meanwhile would take the CPU that goroutine and the driver need.
func (q *queue) pollFor(run int64) time.Duration {
	cfg := &q.dev.exp.cfg
	switch {
	case cfg.Poll > 0:
		return cfg.Poll
	case cfg.NoAdaptivePoll:
		return 0
	}
	return time.Duration(min(run*adaptivePollPerReq, adaptivePollMax))
}

// pollDry polls the available ring for pollFor(q.served) and starts a new
// run; it reports whether the driver made a chain available.
func (q *queue) pollDry() bool {
	d := q.pollFor(q.served)
	q.served = 0
	if d <= 0 {
		return false
	}
	q.polls.Add(1)
	start := mono()
	found := q.pollAvail(start + int64(d))
	q.pollSpin.Add(mono() - start)
	return found
}

// pollAvail spins until the driver makes a chain available or mono()
// passes end; it reports whether one is.
func (q *queue) pollAvail(end int64) bool {
	for i := 0; ; i++ {
		if q.availNow() {
			return true
		}
		if i%64 == 63 && (mono() > end || q.stopReq.Load()) {
			return false
		}
	}
}

// availNow reports whether the driver has made a chain available that
// the queue has not popped.
func (q *queue) availNow() bool {
	if q.packed != nil {
		return q.packed.availNow()
	}
	return q.ring.availIdx() != q.ring.lastAvail
}

// markPopped records h as in flight in the inflight region.
func (q *queue) markPopped(h uint16) {
	q.usedMu.Lock()
	defer q.usedMu.Unlock()
	q.inflight.popped(h)
}

// hold keeps finishing above zero: completers put used elements but
// leave publishing to release.
func (q *queue) hold() {
	q.finishing.Add(1)
	q.held = true
}

// release ends a hold; if no completer is between its I/O and the used
// lock, it publishes the used index and notifies the driver.
func (q *queue) release() {
	if !q.held {
		return
	}
	q.flushEngine()
	q.held = false
	if q.finishing.Add(-1) != 0 || q.dev.dead.Load() {
		return
	}
	if q.publish() {
		q.notify()
	}
}

// publish takes the used lock and publishes; it reports whether to notify.
func (q *queue) publish() bool {
	q.usedMu.Lock()
	defer q.usedMu.Unlock()
	return q.publishLocked()
}

// badRequest logs a request failed for what the driver put in it, rate
// limited so that a hostile guest cannot flood the log.
func (q *queue) badRequest(head uint16, err error) {
	if n := q.badLogs.Add(1); n <= 10 || n%1000 == 0 {
		q.log.Warn("bad virtio-blk request", "head", head, "err", err, "count", n)
	}
}

// dispatch parses the chain at head and completes it at once when it is
// bad, unsupported or needs no I/O, or when its I/O completes without
// blocking (try); other I/O goes to a worker.
func (q *queue) dispatch(head uint16) {
	r := &q.reqs[head]
	err := q.walk(head, r)
	r.status = nil
	if err != nil {
		q.badRequest(head, err)
		// Find where the status goes: the chain's last descriptor, or for
		// a chain without one (a loop) the last device-writable byte
		// walked, which the driver offered for writing anyway.
		s, gpa, ok := q.salvage(head)
		if !ok {
			s, gpa, ok = r.chain.lastWritable()
		}
		if ok {
			r.status, r.statusGPA = s, gpa
			q.finishOn(r, virtio.BlkStatusIOErr, 1, true)
		} else {
			q.finishOn(r, 0, 0, true)
		}
		return
	}
	if s, gpa, ok := r.chain.lastWritable(); ok {
		r.status, r.statusGPA = s, gpa
	}
	if r.status == nil {
		// Virtio 1.x 5.2.6: the status byte is the last device-writable
		// byte; without one the request cannot be answered.
		q.badRequest(head, errors.New("no device-writable status byte"))
		q.finishOn(r, 0, 0, true)
		return
	}
	status, usedLen, async := q.h.prepare(q, r)
	if !async {
		q.finishOn(r, status, usedLen, true)
		return
	}
	if q.try(r) || q.async(r) {
		return
	}
	q.submitWork(r)
}

// try runs a prepared request to completion on the ring goroutine when the
// handler can do it without blocking, and reports whether it did;
// otherwise the caller hands r to a worker.
func (q *queue) try(r *request) (done bool) {
	defer func() {
		if p := recover(); p != nil {
			done = true
			q.requestPanicked(r, p)
		}
	}()
	status, usedLen, ok := q.h.tryIO(q, r)
	if !ok {
		return false
	}
	q.finishOn(r, status, usedLen, true)
	return true
}

// submitWork hands r to an idle worker, or starts one, or queues r.
func (q *queue) submitWork(r *request) {
	if q.idle.Add(-1) >= 0 {
		q.work <- r
		return
	}
	if q.nworkers < maxWorkersPerRing {
		q.idle.Add(1)
		q.nworkers++
		q.workers.Add(1)
		go q.worker(r, q.work)
		return
	}
	q.work <- r
}

// worker runs requests until the queue stops.
func (q *queue) worker(r *request, work chan *request) {
	defer q.workers.Done()
	debug.SetPanicOnFault(true)
	for {
		q.execute(r)
		q.idle.Add(1)
		var ok bool
		if r, ok = <-work; !ok {
			return
		}
	}
}

// execute performs r's I/O and completes it. A panic in a target fails the
// request alone; a fault on shared memory is a connection error, and the
// request is accounted without touching that memory again.
func (q *queue) execute(r *request) {
	defer func() {
		if p := recover(); p != nil {
			q.requestPanicked(r, p)
		}
	}()
	status, usedLen := q.h.io(q, r)
	q.finish(r, status, usedLen)
}

// requestPanicked handles a panic while r was performed or completed: a
// fault on shared memory makes the device dead and r is accounted without
// touching that memory again; any other panic (a target's bug) fails r
// alone.
func (q *queue) requestPanicked(r *request, p any) {
	if isFault(p) {
		q.dev.fault(fmt.Errorf("queue %d: request %d: %s", q.index, r.chain.head, describePanic(p)))
		q.account(r)
		return
	}
	q.log.Error("request panicked", "head", r.chain.head, "panic", p)
	q.finishSafe(r, virtio.BlkStatusIOErr, 1)
}

// finishSafe is finish for recovery paths: a fault while completing
// makes the device dead instead of escaping.
func (q *queue) finishSafe(r *request, status byte, usedLen uint32) {
	defer func() {
		if p := recover(); p != nil {
			q.dev.fault(fmt.Errorf("queue %d: completing request %d: %s", q.index, r.chain.head, describePanic(p)))
			q.account(r)
		}
	}()
	q.finish(r, status, usedLen)
}

// finish writes the status, puts the used element and, for the last of a
// burst of completers, publishes the used index and notifies the driver
// once for the whole batch. Once the device is dead it only accounts r.
// A fault on shared memory escapes as a panic after r is accounted; no
// lock stays held.
func (q *queue) finish(r *request, status byte, usedLen uint32) {
	q.finishOn(r, status, usedLen, false)
}

// finishOn is finish; ring says that the caller is the ring goroutine.
func (q *queue) finishOn(r *request, status byte, usedLen uint32, ring bool) {
	if !r.owed.Swap(false) {
		return // accounted already after a fault
	}
	if ring {
		q.served++
	}
	q.depth.Add(-1) // before the driver can see the completion
	defer q.active.Done()
	// The buffer goes back before the head can be popped again.
	q.putBuf(r, ring)
	if q.dev.dead.Load() {
		q.dev.dropped.Add(1)
		r.busy.Store(false)
		return
	}
	if r.status != nil {
		r.status[0] = status
		q.dlog.mark(r.statusGPA, 1)
	}
	q.finishing.Add(1)
	if q.putUsed(r, usedLen) {
		q.notify()
	}
}

// putUsed puts r's used element under the used lock and, if no other
// completer is on its way, publishes; it reports whether to notify.
func (q *queue) putUsed(r *request, usedLen uint32) bool {
	head := r.chain.head
	q.usedMu.Lock()
	defer q.usedMu.Unlock()
	if q.packed != nil {
		q.putUsedPacked(head, usedLen)
	} else if off := q.ring.putUsed(head, usedLen); q.logUsed {
		q.dlog.mark(q.addr.Log+uint64(off), 8)
	}
	if q.inflight != nil {
		q.inflight.link(head)
		q.batch = append(q.batch, head)
	}
	r.busy.Store(false)
	if q.finishing.Add(-1) == 0 {
		return q.publishLocked()
	}
	return false
}

// publishLocked publishes the used elements put so far and reports
// whether the driver wants a notification; usedMu is held.
func (q *queue) publishLocked() bool {
	if q.packed != nil {
		return q.packed.publish()
	}
	notify := q.ring.publish()
	if q.logUsed {
		q.dlog.mark(q.addr.Log+2, 2)
	}
	if q.inflight != nil {
		q.inflight.pushed(q.batch, q.ring.usedIdx)
		q.batch = q.batch[:0]
	}
	return notify
}

// notify signals the call eventfd.
func (q *queue) notify() {
	q.notified.Add(1)
	q.call.Load().signal()
}
