// Package virtio holds the virtio 1.x layouts that the vhost-user back end
// and front end share: feature bits, the split virtqueue in guest memory
// and its lock-free accessors, and the virtio-blk request and config
// layouts. It is wire format only: no state, no socket.
package virtio

import (
	"encoding/binary"
	"sync/atomic"
	"unsafe"
)

var le = binary.LittleEndian

// Virtio and vhost feature bits negotiated with GET/SET_FEATURES.
const (
	FeatureNotifyOnEmpty    = 1 << 24
	FeatureLogAll           = 1 << 26 // VHOST_F_LOG_ALL
	FeatureIndirectDesc     = 1 << 28 // VIRTIO_F_RING_INDIRECT_DESC
	FeatureEventIdx         = 1 << 29 // VIRTIO_F_RING_EVENT_IDX
	FeatureProtocolFeatures = 1 << 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FeatureVersion1         = 1 << 32
	FeatureAccessPlatform   = 1 << 33
	FeatureRingPacked       = 1 << 34
)

// Virtio-blk feature bits (virtio 1.x, 5.2.3).
const (
	BlkFeatureSizeMax     = 1 << 1
	BlkFeatureSegMax      = 1 << 2
	BlkFeatureGeometry    = 1 << 4
	BlkFeatureRO          = 1 << 5
	BlkFeatureBlkSize     = 1 << 6
	BlkFeatureFlush       = 1 << 9
	BlkFeatureTopology    = 1 << 10
	BlkFeatureConfigWCE   = 1 << 11
	BlkFeatureMQ          = 1 << 12
	BlkFeatureDiscard     = 1 << 13
	BlkFeatureWriteZeroes = 1 << 14
)

// Split virtqueue layout (virtio 1.x, 2.7 "Split Virtqueues"):
//
//	desc[i]  16 B: le64 addr, le32 len, le16 flags, le16 next
//	avail    le16 flags, le16 idx, le16 ring[N], le16 used_event
//	used     le16 flags, le16 idx, {le32 id, le32 len}[N], le16 avail_event
//
// Go has no 16-bit atomics. The {flags, idx} words of both rings are read and
// written with 32-bit atomics on the aligned word that holds them; other
// 16-bit fields use single 16-bit loads and stores ordered by a neighbouring
// atomic operation (a full barrier on amd64 and arm64).

// Descriptor flags.
const (
	DescFlagNext     = 1
	DescFlagWrite    = 2
	DescFlagIndirect = 4
)

// Ring flags.
const (
	AvailFlagNoInterrupt = 1
	UsedFlagNoNotify     = 1
)

const (
	DescSize = 16
	// MaxQueueSize is the largest split ring (virtio 1.x: Queue Size is at
	// most 32768).
	MaxQueueSize = 32768
)

func init() {
	// The ring accessors below read little-endian fields with native loads.
	var x uint16 = 1
	if *(*byte)(unsafe.Pointer(&x)) != 1 {
		panic("vhost: big-endian hosts are not supported")
	}
}

// Desc is one split-ring descriptor.
type Desc struct {
	Addr  uint64
	Len   uint32
	Flags uint16
	Next  uint16
}

// ReadDesc decodes the descriptor at b[0:16].
func ReadDesc(b []byte) Desc {
	_ = b[15]
	return Desc{Addr: le.Uint64(b), Len: le.Uint32(b[8:]), Flags: le.Uint16(b[12:]), Next: le.Uint16(b[14:])}
}

// WriteDesc encodes d at b[0:16].
func WriteDesc(b []byte, d Desc) {
	_ = b[15]
	le.PutUint64(b, d.Addr)
	le.PutUint32(b[8:], d.Len)
	le.PutUint16(b[12:], d.Flags)
	le.PutUint16(b[14:], d.Next)
}

// RingSizes returns the byte sizes of the descriptor table, available ring
// and used ring of a queue of n entries, with room for event-idx fields.
func RingSizes(n int) (desc, avail, used int) {
	return DescSize * n, 6 + 2*n, 6 + 8*n
}

// Load16 reads the 16-bit field at b[off] with a 32-bit atomic load of the
// aligned word holding it when that word lies in b[:cap(b)], else with a
// plain load after a full barrier.
func Load16(b []byte, off int, fence *uint32) uint16 {
	_ = b[off+1]
	p := unsafe.Pointer(&b[off])
	switch uintptr(p) & 3 {
	case 0:
		if off+4 <= cap(b) {
			return uint16(atomic.LoadUint32((*uint32)(p)))
		}
	case 2:
		if off >= 2 {
			return uint16(atomic.LoadUint32((*uint32)(unsafe.Add(p, -2))) >> 16)
		}
	}
	atomic.AddUint32(fence, 1)
	return *(*uint16)(p)
}

// Store16 writes the 16-bit field at b[off] with one 16-bit store and then
// a full barrier, so that later loads see the store ordered before them.
func Store16(b []byte, off int, v uint16, fence *uint32) {
	binary.LittleEndian.PutUint16(b[off:], v)
	atomic.AddUint32(fence, 1)
}

// LoadWord / StoreWord access the 4-aligned {flags, idx} word at b[0:4]:
// flags in the low half, idx in the high half.
func LoadWord(b []byte) (flags, idx uint16) {
	v := atomic.LoadUint32((*uint32)(unsafe.Pointer(unsafe.SliceData(b[:4]))))
	return uint16(v), uint16(v >> 16)
}

// StoreWord is the store counterpart of LoadWord.
func StoreWord(b []byte, flags, idx uint16) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(unsafe.SliceData(b[:4]))), uint32(flags)|uint32(idx)<<16)
}

// NeedEvent is vring_need_event: with event idx, notify when the index
// moved from old to new past the other side's event index.
func NeedEvent(event, new, old uint16) bool {
	return new-event-1 < new-old
}

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
	BlkHeaderSize   = 16 // le32 type, le32 reserved, le64 sector
	BlkDiscardSize  = 16 // le64 sector, le32 num_sectors, le32 flags
	BlkDiscardUnmap = 1  // VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
	// ConfigSpaceSize is the size of struct virtio_blk_config.
	ConfigSpaceSize = 96
)

// BlkIDBytes is the length of the GET_ID device ID (VIRTIO_BLK_ID_BYTES).
const BlkIDBytes = 20
