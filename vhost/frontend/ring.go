package frontend

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// Header is a vhost-user message header (RawRequest, RawConn).
type Header = wire.Header

// Desc is a split-ring descriptor (SubmitChain).
type Desc = virtio.Desc

// Descriptor flags (SubmitChain).
const (
	DescFlagNext     = virtio.DescFlagNext
	DescFlagWrite    = virtio.DescFlagWrite
	DescFlagIndirect = virtio.DescFlagIndirect
)

const (
	slotSize      = 4096 // per head descriptor: header, status, segments, indirect table
	slotStatusOff = 16
	slotRangesOff = 32
	slotTableOff  = 512
	maxSlotTable  = (slotSize - slotTableOff) / virtio.DescSize
	pageSize      = 4096
)

// clientQueue is the driver side of one virtqueue.
type clientQueue struct {
	c      *Client
	idx    int
	num    uint16
	desc   []byte
	avail  []byte
	used   []byte
	dGPA   uint64
	aGPA   uint64
	uGPA   uint64
	slots  []byte
	sGPA   uint64
	kickFD int // -1 once released; written under kickMu (a kick may race Close)
	call   *os.File
	callFD int // call's fd, closed only through call
	done   chan struct{}
	fence  uint32
	kickMu sync.RWMutex // kicks (read) against the close of kickFD (write)

	mu          sync.Mutex // submission side and pend
	free        []uint16
	pend        []clientPending
	availIdx    uint16
	kickedIdx   uint16
	deferKick   bool
	kickPending bool
	eventIdx    atomic.Bool // set by setupQueue under mu, read by the completion goroutine too
	space       chan struct{}
	base        uint16 // next SET_VRING_BASE; valid if baseSet
	baseSet     bool

	pk       *packedDriver // non-nil: packed ring (packed.go)
	dead     bool          // the client is closed; guarded by mu
	lastUsed uint16        // completion goroutine only
	strays   atomic.Uint64
}

type clientPending struct {
	inUse bool
	raw   bool
	descs []uint16
	slots uint16 // ring slots taken (packed)
	done  func(Result)
}

// setupQueue sends the vring messages of one queue in QEMU's order.
func (c *Client) setupQueue(q *clientQueue) error {
	i := uint32(q.idx)
	q.mu.Lock()
	q.eventIdx.Store(c.features&virtio.FeatureEventIdx != 0)
	if c.features&virtio.FeatureRingPacked != 0 && q.pk == nil {
		q.pk = newPackedDriver(q.num)
	}
	base := uint32(q.base)
	if q.pk != nil {
		// A packed ring has no index in guest memory: after a back end
		// went away without GET_VRING_BASE, QEMU sends the base it has,
		// and a back end with the inflight region knows better.
		base = q.pk.base
	} else if !q.baseSet {
		// After a back end went away without GET_VRING_BASE, QEMU restarts
		// from the used index (virtio_queue_restore_last_avail_idx); a back
		// end with the inflight region knows better.
		_, b := virtio.LoadWord(q.used)
		base = uint32(b)
	}
	q.baseSet = false
	q.mu.Unlock()
	if err := c.send(wire.ReqSetVringCall, wire.VringFD{Index: uint8(i)}, []int{q.callFD}); err != nil {
		return err
	}
	if err := c.send(wire.ReqSetVringNum, wire.VringState{Index: i, Num: uint32(q.num)}, nil); err != nil {
		return err
	}
	if err := c.send(wire.ReqSetVringBase, wire.VringState{Index: i, Num: base}, nil); err != nil {
		return err
	}
	if err := c.send(wire.ReqSetVringAddr, q.addr(0), nil); err != nil {
		return err
	}
	if err := c.send(wire.ReqSetVringKick, wire.VringFD{Index: uint8(i)}, []int{q.kickFD}); err != nil {
		return err
	}
	if c.features&virtio.FeatureProtocolFeatures != 0 {
		if err := c.send(wire.ReqSetVringEnable, wire.VringState{Index: i, Num: 1}, nil); err != nil {
			return err
		}
	}
	// Kick once: requests may have been made available while no back end
	// was listening.
	q.mu.Lock()
	q.kickedIdx = q.availIdx
	q.mu.Unlock()
	q.kick()
	return nil
}

func (q *clientQueue) addr(flags uint32) wire.VringAddr {
	b := uint64(q.c.base)
	return wire.VringAddr{Index: uint32(q.idx), Flags: flags, Desc: b + q.dGPA, Used: b + q.uGPA, Avail: b + q.aGPA, Log: q.uGPA}
}

// SubmitChain makes available a chain built by the caller (for tests of
// hostile drivers): n descriptor indices are reserved, build returns the
// descriptors to write at them, and idx[0] is made available as the head.
// The descriptors are freed when the head is used.
func (c *Client) SubmitChain(q int, n int, build func(idx []uint16) []Desc, done func(Result)) error {
	if q < 0 || q >= len(c.queues) {
		return fmt.Errorf("vhost client: queue %d of %d", q, len(c.queues))
	}
	cq := c.queues[q]
	cq.mu.Lock()
	if cq.dead {
		cq.mu.Unlock()
		return ErrClientClosed
	}
	if n < 1 || len(cq.free) < n {
		cq.mu.Unlock()
		return ErrRingFull
	}
	idx := make([]uint16, n)
	copy(idx, cq.free[len(cq.free)-n:])
	cq.free = cq.free[:len(cq.free)-n]
	descs := build(idx)
	for i, d := range descs {
		if i < n {
			virtio.WriteDesc(cq.desc[int(idx[i])*virtio.DescSize:], d)
		}
	}
	cq.pend[idx[0]] = clientPending{inUse: true, raw: true, descs: idx, done: done}
	cq.publishLocked(idx[0])
	return nil
}

// publishLocked puts head in the available ring, publishes the index and
// kicks if the device wants it (or defers the kick to the end of a
// completion burst). cq.mu is held; it is released.
func (q *clientQueue) publishLocked(head uint16) {
	le.PutUint16(q.avail[4+2*int(q.availIdx&(q.num-1)):], head)
	q.availIdx++
	virtio.StoreWord(q.avail, 0, q.availIdx) // release: the descriptors first
	if q.deferKick {
		q.kickPending = true
		q.mu.Unlock()
		return
	}
	k := q.needKickLocked()
	q.mu.Unlock()
	if k {
		q.kick()
	}
}

// HoldKicks defers the kicks of queue q: requests submitted until
// ReleaseKicks are made available without a kick, as a driver publishes a
// batch (completions meanwhile may kick).
func (c *Client) HoldKicks(q int) {
	cq := c.queues[q]
	cq.mu.Lock()
	cq.deferKick = true
	cq.mu.Unlock()
}

// ReleaseKicks ends HoldKicks and kicks queue q once if the device asked
// for a kick for what was published meanwhile; it reports whether it
// kicked.
func (c *Client) ReleaseKicks(q int) bool {
	cq := c.queues[q]
	cq.mu.Lock()
	cq.deferKick = false
	k := cq.kickPending && cq.needKickLocked()
	cq.kickPending = false
	cq.mu.Unlock()
	if k {
		cq.kick()
	}
	return k
}

// needKickLocked decides whether the device must be kicked for the entries
// published since the last decision (virtio 1.x 2.7.13.4).
func (q *clientQueue) needKickLocked() bool {
	if q.pk != nil {
		return q.needKickPacked()
	}
	old, new := q.kickedIdx, q.availIdx
	q.kickedIdx = new
	if old == new {
		return false
	}
	atomic.AddUint32(&q.fence, 1)
	if q.eventIdx.Load() {
		return virtio.NeedEvent(virtio.Load16(q.used, 4+8*int(q.num), &q.fence), new, old)
	}
	flags, _ := virtio.LoadWord(q.used)
	return flags&virtio.UsedFlagNoNotify == 0
}

// kick signals the kick eventfd. A submission kicks after it released
// q.mu, so Close may have released the client meanwhile: the kick then
// does nothing, rather than write to whatever file took the number.
func (q *clientQueue) kick() {
	var one [8]byte
	le.PutUint64(one[:], 1)
	q.kickMu.RLock()
	if q.kickFD >= 0 {
		unix.Write(q.kickFD, one[:])
	}
	q.kickMu.RUnlock()
}

// complete is the queue's completion goroutine: it waits for the call
// eventfd and runs the callbacks of used requests.
func (q *clientQueue) complete() {
	defer close(q.done)
	var buf [8]byte
	for {
		q.drainUsed()
		if _, err := q.call.Read(buf[:]); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			return
		}
	}
}

// drainUsed completes every used element, then re-arms the interrupt.
func (q *clientQueue) drainUsed() {
	q.mu.Lock()
	q.deferKick = true
	q.mu.Unlock()
	if q.pk != nil {
		q.drainUsedPacked()
	}
	for q.pk == nil {
		_, usedIdx := virtio.LoadWord(q.used)
		if usedIdx-q.lastUsed > q.num {
			q.strays.Add(1) // a broken device; wait for a sane index
			break
		}
		for q.lastUsed != usedIdx {
			off := 4 + 8*int(q.lastUsed&(q.num-1))
			id := le.Uint32(q.used[off:])
			n := le.Uint32(q.used[off+4:])
			q.lastUsed++
			q.finish(id, n)
		}
		if q.eventIdx.Load() {
			virtio.Store16(q.avail, 4+2*int(q.num), q.lastUsed, &q.fence)
		} else {
			atomic.AddUint32(&q.fence, 1)
		}
		if _, again := virtio.LoadWord(q.used); again == q.lastUsed {
			break
		}
	}
	q.mu.Lock()
	q.deferKick = false
	k := q.kickPending && q.needKickLocked()
	q.kickPending = false
	q.mu.Unlock()
	if k {
		q.kick()
	}
}

// finish completes the request whose head is id.
func (q *clientQueue) finish(id, n uint32) {
	q.mu.Lock()
	if id >= uint32(q.num) || !q.pend[id].inUse {
		q.mu.Unlock()
		q.strays.Add(1)
		return
	}
	p := q.pend[id]
	q.pend[id] = clientPending{}
	status := q.slots[int(id)*slotSize+slotStatusOff]
	q.free = append(q.free, p.descs...)
	if q.pk != nil {
		q.pk.room += int(p.slots)
	}
	q.mu.Unlock()
	select {
	case q.space <- struct{}{}:
	default:
	}
	if p.done != nil {
		p.done(Result{Status: status, Len: n})
	}
}

// Strays returns how many used elements named no request in flight.
func (c *Client) Strays() uint64 {
	var n uint64
	for _, q := range c.queues {
		n += q.strays.Load()
	}
	return n
}

// UsedRingGPA returns the guest address of queue q's used ring.
func (c *Client) UsedRingGPA(q int) uint64 { return c.queues[q].uGPA }

// DescRingGPA returns the guest address of queue q's descriptor table (a
// packed ring's used elements are written there).
func (c *Client) DescRingGPA(q int) uint64 { return c.queues[q].dGPA }

// AvailRingGPA returns the guest address of queue q's available ring (for
// tests that play a driver misbehaving).
func (c *Client) AvailRingGPA(q int) uint64 { return c.queues[q].aGPA }
