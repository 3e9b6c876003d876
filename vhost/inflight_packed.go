package vhost

import (
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"unsafe"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// Inflight I/O tracking for packed rings. vhost-user.rst ("Inflight I/O
// tracking") leaves the region's layout to the back end (the front end only
// keeps it); its packed variant copies each popped descriptor into the
// region, because a packed ring's used elements overwrite ring slots of
// requests still in flight. This back end's packed layout, one queue per
// inflightQueueBytes, is:
//
//	+0  u64 features   (0)
//	+8  u16 version    (2: this packed layout; the split layout is 1)
//	+10 u16 desc_num   (queue size)
//	+12 u32 state      bits 0-15: used position (wrap counter in bit 15);
//	                   bits 16-31: length of the batch being published
//	+16 entry[desc_num], 16 bytes, by buffer id:
//	    +0 u8 inflight, +1 u8 0, +2 u16 count (ring slots of the chain),
//	    +4 u16 first (copy slot of the chain's first descriptor), +6 u16 0,
//	    +8 u64 counter (pop order)
//	copy[desc_num], 16 bytes: ring descriptors as the driver wrote them
//	next[desc_num], u16: the copy slot after this one in its chain
//	batch[desc_num], u16: the buffer ids being published, in ring order
//
// Pop writes the copies, then sets inflight and count with one atomic
// store (the commit). Publishing a batch of used elements first records the
// batch's ids and length, then writes the elements' flags into the ring,
// clears their entries (count stays) and stores the new used position with
// a zero batch length. A back end that starts on a region left behind
// replays an unfinished batch: an element whose ring slot has its USED flag
// equal to the lap's wrap counter was published (the driver cannot reuse a
// slot before it is used), so its entry is cleared and the used position
// moves past its count; the first unpublished one stops the replay. The
// chains still in flight are resubmitted in pop order, and the next avail
// position is the used position plus their slots.

const (
	inflightPackedVersion = 2
	inflightPackedHeader  = 16
)

// inflightPackedBytes is the size of one queue's packed region.
func inflightPackedBytes(queueSize uint16) uint64 {
	return inflightPackedHeader + 36*uint64(queueSize)
}

// inflightPacked is the tracking state of one packed queue. Pop and
// publish touch it under the queue's used lock.
type inflightPacked struct {
	b       []byte
	num     uint16
	counter uint64
	free    []uint16 // copy slots no chain in flight holds
}

// packedRecovery is what a region left by an earlier back end gives back.
type packedRecovery struct {
	recovered bool
	avail     PackedPos
	used      PackedPos
	held      uint16
	resubmit  []uint16 // buffer ids, in pop order
	published int      // used elements of an unfinished batch found published
}

// packedQueue returns the packed tracking state of queue i, whose ring has
// num entries.
func (r *inflightRegion) packedQueue(i int, num uint16) (*inflightPacked, error) {
	if i >= int(r.numQueues) {
		return nil, fmt.Errorf("inflight region has %d queues, not queue %d", r.numQueues, i)
	}
	if num != r.queueSize {
		return nil, fmt.Errorf("inflight region is for queues of %d, queue %d has %d", r.queueSize, i, num)
	}
	sz := inflightQueueBytes(num)
	b := r.data[uint64(i)*sz : uint64(i+1)*sz]
	if uintptr(unsafe.Pointer(unsafe.SliceData(b)))%8 != 0 {
		return nil, errors.New("inflight region misaligned")
	}
	return &inflightPacked{b: b, num: num}, nil
}

func (q *inflightPacked) word(off int) *uint32 { return (*uint32)(unsafe.Pointer(&q.b[off])) }

func (q *inflightPacked) entry(id uint16) int { return inflightPackedHeader + 16*int(id) }

func (q *inflightPacked) copyOff(s uint16) int {
	return inflightPackedHeader + 16*int(q.num) + 16*int(s)
}

func (q *inflightPacked) nextOff(s uint16) int {
	return inflightPackedHeader + 32*int(q.num) + 2*int(s)
}

func (q *inflightPacked) batchOff(j int) int {
	return inflightPackedHeader + 34*int(q.num) + 2*j
}

// count returns the ring slots of the chain of id.
func (q *inflightPacked) count(id uint16) uint16 {
	return uint16(atomic.LoadUint32(q.word(q.entry(id))) >> 16)
}

// init makes the region fresh, with the used position used.
func (q *inflightPacked) init(used PackedPos) {
	clear(q.b)
	le.PutUint16(q.b[8:], inflightPackedVersion)
	le.PutUint16(q.b[10:], q.num)
	atomic.StoreUint32(q.word(12), uint32(used.Encode()))
	q.counter = 0
	q.free = q.free[:0]
	for s := int(q.num) - 1; s >= 0; s-- {
		q.free = append(q.free, uint16(s))
	}
}

// start prepares the region when the ring starts. ring is the descriptor
// ring and used the front end's used position. A fresh region (or one of
// another layout or size) is initialised; a region left by an earlier back
// end is checked, its unfinished batch replayed against the ring, and its
// requests in flight returned. A region that does not check out is
// initialised too, with the reason as the error.
func (q *inflightPacked) start(ring []byte, used PackedPos) (rec packedRecovery, err error) {
	if le.Uint16(q.b[8:]) != inflightPackedVersion || le.Uint16(q.b[10:]) != q.num {
		q.init(used)
		return rec, nil
	}
	rec, err = q.recover(ring)
	if err != nil {
		q.init(used)
		return packedRecovery{}, err
	}
	return rec, nil
}

func (q *inflightPacked) recover(ring []byte) (packedRecovery, error) {
	var rec packedRecovery
	num := q.num
	state := atomic.LoadUint32(q.word(12))
	used := virtio.DecodePackedPos(uint16(state))
	nb := int(state >> 16)
	if used.Idx >= num || nb > int(num) {
		return rec, fmt.Errorf("state %#x outside a ring of %d", state, num)
	}
	owner := make([]int32, num)
	for i := range owner {
		owner[i] = -1
	}
	// chainSlots lists the copy slots of an in-flight entry, checking them.
	chainSlots := func(id uint16, count uint16) error {
		s := le.Uint16(q.b[q.entry(id)+4:])
		for j := uint16(0); j < count; j++ {
			if s >= num || owner[s] != -1 {
				return fmt.Errorf("buffer %d: copy slot %d outside the region or shared", id, s)
			}
			owner[s] = int32(id)
			s = le.Uint16(q.b[q.nextOff(s):])
		}
		return nil
	}
	var held uint32
	for id := uint16(0); id < num; id++ {
		w := atomic.LoadUint32(q.word(q.entry(id)))
		switch w & 0xff {
		case 0:
			continue
		case 1:
		default:
			return rec, fmt.Errorf("buffer %d: inflight flag %d", id, w&0xff)
		}
		count := uint16(w >> 16)
		if count == 0 || count > num {
			return rec, fmt.Errorf("buffer %d: chain of %d slots in a ring of %d", id, count, num)
		}
		if err := chainSlots(id, count); err != nil {
			return rec, err
		}
		held += uint32(count)
	}
	if held > uint32(num) {
		return rec, fmt.Errorf("%d slots in flight in a ring of %d", held, num)
	}
	// Replay the batch that was being published.
	for j := 0; j < nb; j++ {
		id := le.Uint16(q.b[q.batchOff(j):])
		if id >= num {
			return rec, fmt.Errorf("batch entry %d: buffer %d", j, id)
		}
		_, flags := virtio.LoadIDFlags(ring[int(used.Idx)*virtio.DescSize:])
		if (flags&virtio.PackedDescFlagUsed != 0) != used.Wrap {
			break // not published, nor anything after it
		}
		w := atomic.LoadUint32(q.word(q.entry(id)))
		count := uint16(w >> 16)
		if count == 0 || count > num {
			return rec, fmt.Errorf("batch entry %d: buffer %d of %d slots", j, id, count)
		}
		if w&0xff == 1 {
			atomic.StoreUint32(q.word(q.entry(id)), uint32(count)<<16)
			held -= uint32(count)
			for s := range owner {
				if owner[s] == int32(id) {
					owner[s] = -1
				}
			}
		}
		used = used.Advance(count, num)
		rec.published++
	}
	atomic.StoreUint32(q.word(12), uint32(used.Encode()))
	// What is still in flight, in pop order.
	type ent struct {
		id      uint16
		counter uint64
	}
	var ents []ent
	q.counter = 0
	for id := uint16(0); id < num; id++ {
		if atomic.LoadUint32(q.word(q.entry(id)))&0xff == 1 {
			c := le.Uint64(q.b[q.entry(id)+8:])
			ents = append(ents, ent{id, c})
			q.counter = max(q.counter, c+1)
		}
	}
	slices.SortFunc(ents, func(a, b ent) int {
		switch {
		case a.counter < b.counter:
			return -1
		case a.counter > b.counter:
			return 1
		}
		return 0
	})
	for _, e := range ents {
		rec.resubmit = append(rec.resubmit, e.id)
	}
	q.free = q.free[:0]
	for s := int(num) - 1; s >= 0; s-- {
		if owner[s] == -1 {
			q.free = append(q.free, uint16(s))
		}
	}
	rec.recovered = true
	rec.used = used
	rec.held = uint16(held)
	rec.avail = used.Advance(uint16(held), num)
	return rec, nil
}

// popped records the chain of id, whose ring descriptors are src, as in
// flight: copies first, then the commit.
func (q *inflightPacked) popped(id uint16, src []byte) {
	k := len(src) / virtio.DescSize
	if k == 0 || k > len(q.free) {
		return // cannot happen: the ring holds at most num slots in flight
	}
	e := q.entry(id)
	first := q.free[len(q.free)-1]
	prev := -1
	for j := 0; j < k; j++ {
		s := q.free[len(q.free)-1]
		q.free = q.free[:len(q.free)-1]
		copy(q.b[q.copyOff(s):q.copyOff(s)+virtio.DescSize], src[j*virtio.DescSize:])
		if prev >= 0 {
			le.PutUint16(q.b[q.nextOff(uint16(prev)):], s)
		}
		prev = int(s)
	}
	le.PutUint16(q.b[q.nextOff(uint16(prev)):], 0)
	le.PutUint16(q.b[e+4:], first)
	le.PutUint64(q.b[e+8:], q.counter)
	q.counter++
	atomic.StoreUint32(q.word(e), 1|uint32(k)<<16)
}

// chain appends the copied ring descriptors of id to dst. It stays inside
// the region whatever the front end wrote there.
func (q *inflightPacked) chain(id uint16, dst []byte) []byte {
	count := q.count(id)
	s := le.Uint16(q.b[q.entry(id)+4:])
	for j := uint16(0); j < count && j < q.num && s < q.num; j++ {
		dst = append(dst, q.b[q.copyOff(s):q.copyOff(s)+virtio.DescSize]...)
		s = le.Uint16(q.b[q.nextOff(s):])
	}
	return dst
}

// batchStart records the batch about to be published.
func (q *inflightPacked) batchStart(pend []packedUsed) {
	n := min(len(pend), int(q.num))
	for j := 0; j < n; j++ {
		le.PutUint16(q.b[q.batchOff(j):], pend[j].id)
	}
	state := atomic.LoadUint32(q.word(12))
	atomic.StoreUint32(q.word(12), state&0xffff|uint32(n)<<16)
}

// batchDone ends a batch whose elements are published: their entries are
// cleared and their copy slots freed, then the used position moves.
func (q *inflightPacked) batchDone(pend []packedUsed, used PackedPos) {
	for _, p := range pend {
		e := q.entry(p.id)
		w := atomic.LoadUint32(q.word(e))
		if w&0xff != 1 {
			continue
		}
		count := uint16(w >> 16)
		atomic.StoreUint32(q.word(e), uint32(count)<<16)
		s := le.Uint16(q.b[e+4:])
		for j := uint16(0); j < count && s < q.num && len(q.free) < int(q.num); j++ {
			q.free = append(q.free, s)
			s = le.Uint16(q.b[q.nextOff(s):])
		}
	}
	atomic.StoreUint32(q.word(12), uint32(used.Encode()))
}
