package vhost

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// This file is the packed virtqueue (VIRTIO_F_RING_PACKED, virtio 1.x 2.8)
// and its seam into the queue runtime: the runtime keeps its request table,
// hand-off, batching and completion, and asks the ring only to pop a chain,
// walk it, put a used element and publish. A queue has q.packed set while
// the packed layout is negotiated; otherwise it uses q.ring (split).
//
// Differences from the split ring that shape this code:
//   - The driver and the device share one descriptor ring. A chain is
//     available when its head's flags match the driver's wrap counter; the
//     chain occupies consecutive slots (NEXT flags), and its buffer id is
//     in its last descriptor. Requests are kept by buffer id, which this
//     device requires to be below the queue size.
//   - Used elements overwrite ring slots at the device's used position, so
//     a chain's descriptors may be gone once a later request completed: the
//     chain is walked (and copied to the inflight region) when it is popped.
//   - There is no index in guest memory: both positions live in the device
//     and travel in the vring base (avail in bits 0-15, used in bits 16-31,
//     each with its wrap counter in bit 15), or in the inflight region.
//   - Ring sizes need not be powers of two.

// packedRing is the device side of one packed virtqueue. The avail side
// (avail, scratch) belongs to the ring goroutine; the used side (used,
// pend, pub, told) to whoever holds the queue's used lock.
type packedRing struct {
	num      uint16
	desc     []byte
	descGPA  uint64
	driver   []byte // driver event suppression: when the driver wants interrupts
	device   []byte // device event suppression: when the device wants kicks
	eventIdx bool
	indirect bool

	avail PackedPos // next slot to pop
	// held counts ring slots of chains popped and not yet used: a driver
	// never has more than num outstanding.
	held atomic.Int32
	lens []uint16 // ring slots of the chain in flight, by buffer id

	// scratch holds the raw descriptors of the chain being popped (curID).
	scratch []byte
	curID   int

	used PackedPos // next used element's slot
	pub  PackedPos // used position at the last publish
	pend []packedUsed
	told bool
	inf  *inflightPacked // nil: no inflight tracking

	fence uint32
}

// PackedPos is a position in a packed ring.
type PackedPos = virtio.PackedPos

// packedUsed is a used element written but not yet published.
type packedUsed struct {
	pos PackedPos
	id  uint16
}

// Packed-ring errors that concern the whole ring.
var errPackedOverrun = errors.New("driver made more descriptors available than the queue holds")

// setup checks and translates the ring addresses through m: desc is the
// descriptor ring, avail the driver event suppression area and used the
// device's (vhost-user.rst: the same three addresses as a split ring).
func (r *packedRing) setup(m *Mem, num uint16, a wire.VringAddr) error {
	if num == 0 || num > virtio.MaxQueueSize {
		return fmt.Errorf("packed ring of %d entries", num)
	}
	desc, dgpa, err := m.userSlice(a.Desc, uint64(num)*virtio.DescSize)
	if err != nil {
		return fmt.Errorf("descriptor ring: %w", err)
	}
	drv, _, err := m.userSlice(a.Avail, virtio.PackedEventSize)
	if err != nil {
		return fmt.Errorf("driver event suppression: %w", err)
	}
	dev, _, err := m.userSlice(a.Used, virtio.PackedEventSize)
	if err != nil {
		return fmt.Errorf("device event suppression: %w", err)
	}
	// Virtio 1.x 2.8.10.1: the ring is 16-aligned and the event structures
	// 4-aligned; the 32-bit atomics need that in the back end's mapping.
	for _, b := range [][]byte{desc, drv, dev} {
		if uintptr(unsafe.Pointer(unsafe.SliceData(b)))%4 != 0 {
			return errors.New("ring memory misaligned in the back end's mapping")
		}
	}
	if r.num != num {
		r.lens = make([]uint16, num)
	}
	r.num, r.desc, r.descGPA, r.driver, r.device = num, desc, dgpa, drv, dev
	return nil
}

// restart sets both positions for a queue (re)start.
func (r *packedRing) restart(avail, used PackedPos, held uint16) {
	r.avail, r.used, r.pub = avail, used, used
	r.held.Store(int32(held))
	r.pend = r.pend[:0]
	r.told = false
	r.curID = -1
	// Ask for kicks: on every buffer, or past the avail position with
	// event idx (armKick).
	virtio.StoreEvent(r.device, 0, virtio.PackedEventEnable)
}

// slot returns the descriptor at ring index i.
func (r *packedRing) slot(i uint16) []byte {
	return r.desc[int(i)*virtio.DescSize : int(i+1)*virtio.DescSize]
}

// availNow reports whether the driver made a chain available at the avail
// position (acquire).
func (r *packedRing) availNow() bool {
	_, flags := virtio.LoadIDFlags(r.slot(r.avail.Idx))
	return virtio.PackedAvail(flags, r.avail.Wrap)
}

// armKick asks for a kick when more chains become available and reports
// whether one already is: with event idx the device event suppression
// names the avail position, otherwise kicks stay enabled.
func (r *packedRing) armKick() bool {
	if r.eventIdx {
		virtio.StoreEvent(r.device, r.avail.Encode(), virtio.PackedEventDesc)
	}
	atomic.AddUint32(&r.fence, 1)
	return r.availNow()
}

// peek reads the chain available at the avail position into scratch and
// returns its buffer id and the number of ring slots it takes. The chain
// is not popped. Errors concern the whole ring.
func (r *packedRing) peek() (id, n uint16, err error) {
	held := uint16(r.held.Load())
	room := r.num - held
	i := r.avail.Idx
	r.scratch = r.scratch[:0]
	for k := uint16(0); ; k++ {
		if k >= room {
			return 0, 0, fmt.Errorf("%w: a chain at slot %d runs past %d free slots", errPackedOverrun, r.avail.Idx, room)
		}
		s := r.slot(i)
		var d virtio.PackedDesc
		if k == 0 {
			// The head's flags were checked with an acquire load; read
			// them again the same way so that the rest is as new.
			var flags uint16
			d.ID, flags = virtio.LoadIDFlags(s)
			d = virtio.ReadPackedDesc(s)
			d.Flags = flags
		} else {
			d = virtio.ReadPackedDesc(s)
		}
		r.scratch = append(r.scratch, make([]byte, virtio.DescSize)...)
		virtio.WritePackedDesc(r.scratch[len(r.scratch)-virtio.DescSize:], d)
		if i++; i == r.num {
			i = 0
		}
		if d.Flags&virtio.DescFlagNext == 0 || d.Flags&virtio.DescFlagIndirect != 0 {
			return d.ID, k + 1, nil
		}
	}
}

// take pops the chain peek read: the avail position moves past its n
// slots.
func (r *packedRing) take(id, n uint16) {
	r.avail = r.avail.Advance(n, r.num)
	r.held.Add(int32(n))
	r.lens[id] = n
	r.curID = int(id)
}

// chainSource returns the raw descriptors of the chain of buffer id: the
// chain being popped, or its copy in the inflight region (a resubmitted
// request).
func (r *packedRing) chainSource(id uint16) []byte {
	if r.curID == int(id) {
		return r.scratch
	}
	if r.inf != nil {
		r.scratch = r.inf.chain(id, r.scratch[:0])
		r.curID = int(id)
		return r.scratch
	}
	return nil
}

// walkPacked walks a packed chain (src: its ring descriptors, raw) into c.
func walkPacked(m *Mem, src []byte, id uint16, indirect bool, c *chain) error {
	c.reset(id)
	n := len(src) / virtio.DescSize
	if n == 0 {
		return errors.New("no descriptors")
	}
	for i := range n {
		d := virtio.ReadPackedDesc(src[i*virtio.DescSize:])
		if d.Flags&virtio.DescFlagIndirect != 0 {
			// 2.8.19: "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and
			// VIRTQ_DESC_F_NEXT in flags"; an indirect descriptor is the
			// whole buffer.
			if !indirect {
				return fmt.Errorf("%w: indirect descriptors not negotiated", errChainIndirect)
			}
			if n != 1 {
				return fmt.Errorf("%w: indirect descriptor in a chain", errChainIndirect)
			}
			return walkPackedIndirect(m, d, c)
		}
		if err := c.add(m, virtio.Desc{Addr: d.Addr, Len: d.Len, Flags: d.Flags}); err != nil {
			return err
		}
	}
	return nil
}

// walkPackedIndirect walks the indirect table of d: packed descriptors in
// order (2.8.19: NEXT and the buffer ids in the table are not used).
func walkPackedIndirect(m *Mem, d virtio.PackedDesc, c *chain) error {
	if d.Len == 0 || d.Len%virtio.DescSize != 0 || d.Len/virtio.DescSize > maxSegments {
		return fmt.Errorf("%w: table of %d bytes", errChainIndirect, d.Len)
	}
	table, err := m.Slice(d.Addr, uint64(d.Len))
	if err != nil {
		return fmt.Errorf("%w: table: %v", errChainIndirect, err)
	}
	for i := 0; i < int(d.Len/virtio.DescSize); i++ {
		dd := virtio.ReadPackedDesc(table[i*virtio.DescSize:])
		if dd.Flags&virtio.DescFlagIndirect != 0 {
			return fmt.Errorf("%w: nested indirect table", errChainIndirect)
		}
		if err := c.add(m, virtio.Desc{Addr: dd.Addr, Len: dd.Len, Flags: dd.Flags}); err != nil {
			return err
		}
	}
	return nil
}

// salvagePacked finds the status byte of a packed chain that failed to
// walk: the last byte of its last descriptor (or last table entry), if
// device-writable and inside guest memory.
func salvagePacked(m *Mem, src []byte, indirect bool) ([]byte, uint64, bool) {
	n := len(src) / virtio.DescSize
	if n == 0 {
		return nil, 0, false
	}
	d := virtio.ReadPackedDesc(src[(n-1)*virtio.DescSize:])
	if d.Flags&virtio.DescFlagIndirect != 0 {
		if n != 1 || !indirect || d.Len == 0 || d.Len%virtio.DescSize != 0 || d.Len/virtio.DescSize > maxSegments {
			return nil, 0, false
		}
		t, err := m.Slice(d.Addr, uint64(d.Len))
		if err != nil {
			return nil, 0, false
		}
		d = virtio.ReadPackedDesc(t[len(t)-virtio.DescSize:])
		if d.Flags&virtio.DescFlagIndirect != 0 {
			return nil, 0, false
		}
	}
	if d.Flags&virtio.DescFlagWrite == 0 || d.Len == 0 || d.Addr+uint64(d.Len) < d.Addr {
		return nil, 0, false
	}
	gpa := d.Addr + uint64(d.Len) - 1
	b, err := m.Slice(gpa, 1)
	if err != nil {
		return nil, 0, false
	}
	return b, gpa, true
}

// putUsed writes the used element of buffer id at the used position
// (length now, id and flags at publish) and advances the position past
// the chain's slots. It returns the element's ring index, for dirty
// logging. The used lock is held.
func (r *packedRing) putUsed(id uint16, n uint32) uint16 {
	at := r.used
	le.PutUint32(r.slot(at.Idx)[8:], n)
	r.pend = append(r.pend, packedUsed{pos: at, id: id})
	k := r.lens[id]
	r.used = r.used.Advance(k, r.num)
	r.held.Add(-int32(k))
	return at.Idx
}

// publish makes the used elements written since the last publish visible,
// in ring order, and reports whether the driver wants a notification
// (2.8.10, 2.8.21). The used lock is held.
func (r *packedRing) publish() (notify bool) {
	if len(r.pend) == 0 {
		return false
	}
	if r.inf != nil {
		r.inf.batchStart(r.pend)
	}
	for _, p := range r.pend {
		virtio.StoreIDFlags(r.slot(p.pos.Idx), p.id, virtio.PackedUsedFlags(p.pos.Wrap))
	}
	if r.inf != nil {
		r.inf.batchDone(r.pend, r.used)
	}
	r.pend = r.pend[:0]
	old, new := r.pub, r.used
	r.pub = new
	// The atomic stores above are full barriers: the read below is
	// ordered after them.
	offWrap, flags := virtio.LoadEvent(r.driver)
	if !r.told {
		// As for the split ring: completions before a restart may never
		// have been signalled.
		r.told = true
		return true
	}
	switch {
	case flags == virtio.PackedEventDisable:
		return false
	case flags == virtio.PackedEventDesc && r.eventIdx:
		return virtio.PackedNeedEvent(virtio.DecodePackedPos(offWrap), new, old, r.num)
	}
	return true
}

// base returns the vring base of a stopped ring: the avail position in
// bits 0-15 and the used position in bits 16-31, each with its wrap
// counter in bit 15 (QEMU's virtio_queue_packed_get_last_avail_idx).
func (r *packedRing) base() uint32 {
	return uint32(r.avail.Encode()) | uint32(r.used.Encode())<<16
}

// decodePackedBase splits a SET_VRING_BASE value of a packed ring. A front
// end that sends only the avail half (bits 16-31 zero) has nothing in
// flight: used starts where avail does.
func decodePackedBase(v uint32, num uint16) (avail, used PackedPos, held uint16, err error) {
	avail = virtio.DecodePackedPos(uint16(v))
	used = avail
	if v>>16 != 0 {
		used = virtio.DecodePackedPos(uint16(v >> 16))
	}
	if avail.Idx >= num || used.Idx >= num {
		return avail, used, 0, fmt.Errorf("vring base %#x outside a packed ring of %d", v, num)
	}
	d := (avail.Linear(num) + 2*uint32(num) - used.Linear(num)) % (2 * uint32(num))
	if d > uint32(num) {
		return avail, used, 0, fmt.Errorf("vring base %#x: avail %d entries ahead of used in a ring of %d", v, d, num)
	}
	return avail, used, uint16(d), nil
}

// The queue side of the seam.

// setupPacked translates a packed ring; the queue is stopped or paused.
func (q *queue) setupPacked(mem *Mem, features uint64) error {
	if q.packed == nil {
		q.packed = &packedRing{curID: -1}
	}
	pr := q.packed
	if err := pr.setup(mem, q.num, q.addr); err != nil {
		return err
	}
	pr.eventIdx = features&virtio.FeatureEventIdx != 0
	pr.indirect = features&virtio.FeatureIndirectDesc != 0
	return nil
}

// startPacked sets the positions of a starting packed ring from the vring
// base, or from the inflight region if it holds an earlier back end's
// state, and queues that back end's requests for resubmission.
func (q *queue) startPacked(inf *inflightRegion) error {
	pr := q.packed
	// The inflight region, when it holds an earlier back end's state,
	// overrides the base: QEMU sends the base it had when that back end
	// started (a packed ring has no index in guest memory to resync from).
	avail, used, held, baseErr := decodePackedBase(q.baseFull(), q.num)
	recovered := false
	q.inflight, q.resubmit, pr.inf = nil, nil, nil
	if inf != nil {
		iq, err := inf.packedQueue(q.index, q.num)
		if err != nil {
			q.log.Warn("inflight tracking off", "err", err)
		} else {
			rec, err := iq.start(pr.desc, used)
			if err != nil {
				q.log.Warn("inflight region unusable, starting it afresh", "err", err)
			}
			pr.inf = iq
			if rec.recovered {
				recovered = true
				avail, used, held = rec.avail, rec.used, rec.held
				for _, id := range rec.resubmit {
					pr.lens[id] = iq.count(id)
				}
				q.resubmit = rec.resubmit
				q.log.Info("inflight region recovered", "resubmit", len(rec.resubmit),
					"used", used.Encode(), "avail", avail.Encode(), "published", rec.published)
			}
		}
	}
	if baseErr != nil && !recovered {
		return baseErr
	}
	pr.restart(avail, used, held)
	q.log.Info("packed virtqueue started", "size", q.num, "event_idx", pr.eventIdx, "indirect", pr.indirect,
		"avail", avail.Encode(), "used", used.Encode(), "inflight_tracking", pr.inf != nil)
	return nil
}

// drainPacked is drain for a packed ring.
func (q *queue) drainPacked() error {
	pr := q.packed
	polled := false
	for !q.stopReq.Load() && !q.dev.dead.Load() {
		if !pr.availNow() {
			if !polled {
				polled = true
				if q.pollDry() {
					continue
				}
			}
			if !pr.armKick() {
				return nil
			}
			continue
		}
		polled = false
		q.hold()
		var bad error
		for i := 0; pr.availNow(); i++ {
			if q.stopReq.Load() || q.dev.dead.Load() {
				break
			}
			b := q.getBuf()
			if b == nil {
				break
			}
			id, n, err := pr.peek()
			switch {
			case err != nil:
				bad = err
			case id >= q.num:
				bad = fmt.Errorf("chain at slot %d has buffer id %d, not below the queue size %d", pr.avail.Idx, id, q.num)
			case q.reqs[id].busy.Load():
				bad = fmt.Errorf("chain at slot %d has buffer id %d, which is in flight", pr.avail.Idx, id)
			}
			if bad != nil {
				q.pool <- b
				break
			}
			pr.take(id, n)
			q.admit(id, b)
			if pr.inf != nil {
				q.usedMu.Lock()
				pr.inf.popped(id, pr.scratch)
				q.usedMu.Unlock()
			}
			q.dispatch(id)
			q.curSet = false
			pr.curID = -1
			if i%publishBatch == publishBatch-1 {
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

// walk walks the chain of request head into r.chain.
func (q *queue) walk(head uint16, r *request) error {
	if pr := q.packed; pr != nil {
		return walkPacked(q.mem, pr.chainSource(head), head, pr.indirect, &r.chain)
	}
	return walkChain(q.mem, q.ring.desc, q.num, head, q.ring.indirect, &r.chain)
}

// salvage finds the status byte of a chain that failed to walk.
func (q *queue) salvage(head uint16) ([]byte, uint64, bool) {
	if pr := q.packed; pr != nil {
		return salvagePacked(q.mem, pr.chainSource(head), pr.indirect)
	}
	return salvageStatus(q.mem, q.ring.desc, q.num, head, q.ring.indirect)
}

// putUsedPacked is putUsed for a packed ring; usedMu is held.
func (q *queue) putUsedPacked(id uint16, usedLen uint32) {
	i := q.packed.putUsed(id, usedLen)
	if q.logUsed {
		q.dlog.mark(q.packed.descGPA+uint64(i)*virtio.DescSize, virtio.DescSize)
	}
}

// pubAndEvent returns the used position last published and the one the
// driver expects to be told about (renotify); usedMu is held. A packed
// driver that does not ask for interrupts by position (flags ENABLE or
// DISABLE) is never owed one by this test.
func (q *queue) pubAndEvent() (pub, event uint16) {
	pr := q.packed
	if pr == nil {
		return q.ring.pubIdx, q.ring.usedEvent()
	}
	pub = pr.pub.Encode()
	offWrap, flags := virtio.LoadEvent(pr.driver)
	if flags != virtio.PackedEventDesc {
		return pub, pub
	}
	return pub, offWrap
}

// baseFull returns the vring base the front end set, all 32 bits.
func (q *queue) baseFull() uint32 { return uint32(q.base) | uint32(q.baseHi)<<16 }

// availBase returns the vring base of the stopped queue (GET_VRING_BASE).
func (q *queue) availBase() uint32 {
	if q.packed != nil {
		return q.packed.base()
	}
	return uint32(q.ring.lastAvail)
}
