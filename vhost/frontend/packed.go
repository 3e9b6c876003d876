package frontend

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// The driver side of a packed virtqueue (Config.Packed, virtio 1.x 2.8), as
// Linux's virtio_ring drives one: buffer ids are the request slots, chains
// take consecutive ring slots (or one, with an indirect table), every
// descriptor carries the lap's AVAIL/USED flags and the head's are written
// last; the driver event suppression structure (at the "avail" address)
// says when to interrupt, the device's (at the "used" address) when to
// kick.

// PackedDesc is a packed-ring descriptor (SubmitPacked).
type PackedDesc = virtio.PackedDesc

// packedDriver is the packed state of a clientQueue, guarded by its mu
// except used, which the completion goroutine owns.
type packedDriver struct {
	avail  virtio.PackedPos // next slot to fill
	kicked virtio.PackedPos // avail at the last kick decision
	used   virtio.PackedPos // next used element to read
	room   int              // free ring slots
	base   uint32           // next SET_VRING_BASE
}

func newPackedDriver(num uint16) *packedDriver {
	return &packedDriver{avail: virtio.PackedStart, kicked: virtio.PackedStart, used: virtio.PackedStart, room: int(num),
		base: uint32(virtio.PackedStart.Encode()) | uint32(virtio.PackedStart.Encode())<<16}
}

// Packed reports whether the rings are packed.
func (c *Client) Packed() bool { return c.features&virtio.FeatureRingPacked != 0 }

// submitPacked makes a request available on a packed ring: descs are its
// descriptors with header and status addresses still relative to the
// slot; fill writes the slot once the id is known.
func (q *clientQueue) submitPacked(descs []virtio.Desc, indirect bool, fill func(slot []byte, sg uint64), done func(Result)) error {
	n := len(descs)
	ring := n
	if indirect {
		ring = 1
	}
	q.mu.Lock()
	if q.dead {
		q.mu.Unlock()
		return ErrClientClosed
	}
	if len(q.free) == 0 || q.pk.room < ring {
		q.mu.Unlock()
		return ErrRingFull
	}
	id := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	slot := q.slots[int(id)*slotSize : (int(id)+1)*slotSize]
	sg := q.sGPA + uint64(id)*slotSize
	fill(slot, sg)
	var ringDescs []virtio.PackedDesc
	if indirect {
		for i, d := range descs {
			virtio.WritePackedDesc(slot[slotTableOff+i*virtio.DescSize:], virtio.PackedDesc{Addr: d.Addr, Len: d.Len, Flags: d.Flags &^ virtio.DescFlagNext})
		}
		ringDescs = []virtio.PackedDesc{{Addr: sg + slotTableOff, Len: uint32(n * virtio.DescSize), ID: id, Flags: virtio.DescFlagIndirect}}
	} else {
		ringDescs = make([]virtio.PackedDesc, n)
		for i, d := range descs {
			f := d.Flags &^ virtio.DescFlagNext
			if i < n-1 {
				f |= virtio.DescFlagNext
			}
			ringDescs[i] = virtio.PackedDesc{Addr: d.Addr, Len: d.Len, ID: id, Flags: f}
		}
	}
	q.pend[id] = clientPending{inUse: true, descs: []uint16{id}, slots: uint16(len(ringDescs)), done: done}
	q.publishPackedLocked(ringDescs)
	return nil
}

// publishPackedLocked writes descs at the avail position, the head's flags
// last, and kicks if the device wants it. q.mu is held; it is released.
func (q *clientQueue) publishPackedLocked(descs []virtio.PackedDesc) {
	pk := q.pk
	head := pk.avail
	pos := head
	var headFlags uint16
	for i, d := range descs {
		d.Flags = d.Flags&^(virtio.PackedDescFlagAvail|virtio.PackedDescFlagUsed) | virtio.PackedAvailFlags(pos.Wrap)
		s := q.desc[int(pos.Idx)*virtio.DescSize:]
		if i == 0 {
			headFlags = d.Flags
			d.Flags = 0 // not yet available: the flags go last
			if !pos.Wrap {
				d.Flags = virtio.PackedDescFlagAvail | virtio.PackedDescFlagUsed
			}
		}
		virtio.WritePackedDesc(s, d)
		pos = pos.Advance(1, q.num)
	}
	virtio.StoreIDFlags(q.desc[int(head.Idx)*virtio.DescSize:], descs[0].ID, headFlags)
	pk.avail = pos
	pk.room -= len(descs)
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

// needKickPacked is needKickLocked for a packed ring (2.8.10).
func (q *clientQueue) needKickPacked() bool {
	pk := q.pk
	old, new := pk.kicked, pk.avail
	pk.kicked = new
	if old == new {
		return false
	}
	atomic.AddUint32(&q.fence, 1)
	offWrap, flags := virtio.LoadEvent(q.used)
	switch {
	case flags == virtio.PackedEventDisable:
		return false
	case flags == virtio.PackedEventDesc && q.eventIdx.Load():
		return virtio.PackedNeedEvent(virtio.DecodePackedPos(offWrap), new, old, q.num)
	}
	return true
}

// drainUsedPacked completes every used element of a packed ring, then
// re-arms the interrupt.
func (q *clientQueue) drainUsedPacked() {
	pk := q.pk
	for {
		for {
			s := q.desc[int(pk.used.Idx)*virtio.DescSize:]
			id, flags := virtio.LoadIDFlags(s)
			if !virtio.PackedUsed(flags, pk.used.Wrap) {
				break
			}
			n := le.Uint32(s[8:])
			q.mu.Lock()
			ok := id < q.num && q.pend[id].inUse
			var k uint16
			if ok {
				k = q.pend[id].slots
			}
			q.mu.Unlock()
			if !ok {
				q.strays.Add(1) // a broken device: its chain length is unknown
				return
			}
			pk.used = pk.used.Advance(k, q.num)
			q.finish(uint32(id), n)
		}
		if q.eventIdx.Load() {
			virtio.StoreEvent(q.avail, pk.used.Encode(), virtio.PackedEventDesc)
		} else {
			atomic.AddUint32(&q.fence, 1)
		}
		_, flags := virtio.LoadIDFlags(q.desc[int(pk.used.Idx)*virtio.DescSize:])
		if !virtio.PackedUsed(flags, pk.used.Wrap) {
			return
		}
	}
}

// SubmitPacked makes available a packed chain built by the caller (for
// tests of hostile drivers): build gets the buffer id and the request's
// slot (4 KiB of guest memory for a header, status and tables, and its
// guest address) and returns the ring descriptors; their AVAIL and USED
// flags are set here, every other field is the caller's, ids included.
// done runs when a used element names id.
func (c *Client) SubmitPacked(q int, build func(id uint16, slot []byte, slotGPA uint64) []PackedDesc, done func(Result)) error {
	if q < 0 || q >= len(c.queues) {
		return fmt.Errorf("vhost client: queue %d of %d", q, len(c.queues))
	}
	cq := c.queues[q]
	if cq.pk == nil {
		return errors.New("vhost client: rings are not packed")
	}
	cq.mu.Lock()
	if cq.dead {
		cq.mu.Unlock()
		return ErrClientClosed
	}
	if len(cq.free) == 0 {
		cq.mu.Unlock()
		return ErrRingFull
	}
	id := cq.free[len(cq.free)-1]
	slot := cq.slots[int(id)*slotSize : (int(id)+1)*slotSize]
	descs := build(id, slot, cq.sGPA+uint64(id)*slotSize)
	if len(descs) == 0 || len(descs) > cq.pk.room {
		cq.mu.Unlock()
		return ErrRingFull
	}
	cq.free = cq.free[:len(cq.free)-1]
	cq.pend[id] = clientPending{inUse: true, raw: true, descs: []uint16{id}, slots: uint16(len(descs)), done: done}
	cq.publishPackedLocked(descs)
	return nil
}
