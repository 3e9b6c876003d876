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

	"github.com/vhostdm/vhostdm/mapper"
	"golang.org/x/sys/unix"
)

// Virtio-blk request types (virtio 1.x, 5.2.6).
const (
	BlkTypeIn          = 0
	BlkTypeOut         = 1
	BlkTypeFlush       = 4
	BlkTypeGetID       = 8
	BlkTypeGetLifetime = 10
	BlkTypeDiscard     = 11
	BlkTypeWriteZeroes = 13
	BlkTypeSecureErase = 14
)

// Virtio-blk request status values.
const (
	BlkStatusOK     = 0
	BlkStatusIOErr  = 1
	BlkStatusUnsupp = 2
)

// Virtio-blk layouts.
const (
	blkHeaderSize   = 16 // le32 type, le32 reserved, le64 sector
	blkDiscardSize  = 16 // le64 sector, le32 num_sectors, le32 flags
	blkDiscardUnmap = 1  // VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
	// ConfigSpaceSize is the size of struct virtio_blk_config.
	ConfigSpaceSize = 96
)

// Limits this device advertises in its config space.
const (
	blkSizeMax        = 1 << 20 // size_max: bytes per segment
	blkSegMax         = 126     // seg_max: data segments per request (QEMU's 128-entry queue minus 2)
	blkMaxDiscard     = 32768   // max_discard_sectors, as QEMU's VIRTIO_BLK_MAX_DISCARD_SECTORS
	blkMaxDiscardSeg  = 16      // max_discard_seg
	blkMaxZeroes      = 32768   // max_write_zeroes_sectors
	blkMaxZeroesSeg   = 16      // max_write_zeroes_seg
	maxWorkersPerRing = 256
)

// blkFeatures returns the virtio and vhost feature bits the export offers.
func (e *Export) blkFeatures() uint64 {
	f := uint64(FeatureVersion1 | FeatureEventIdx | FeatureIndirectDesc | FeatureLogAll | FeatureProtocolFeatures |
		BlkFeatureSizeMax | BlkFeatureSegMax | BlkFeatureBlkSize | BlkFeatureTopology | BlkFeatureFlush |
		BlkFeatureConfigWCE | BlkFeatureMQ)
	if e.readOnly {
		f |= BlkFeatureRO
	} else {
		if e.discard.Load() {
			f |= BlkFeatureDiscard
		}
		if e.zeroes.Load() {
			f |= BlkFeatureWriteZeroes
		}
	}
	return f
}

// blkDev is the virtio-blk device of one connection: its queues and its
// writable config. It never sees the socket.
type blkDev struct {
	exp       *Export
	log       *slog.Logger
	queues    []*blkQueue
	writeback atomic.Bool // config writeback (CONFIG_WCE); true: writeback cache
	features  atomic.Uint64

	// dead is set when a goroutine faulted on memory the front end shares
	// (guest memory, the dirty log): from then on nothing touches that
	// memory again, requests still in flight complete without a used
	// element (dropped counts them), and onFault disconnects the front end.
	dead    atomic.Bool
	dropped atomic.Uint64
	onFault func(err error)

	nowait NowaitDevice // the device's non-blocking submit, if it has one
}

// fault makes the device dead after a fault on shared memory (or a panic
// on a goroutine that walks the rings) and disconnects the front end.
func (d *blkDev) fault(err error) {
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

func newBlkDev(e *Export, log *slog.Logger) *blkDev {
	d := &blkDev{exp: e, log: log}
	d.nowait, _ = e.dev.(NowaitDevice)
	d.writeback.Store(true)
	for i := range e.cfg.NumQueues {
		d.queues = append(d.queues, &blkQueue{dev: d, index: i, log: log.With("queue", i)})
	}
	return d
}

// config returns struct virtio_blk_config (virtio 1.x, 5.2.4).
func (d *blkDev) config() [ConfigSpaceSize]byte {
	var c [ConfigSpaceSize]byte
	lbs := d.exp.cfg.LogicalBlockSize
	le.PutUint64(c[0:], d.exp.capacity())
	le.PutUint32(c[8:], blkSizeMax)
	le.PutUint32(c[12:], blkSegMax)
	le.PutUint32(c[20:], lbs)
	c[24] = 0               // physical_block_exp
	c[25] = 0               // alignment_offset
	le.PutUint16(c[26:], 1) // min_io_size, in logical blocks
	le.PutUint32(c[28:], 0) // opt_io_size: not reported
	// writeback: the cache mode, read before features are negotiated
	// (QEMU caches the config at realize); without FLUSH the device still
	// writes through (writebackOn).
	if d.writeback.Load() {
		c[32] = 1
	}
	le.PutUint16(c[34:], uint16(d.exp.cfg.NumQueues))
	le.PutUint32(c[36:], blkMaxDiscard)
	le.PutUint32(c[40:], blkMaxDiscardSeg)
	le.PutUint32(c[44:], lbs/mapper.SectorSize)
	le.PutUint32(c[48:], blkMaxZeroes)
	le.PutUint32(c[52:], blkMaxZeroesSeg)
	c[56] = 1 // write_zeroes_may_unmap
	return c
}

// writebackOn reports whether the device caches writes. Virtio 1.x 5.2.5.1:
// without VIRTIO_BLK_F_FLUSH the device must be writethrough.
func (d *blkDev) writebackOn() bool {
	return d.writeback.Load() && d.features.Load()&BlkFeatureFlush != 0
}

// blkQueue is one virtqueue of the device and the goroutines that serve it:
// the ring goroutine pops chains and hands requests to workers, which submit
// them to the mapper device and complete them out of order, batching
// used-ring updates and notifications.
type blkQueue struct {
	dev   *blkDev
	index int
	log   *slog.Logger

	// Set by the connection goroutine while the queue is stopped or paused.
	num      uint16
	addr     VringAddr
	addrSet  bool
	base     uint16
	ring     splitRing
	mem      *Mem
	dlog     *dirtyLog // non-nil while VHOST_F_LOG_ALL is on
	logUsed  bool      // VHOST_VRING_F_LOG: log used-ring writes at addr.Log
	inflight *inflightQueue
	resubmit []uint16
	kick     *os.File // nil: poll (SET_VRING_KICK with the no-fd bit)
	kickSet  bool
	state    queueState
	done     chan struct{} // closed when the ring goroutine exits
	work     chan *blkReq
	reqs     []blkReq // by head descriptor index
	nworkers int
	ioq      *mapper.IOQueue // the io_uring engine, nil: workers only (nowait.go)
	engMu    sync.Mutex      // held by the engine's completion goroutine during a batch
	// pool holds the chain buffers (translated segments, data slices) of
	// the requests in flight: at most maxChainBufs per queue, reused, so
	// that the queue's memory does not depend on the chains' shape.
	pool   chan *chainBuf
	nbufs  int
	cur    uint16 // head being dispatched by the ring goroutine, if curSet
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
	notified   atomic.Uint64 // call eventfd writes

	// Owned by the ring goroutine.
	held       bool // the ring goroutine holds finishing for a batch
	renotified bool // renotify has warned for the current stall

	// Used side, guarded by usedMu.
	usedMu sync.Mutex
	// finishing counts completers between their I/O and the used lock,
	// plus one while the ring goroutine runs a batch: whoever brings it to
	// zero publishes the used index and notifies for everyone.
	finishing atomic.Int32
	batch     []uint16
	one       [8]byte
	kbuf      [8]byte
	kiov      [1][]byte // kbuf, for preadv2
}

type queueState int

const (
	queueStopped queueState = iota
	queueRunning
	queuePaused
)

// blkReq is one request in flight, kept per head descriptor index so that
// the hot path does not allocate.
type blkReq struct {
	busy      atomic.Bool // popped and not yet in the used ring
	owed      atomic.Bool // counted in active and depth
	buf       *chainBuf   // from the queue's pool while in flight
	chain     chain
	typ       uint32
	sector    uint64
	status    []byte
	statusGPA uint64
	data      [][]byte
	dataLen   uint64
	nranges   int
	mreq      mapper.Request
}

// chainBuf is the reusable memory of one request in flight: its chain's
// translated segments and the data slices handed to the mapper.
type chainBuf struct {
	segs   []seg
	data   [][]byte
	ranges [blkMaxDiscardSeg]blkRange
}

// maxChainBufs bounds the requests a queue has popped and not completed:
// each holds a chainBuf of up to maxSegments segments (40 B) and data
// slices (24 B), 64 KiB at most, so a queue's chain memory stays under
// maxChainBufs * 64 KiB (16 MiB) whatever the chains look like
// (docs/REFERENCE.md, "Limits"). It matches the worker pool.
const maxChainBufs = maxWorkersPerRing

type blkRange struct {
	sector  uint64
	sectors uint32
	flags   uint32
}

// configured reports whether the queue has what it needs to start.
func (q *blkQueue) configured() error {
	switch {
	case q.num == 0:
		return errors.New("no SET_VRING_NUM")
	case !q.addrSet:
		return errors.New("no SET_VRING_ADDR")
	case !q.kickSet:
		return errors.New("no SET_VRING_KICK")
	}
	return nil
}

// setupRing translates the ring through mem and applies the negotiated
// features; the queue is stopped or paused.
func (q *blkQueue) setupRing(mem *Mem, features uint64, dlog *dirtyLog) error {
	if mem == nil {
		return errors.New("no guest memory table")
	}
	if _, err := q.ring.setup(mem, q.num, q.addr); err != nil {
		return err
	}
	q.mem = mem
	q.ring.eventIdx = features&FeatureEventIdx != 0
	q.ring.indirect = features&FeatureIndirectDesc != 0
	q.dlog = nil
	if features&FeatureLogAll != 0 {
		q.dlog = dlog
	}
	q.logUsed = q.dlog != nil && q.addr.Flags&VringAddrFlagLog != 0
	return nil
}

// start starts a stopped queue: it sets up the ring, recovers in-flight
// requests from the inflight region if there is one, and starts the ring
// goroutine.
func (q *blkQueue) start(mem *Mem, features uint64, dlog *dirtyLog, inf *inflightRegion) error {
	if err := q.setupRing(mem, features, dlog); err != nil {
		return err
	}
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
	if len(q.reqs) != int(q.num) {
		q.reqs = make([]blkReq, q.num)
	}
	for i := range q.reqs {
		q.reqs[i].busy.Store(false)
		q.reqs[i].owed.Store(false)
	}
	q.pool = make(chan *chainBuf, maxChainBufs)
	q.nbufs = 0
	q.curSet = false
	q.work = make(chan *blkReq, q.num)
	q.nworkers = 0
	q.finishing.Store(0)
	q.held = false
	q.idle.Store(0)
	q.broken.Store(false)
	q.wake = make(chan struct{}, 1)
	q.startEngine()
	q.state = queueRunning
	q.runLoop()
	return nil
}

// runLoop starts the ring goroutine.
func (q *blkQueue) runLoop() {
	q.stopReq.Store(false)
	q.done = make(chan struct{})
	go q.run(q.done)
}

// halt stops the ring goroutine and waits for the requests in flight.
func (q *blkQueue) halt() {
	q.stopReq.Store(true)
	q.nudge()
	<-q.done
	if q.kick != nil {
		q.kick.SetReadDeadline(time.Time{})
	}
	q.active.Wait()
	q.engineIdle()
}

// pause stops a running queue and waits for its requests, keeping its
// workers and indices; resume restarts it, maybe on a new memory table.
func (q *blkQueue) pause() {
	if q.state != queueRunning {
		return
	}
	q.halt()
	q.state = queuePaused
}

func (q *blkQueue) resume(mem *Mem, features uint64, dlog *dirtyLog) {
	if q.state != queuePaused {
		return
	}
	if err := q.setupRing(mem, features, dlog); err != nil {
		q.fail(fmt.Errorf("ring after memory change: %w", err))
	}
	q.state = queueRunning
	q.runLoop()
}

// stop stops the queue for good (GET_VRING_BASE, reset, disconnect): the
// ring goroutine and workers exit once every request has completed. It
// returns the next avail index.
func (q *blkQueue) stop() uint16 {
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
	q.base = q.ring.lastAvail
	q.inflight, q.resubmit = nil, nil
	// Every request has completed: drop the chain buffers.
	q.pool, q.nbufs = nil, 0
	return q.base
}

// nudge wakes the ring goroutine so that it looks at its flags again.
func (q *blkQueue) nudge() {
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
func (q *blkQueue) fail(err error) {
	if q.broken.Swap(true) {
		return
	}
	q.log.Error("virtqueue stopped", "err", err)
	q.errf.Load().signal()
}

// run is the ring goroutine.
func (q *blkQueue) run(done chan struct{}) {
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
	q.kiov[0] = q.kbuf[:]
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
func (q *blkQueue) ringPanicked(p any) {
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
func (q *blkQueue) admit(h uint16, b *chainBuf) {
	r := &q.reqs[h]
	r.buf = b
	r.chain.segs = b.segs[:0]
	r.data = b.data[:0]
	r.busy.Store(true)
	r.owed.Store(true)
	q.active.Add(1)
	q.depth.Add(1)
	q.cur, q.curSet = h, true
}

// account ends the accounting of a request that will not complete
// normally (a fault): idempotent with finish.
func (q *blkQueue) account(r *blkReq) {
	if r.owed.Swap(false) {
		q.dev.dropped.Add(1)
		q.putBuf(r)
		q.depth.Add(-1)
		q.active.Done()
	}
}

// getBuf returns a chain buffer from the pool, allocating one while fewer
// than maxChainBufs exist, else waiting for a request to complete. It
// returns nil when the queue is asked to stop (or the device died) first.
// The ring goroutine calls it.
func (q *blkQueue) getBuf() *chainBuf {
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

// putBuf returns r's chain buffer to the pool.
func (q *blkQueue) putBuf(r *blkReq) {
	b := r.buf
	if b == nil {
		return
	}
	r.buf = nil
	b.segs, b.data = r.chain.segs[:0], r.data[:0]
	r.chain.segs, r.data = nil, nil
	r.mreq.Data = nil
	q.pool <- b // never blocks: at most maxChainBufs exist
}

// waitStop blocks until the connection asks the goroutine to stop.
func (q *blkQueue) waitStop() {
	for !q.stopReq.Load() {
		<-q.wake
	}
}

// waitKick waits for a kick, a nudge, or (without a kick fd) a poll tick.
func (q *blkQueue) waitKick() {
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
	watch := q.ring.eventIdx
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
func (q *blkQueue) renotify() {
	q.usedMu.Lock()
	pub, event := q.ring.pubIdx, q.ring.usedEvent()
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
func (q *blkQueue) readKick() error {
	rc, err := q.kick.SyscallConn()
	if err != nil {
		return err
	}
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			_, rerr = unix.Preadv2(int(fd), q.kiov[:], -1, unix.RWF_NOWAIT)
			if rerr == unix.EOPNOTSUPP { // kernels before 5.12: eventfd without RWF_NOWAIT
				_, rerr = unix.Read(int(fd), q.kbuf[:])
			}
			if rerr != unix.EINTR {
				return rerr != unix.EAGAIN
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
func (q *blkQueue) drain() error {
	poll := q.dev.exp.cfg.Poll
	polled := false
	for !q.stopReq.Load() && !q.dev.dead.Load() {
		n, err := q.ring.pending()
		if err != nil {
			return err
		}
		if n == 0 {
			// Busy-poll before arming the kick: while avail_event lags,
			// the driver does not kick (virtio 1.x 2.7.10).
			if poll > 0 && !polled {
				polled = true
				if q.pollAvail(poll) {
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

// pollAvail spins for up to d waiting for the driver to make a chain
// available; it reports whether one is.
func (q *blkQueue) pollAvail(d time.Duration) bool {
	end := mono() + int64(d)
	for i := 0; ; i++ {
		if q.ring.availIdx() != q.ring.lastAvail {
			return true
		}
		if i%64 == 63 && (mono() > end || q.stopReq.Load()) {
			return false
		}
	}
}

// markPopped records h as in flight in the inflight region.
func (q *blkQueue) markPopped(h uint16) {
	q.usedMu.Lock()
	defer q.usedMu.Unlock()
	q.inflight.popped(h)
}

// hold keeps finishing above zero: completers put used elements but
// leave publishing to release.
func (q *blkQueue) hold() {
	q.finishing.Add(1)
	q.held = true
}

// release ends a hold; if no completer is between its I/O and the used
// lock, it publishes the used index and notifies the driver.
func (q *blkQueue) release() {
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
func (q *blkQueue) publish() bool {
	q.usedMu.Lock()
	defer q.usedMu.Unlock()
	return q.publishLocked()
}

// badRequest logs a request failed for what the driver put in it, rate
// limited so that a hostile guest cannot flood the log.
func (q *blkQueue) badRequest(head uint16, err error) {
	if n := q.badLogs.Add(1); n <= 10 || n%1000 == 0 {
		q.log.Warn("bad virtio-blk request", "head", head, "err", err, "count", n)
	}
}

// dispatch parses the chain at head and completes it at once when it is
// bad, unsupported or needs no I/O, or when its I/O completes without
// blocking (try); other I/O goes to a worker.
func (q *blkQueue) dispatch(head uint16) {
	r := &q.reqs[head]
	err := walkChain(q.mem, q.ring.desc, q.num, head, q.ring.indirect, &r.chain)
	r.status = nil
	if err != nil {
		q.badRequest(head, err)
		// Find where the status goes: the chain's last descriptor, or for
		// a chain without one (a loop) the last device-writable byte
		// walked, which the driver offered for writing anyway.
		s, gpa, ok := salvageStatus(q.mem, q.ring.desc, q.num, head, q.ring.indirect)
		if !ok {
			s, gpa, ok = r.chain.lastWritable()
		}
		if ok {
			r.status, r.statusGPA = s, gpa
			q.finish(r, BlkStatusIOErr, 1)
		} else {
			q.finish(r, 0, 0)
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
		q.finish(r, 0, 0)
		return
	}
	status, usedLen, async := q.prepare(r)
	if !async {
		q.finish(r, status, usedLen)
		return
	}
	if q.try(r) || q.async(r) {
		return
	}
	q.submitWork(r)
}

// submitWork hands r to an idle worker, or starts one, or queues r.
func (q *blkQueue) submitWork(r *blkReq) {
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
func (q *blkQueue) worker(r *blkReq, work chan *blkReq) {
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
func (q *blkQueue) execute(r *blkReq) {
	defer func() {
		if p := recover(); p != nil {
			q.requestPanicked(r, p)
		}
	}()
	status, usedLen := q.io(r)
	q.finish(r, status, usedLen)
}

// requestPanicked handles a panic while r was performed or completed: a
// fault on shared memory makes the device dead and r is accounted without
// touching that memory again; any other panic (a target's bug) fails r
// alone.
func (q *blkQueue) requestPanicked(r *blkReq, p any) {
	if isFault(p) {
		q.dev.fault(fmt.Errorf("queue %d: request %d: %s", q.index, r.chain.head, describePanic(p)))
		q.account(r)
		return
	}
	q.log.Error("request panicked", "head", r.chain.head, "panic", p)
	q.finishSafe(r, BlkStatusIOErr, 1)
}

// finishSafe is finish for recovery paths: a fault while completing
// makes the device dead instead of escaping.
func (q *blkQueue) finishSafe(r *blkReq, status byte, usedLen uint32) {
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
func (q *blkQueue) finish(r *blkReq, status byte, usedLen uint32) {
	if !r.owed.Swap(false) {
		return // accounted already after a fault
	}
	q.depth.Add(-1) // before the driver can see the completion
	defer q.active.Done()
	// The buffer goes back before the head can be popped again.
	q.putBuf(r)
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
func (q *blkQueue) putUsed(r *blkReq, usedLen uint32) bool {
	head := r.chain.head
	q.usedMu.Lock()
	defer q.usedMu.Unlock()
	off := q.ring.putUsed(head, usedLen)
	if q.logUsed {
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
func (q *blkQueue) publishLocked() bool {
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
func (q *blkQueue) notify() {
	q.notified.Add(1)
	q.call.Load().signal()
}

// prepare parses and checks the request header and layout. It returns
// async=true when the request needs I/O, else the status to complete with.
func (q *blkQueue) prepare(r *blkReq) (status byte, usedLen uint32, async bool) {
	c := &r.chain
	// Virtio 1.x 5.2.6: the driver-readable header is 16 bytes; it may
	// span descriptors.
	var hdr [blkHeaderSize]byte
	if c.rBytes < blkHeaderSize {
		q.badRequest(c.head, fmt.Errorf("request header of %d bytes, want %d", c.rBytes, blkHeaderSize))
		return BlkStatusIOErr, 1, false
	}
	copyFromSegs(hdr[:], c.segs[:c.nRead], 0)
	r.typ = le.Uint32(hdr[0:])
	r.sector = le.Uint64(hdr[8:])
	e := q.dev.exp
	ro := e.readOnly
	switch r.typ {
	case BlkTypeIn:
		r.dataLen = c.wBytes - 1
		r.data = appendBufs(r.data[:0], c.segs[c.nRead:], 0, r.dataLen)
		if err := q.checkRange(r.sector, r.dataLen); err != nil {
			q.badRequest(c.head, err)
			return BlkStatusIOErr, 1, false
		}
		if r.dataLen == 0 {
			return BlkStatusOK, 1, false
		}
		r.mreq = mapper.Request{Op: mapper.OpRead, Sector: r.sector, Sectors: r.dataLen >> mapper.SectorShift, Data: r.data}
		return 0, 0, true
	case BlkTypeOut:
		if ro {
			return BlkStatusIOErr, 1, false
		}
		r.dataLen = c.rBytes - blkHeaderSize
		r.data = appendBufs(r.data[:0], c.segs[:c.nRead], blkHeaderSize, r.dataLen)
		if err := q.checkRange(r.sector, r.dataLen); err != nil {
			q.badRequest(c.head, err)
			return BlkStatusIOErr, 1, false
		}
		if r.dataLen == 0 {
			return BlkStatusOK, 1, false
		}
		r.mreq = mapper.Request{Op: mapper.OpWrite, Sector: r.sector, Sectors: r.dataLen >> mapper.SectorShift, Data: r.data}
		return 0, 0, true
	case BlkTypeFlush:
		r.mreq = mapper.Request{Op: mapper.OpFlush}
		return 0, 0, true
	case BlkTypeGetID:
		// 5.2.6.1: "the device MUST write ... the device ID string
		// (up to 20 bytes, NUL-padded if shorter)".
		var id [MaxSerialLen]byte
		copy(id[:], e.cfg.Serial)
		n := min(c.wBytes-1, MaxSerialLen)
		bufs := appendBufs(r.data[:0], c.segs[c.nRead:], 0, n)
		off := 0
		for _, b := range bufs {
			off += copy(b, id[off:])
		}
		r.data = bufs
		for _, s := range c.segs[c.nRead:] {
			q.dlog.mark(s.gpa, uint64(len(s.b)))
		}
		return BlkStatusOK, uint32(n) + 1, false
	case BlkTypeDiscard, BlkTypeWriteZeroes:
		if ro {
			return BlkStatusIOErr, 1, false
		}
		// 5.2.6.2: an operation the device does not serve (any more:
		// the table was reloaded) is UNSUPP, not IOERR.
		if (r.typ == BlkTypeDiscard && !e.discard.Load()) || (r.typ == BlkTypeWriteZeroes && !e.zeroes.Load()) {
			return BlkStatusUnsupp, 1, false
		}
		st, err := q.parseRanges(r)
		if err != nil {
			q.badRequest(c.head, err)
			return st, 1, false
		}
		return 0, 0, true
	}
	return BlkStatusUnsupp, 1, false
}

// checkRange checks a read or write of n bytes at sector: aligned to the
// logical block size and inside the capacity (QEMU's
// virtio_blk_sect_range_ok does the same checks).
func (q *blkQueue) checkRange(sector, n uint64) error {
	lbs := uint64(q.dev.exp.cfg.LogicalBlockSize)
	per := lbs / mapper.SectorSize
	if n%lbs != 0 {
		return fmt.Errorf("data of %d bytes is not a multiple of the block size %d", n, lbs)
	}
	if sector%per != 0 {
		return fmt.Errorf("sector %d is not aligned to the block size %d", sector, lbs)
	}
	cap := q.dev.exp.capacity()
	sectors := n >> mapper.SectorShift
	if sector > cap || sectors > cap-sector {
		return fmt.Errorf("%d sectors at %d beyond capacity %d", sectors, sector, cap)
	}
	return nil
}

// parseRanges reads the discard or write-zeroes segments after the header
// (virtio 1.x 5.2.6: struct virtio_blk_discard_write_zeroes).
func (q *blkQueue) parseRanges(r *blkReq) (byte, error) {
	c := &r.chain
	n := c.rBytes - blkHeaderSize
	maxSeg, maxSectors := uint64(blkMaxDiscardSeg), uint64(blkMaxDiscard)
	if r.typ == BlkTypeWriteZeroes {
		maxSeg, maxSectors = blkMaxZeroesSeg, blkMaxZeroes
	}
	if n == 0 || n%blkDiscardSize != 0 || n/blkDiscardSize > maxSeg {
		return BlkStatusIOErr, fmt.Errorf("%d bytes of segments, want 1 to %d segments of %d", n, maxSeg, blkDiscardSize)
	}
	r.nranges = int(n / blkDiscardSize)
	lbs := uint64(q.dev.exp.cfg.LogicalBlockSize)
	per := lbs / mapper.SectorSize
	cap := q.dev.exp.capacity()
	var b [blkDiscardSize]byte
	for i := 0; i < r.nranges; i++ {
		copyFromSegs(b[:], c.segs[:c.nRead], blkHeaderSize+uint64(i)*blkDiscardSize)
		rg := blkRange{sector: le.Uint64(b[0:]), sectors: le.Uint32(b[8:]), flags: le.Uint32(b[12:])}
		// 5.2.6.2: "the device MUST set the status byte to
		// VIRTIO_BLK_S_UNSUPP for discard commands if the unmap flag is
		// set" and for unknown flags.
		if rg.flags&^blkDiscardUnmap != 0 || (r.typ == BlkTypeDiscard && rg.flags != 0) {
			return BlkStatusUnsupp, fmt.Errorf("segment %d: unsupported flags %#x", i, rg.flags)
		}
		if rg.sectors == 0 || uint64(rg.sectors) > maxSectors {
			return BlkStatusIOErr, fmt.Errorf("segment %d: %d sectors, want 1 to %d", i, rg.sectors, maxSectors)
		}
		if rg.sector%per != 0 || uint64(rg.sectors)%per != 0 {
			return BlkStatusIOErr, fmt.Errorf("segment %d: %d sectors at %d not aligned to the block size %d", i, rg.sectors, rg.sector, lbs)
		}
		if rg.sector > cap || uint64(rg.sectors) > cap-rg.sector {
			return BlkStatusIOErr, fmt.Errorf("segment %d: %d sectors at %d beyond capacity %d", i, rg.sectors, rg.sector, cap)
		}
		r.buf.ranges[i] = rg
	}
	return BlkStatusOK, nil
}

// io performs the I/O of a prepared request on a worker goroutine.
func (q *blkQueue) io(r *blkReq) (status byte, usedLen uint32) {
	d := q.dev
	dev := d.exp.dev
	var err error
	switch r.typ {
	case BlkTypeIn:
		err = dev.Submit(&r.mreq)
	case BlkTypeOut:
		err = dev.Submit(&r.mreq)
		if err == nil && !d.writebackOn() {
			// Writethrough: the write is durable before completion.
			r.mreq = mapper.Request{Op: mapper.OpFlush}
			err = dev.Submit(&r.mreq)
		}
	case BlkTypeFlush:
		err = dev.Submit(&r.mreq)
	case BlkTypeDiscard, BlkTypeWriteZeroes:
		for i := 0; i < r.nranges && err == nil; i++ {
			rg := r.buf.ranges[i]
			r.mreq = mapper.Request{Op: mapper.OpDiscard, Sector: rg.sector, Sectors: uint64(rg.sectors)}
			if r.typ == BlkTypeWriteZeroes {
				r.mreq.Op = mapper.OpWriteZeroes
				r.mreq.Unmap = rg.flags&blkDiscardUnmap != 0
			}
			err = dev.Submit(&r.mreq)
		}
		if err == nil && r.typ == BlkTypeWriteZeroes && !d.writebackOn() {
			r.mreq = mapper.Request{Op: mapper.OpFlush}
			err = dev.Submit(&r.mreq)
		}
	default:
		return BlkStatusUnsupp, 1
	}
	return q.result(r, err)
}

// result turns the outcome of r's I/O into its status and used length;
// a read's data is marked in the dirty log.
func (q *blkQueue) result(r *blkReq, err error) (status byte, usedLen uint32) {
	usedLen = 1
	if r.typ == BlkTypeIn {
		if err == nil && q.dlog != nil {
			for _, s := range r.chain.segs[r.chain.nRead:] {
				q.dlog.mark(s.gpa, uint64(len(s.b)))
			}
		}
		usedLen = uint32(min(r.dataLen+1, uint64(^uint32(0))))
	}
	r.mreq.Data = nil
	if err != nil {
		if errors.Is(err, mapper.ErrUnsupported) {
			return BlkStatusUnsupp, usedLen
		}
		if n := q.badLogs.Add(1); n <= 10 || n%1000 == 0 {
			q.log.Warn("virtio-blk request failed", "head", r.chain.head, "type", r.typ, "sector", r.sector, "err", err)
		}
		return BlkStatusIOErr, usedLen
	}
	return BlkStatusOK, usedLen
}

// copyFromSegs copies bytes starting at offset off of the concatenated
// segments into dst; the caller checked that they are long enough.
func copyFromSegs(dst []byte, segs []seg, off uint64) {
	for _, s := range segs {
		if len(dst) == 0 {
			return
		}
		if off >= uint64(len(s.b)) {
			off -= uint64(len(s.b))
			continue
		}
		n := copy(dst, s.b[off:])
		dst = dst[n:]
		off = 0
	}
}

// appendBufs appends to dst the n bytes at offset off of the concatenated
// segments, as slices of guest memory (no copy).
func appendBufs(dst [][]byte, segs []seg, off, n uint64) [][]byte {
	for _, s := range segs {
		if n == 0 {
			break
		}
		if off >= uint64(len(s.b)) {
			off -= uint64(len(s.b))
			continue
		}
		b := s.b[off:]
		off = 0
		if uint64(len(b)) > n {
			b = b[:n]
		}
		dst = append(dst, b)
		n -= uint64(len(b))
	}
	return dst
}
