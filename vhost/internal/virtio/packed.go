package virtio

import (
	"sync/atomic"
	"unsafe"
)

// Packed virtqueue layout (virtio 1.x, 2.8 "Packed Virtqueues"):
//
//	desc[i]  16 B: le64 addr, le32 len, le16 id, le16 flags
//	driver event suppression (the "avail" address):  le16 off_wrap, le16 flags
//	device event suppression (the "used" address):   le16 off_wrap, le16 flags
//
// A descriptor is available when its AVAIL flag equals the driver's wrap
// counter and its USED flag does not; the device marks it used by writing
// both flags equal to its own wrap counter. The {id, flags} pair is the
// 4-aligned word at offset 12: the side that publishes writes it with one
// 32-bit atomic store after the rest of the descriptor, the side that
// consumes reads it with one 32-bit atomic load before the rest.

// Packed descriptor flags (besides DescFlagNext, DescFlagWrite and
// DescFlagIndirect, which keep their split-ring values).
const (
	PackedDescFlagAvail = 1 << 7
	PackedDescFlagUsed  = 1 << 15
)

// Event suppression flags (pvirtq_event_suppress.flags).
const (
	PackedEventEnable  = 0 // notify on every buffer
	PackedEventDisable = 1 // never notify
	PackedEventDesc    = 2 // notify at off_wrap (VIRTIO_F_RING_EVENT_IDX only)
)

// PackedEventSize is the size of one event suppression structure.
const PackedEventSize = 4

// PackedWrapBit is the wrap counter's bit in an off_wrap field and in the
// 16-bit halves of a packed ring's vhost-user vring base.
const PackedWrapBit = 1 << 15

// PackedDesc is one packed-ring descriptor.
type PackedDesc struct {
	Addr  uint64
	Len   uint32
	ID    uint16
	Flags uint16
}

// ReadPackedDesc decodes the descriptor at b[0:16] with plain loads.
func ReadPackedDesc(b []byte) PackedDesc {
	_ = b[15]
	return PackedDesc{Addr: le.Uint64(b), Len: le.Uint32(b[8:]), ID: le.Uint16(b[12:]), Flags: le.Uint16(b[14:])}
}

// WritePackedDesc encodes d at b[0:16] with plain stores.
func WritePackedDesc(b []byte, d PackedDesc) {
	_ = b[15]
	le.PutUint64(b, d.Addr)
	le.PutUint32(b[8:], d.Len)
	le.PutUint16(b[12:], d.ID)
	le.PutUint16(b[14:], d.Flags)
}

// LoadIDFlags reads the {id, flags} word of the descriptor at b[0:16] with
// a 32-bit atomic load (acquire): the rest of the descriptor, read after
// it, is at least as new. b must be 4-aligned.
func LoadIDFlags(b []byte) (id, flags uint16) {
	v := atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[12])))
	return uint16(v), uint16(v >> 16)
}

// StoreIDFlags writes the {id, flags} word of the descriptor at b[0:16]
// with a 32-bit atomic store (release): the address and length written
// before it are visible first. b must be 4-aligned.
func StoreIDFlags(b []byte, id, flags uint16) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&b[12])), uint32(id)|uint32(flags)<<16)
}

// LoadEvent reads an event suppression structure with one 32-bit atomic
// load. b must be 4-aligned.
func LoadEvent(b []byte) (offWrap, flags uint16) {
	v := atomic.LoadUint32((*uint32)(unsafe.Pointer(unsafe.SliceData(b[:4]))))
	return uint16(v), uint16(v >> 16)
}

// StoreEvent writes an event suppression structure with one 32-bit atomic
// store. b must be 4-aligned.
func StoreEvent(b []byte, offWrap, flags uint16) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(unsafe.SliceData(b[:4]))), uint32(offWrap)|uint32(flags)<<16)
}

// PackedAvail reports whether flags mark a descriptor available to a
// device whose avail wrap counter is wrap.
func PackedAvail(flags uint16, wrap bool) bool {
	avail := flags&PackedDescFlagAvail != 0
	used := flags&PackedDescFlagUsed != 0
	return avail == wrap && used != wrap
}

// PackedUsed reports whether flags mark a descriptor used in the lap
// whose wrap counter is wrap.
func PackedUsed(flags uint16, wrap bool) bool {
	avail := flags&PackedDescFlagAvail != 0
	used := flags&PackedDescFlagUsed != 0
	return avail == wrap && used == wrap
}

// PackedUsedFlags returns the AVAIL and USED bits of a used descriptor
// written with wrap counter wrap; PackedAvailFlags those of an available
// one.
func PackedUsedFlags(wrap bool) uint16 {
	if wrap {
		return PackedDescFlagAvail | PackedDescFlagUsed
	}
	return 0
}

// PackedAvailFlags returns the AVAIL and USED bits with which a driver
// whose wrap counter is wrap makes a descriptor available.
func PackedAvailFlags(wrap bool) uint16 {
	if wrap {
		return PackedDescFlagAvail
	}
	return PackedDescFlagUsed
}

// PackedPos is a position in a packed ring: an index below the ring size
// and the wrap counter of the lap it is in.
type PackedPos struct {
	Idx  uint16
	Wrap bool
}

// PackedStart is where both sides start: index 0, wrap counter 1.
var PackedStart = PackedPos{Idx: 0, Wrap: true}

// Advance returns the position n entries after p in a ring of num.
func (p PackedPos) Advance(n, num uint16) PackedPos {
	i := uint32(p.Idx) + uint32(n)
	for i >= uint32(num) {
		i -= uint32(num)
		p.Wrap = !p.Wrap
	}
	p.Idx = uint16(i)
	return p
}

// Encode returns the index with the wrap counter in bit 15, as off_wrap
// fields and vring bases carry it.
func (p PackedPos) Encode() uint16 {
	v := p.Idx
	if p.Wrap {
		v |= PackedWrapBit
	}
	return v
}

// DecodePackedPos is the inverse of Encode.
func DecodePackedPos(v uint16) PackedPos {
	return PackedPos{Idx: v &^ PackedWrapBit, Wrap: v&PackedWrapBit != 0}
}

// Linear returns p as a number modulo 2*num that grows by one per entry,
// so that distances between positions less than two laps apart are
// differences.
func (p PackedPos) Linear(num uint16) uint32 {
	if p.Wrap {
		return uint32(p.Idx)
	}
	return uint32(p.Idx) + uint32(num)
}

// PackedNeedEvent reports whether moving from old to new (positions less
// than a lap apart) passes the other side's event position event: the
// packed ring's vring_need_event.
func PackedNeedEvent(event, new, old PackedPos, num uint16) bool {
	m := 2 * uint32(num)
	e, n, o := event.Linear(num), new.Linear(num), old.Linear(num)
	return (n+m-e-1)%m < (n+m-o)%m
}
