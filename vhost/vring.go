package vhost

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// le is the byte order of every virtio and vhost-user field.
var le = binary.LittleEndian

// maxSegments bounds the translated pieces of one chain (the kernel's
// IOV_MAX, and QEMU's VIRTQUEUE_MAX_SIZE for indirect tables).
const maxSegments = 1024

// Chain errors that concern one request.
var (
	errChainLoop     = errors.New("descriptor chain loops or exceeds the queue size")
	errChainIndirect = errors.New("bad indirect descriptor")
)

// chain is a walked descriptor chain: its buffers in order, readable ones
// first.
type chain struct {
	head   uint16
	segs   []seg
	nRead  int    // number of leading readable segments
	rBytes uint64 // readable bytes
	wBytes uint64 // writable bytes
}

func (c *chain) reset(head uint16) {
	c.head = head
	c.segs = c.segs[:0]
	c.nRead, c.rBytes, c.wBytes = 0, 0, 0
}

// lastWritable returns the last byte of the last writable segment, where a
// virtio-blk status goes, with its guest address.
func (c *chain) lastWritable() ([]byte, uint64, bool) {
	for i := len(c.segs) - 1; i >= c.nRead; i-- {
		s := c.segs[i]
		if s.write && len(s.b) > 0 {
			return s.b[len(s.b)-1:], s.gpa + uint64(len(s.b)) - 1, true
		}
	}
	return nil, 0, false
}

// walkChain reads the chain that starts at head from the descriptor table
// desc (num entries) and translates its buffers through m into c. It checks
// everything the driver controls; on error c holds the segments translated
// before the bad descriptor.
func walkChain(m *Mem, desc []byte, num uint16, head uint16, indirect bool, c *chain) error {
	c.reset(head)
	idx := head
	// Virtio 1.x 2.7.5.2: "A driver MUST NOT create a descriptor chain
	// longer than the Queue Size of the device." A longer walk is a loop.
	for n := 0; ; n++ {
		if idx >= num {
			return fmt.Errorf("descriptor index %d outside queue of %d", idx, num)
		}
		if n >= int(num) {
			return errChainLoop
		}
		d := virtio.ReadDesc(desc[int(idx)*virtio.DescSize:])
		if d.Flags&virtio.DescFlagIndirect != 0 {
			// 2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT
			// flag unless the VIRTIO_F_INDIRECT_DESC feature was negotiated",
			// and "MUST NOT set both VIRTQ_DESC_F_INDIRECT and
			// VIRTQ_DESC_F_NEXT in flags".
			if !indirect {
				return fmt.Errorf("%w: indirect descriptors not negotiated", errChainIndirect)
			}
			if d.Flags&virtio.DescFlagNext != 0 {
				return fmt.Errorf("%w: both INDIRECT and NEXT set", errChainIndirect)
			}
			return walkIndirect(m, d, c)
		}
		if err := c.add(m, d); err != nil {
			return err
		}
		if d.Flags&virtio.DescFlagNext == 0 {
			return nil
		}
		idx = d.Next
	}
}

// walkIndirect walks the indirect table of d.
func walkIndirect(m *Mem, d virtio.Desc, c *chain) error {
	// The table is an array of descriptors: its length must be a non-zero
	// multiple of 16 (libvhost-user: "Invalid size for indirect buffer
	// table"); we take at most maxSegments entries.
	if d.Len == 0 || d.Len%virtio.DescSize != 0 || d.Len/virtio.DescSize > maxSegments {
		return fmt.Errorf("%w: table of %d bytes", errChainIndirect, d.Len)
	}
	n := uint16(d.Len / virtio.DescSize)
	table, err := m.Slice(d.Addr, uint64(d.Len))
	if err != nil {
		return fmt.Errorf("%w: table: %v", errChainIndirect, err)
	}
	idx := uint16(0)
	for k := 0; ; k++ {
		if idx >= n {
			return fmt.Errorf("%w: index %d outside table of %d", errChainIndirect, idx, n)
		}
		if k >= int(n) {
			return errChainLoop
		}
		dd := virtio.ReadDesc(table[int(idx)*virtio.DescSize:])
		// 2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag
		// within an indirect descriptor (ie. only one table per descriptor)."
		if dd.Flags&virtio.DescFlagIndirect != 0 {
			return fmt.Errorf("%w: nested indirect table", errChainIndirect)
		}
		if err := c.add(m, dd); err != nil {
			return err
		}
		if dd.Flags&virtio.DescFlagNext == 0 {
			return nil
		}
		idx = dd.Next
	}
}

// add translates the buffer of one descriptor.
func (c *chain) add(m *Mem, d virtio.Desc) error {
	if d.Len == 0 {
		// QEMU's virtqueue_map_desc refuses zero-sized buffers too.
		return errors.New("zero-length descriptor")
	}
	write := d.Flags&virtio.DescFlagWrite != 0
	// 2.7.4.2: "The driver MUST place any device-writable descriptor
	// elements after any device-readable descriptor elements."
	if !write && len(c.segs) > c.nRead {
		return errors.New("device-readable descriptor after a device-writable one")
	}
	var err error
	c.segs, err = m.appendSegs(c.segs, d.Addr, uint64(d.Len), write, maxSegments)
	if !write {
		c.nRead = len(c.segs) // readable pieces stay first, even on error
	}
	if err != nil {
		return err
	}
	if write {
		c.wBytes += uint64(d.Len)
	} else {
		c.rBytes += uint64(d.Len)
	}
	return nil
}

// splitRing is the device side of one split virtqueue in guest memory. The
// avail side (lastAvail, avail_event) belongs to the goroutine that pops;
// the used side (usedIdx, used elements) to whoever holds the queue's used
// lock.
type splitRing struct {
	num      uint16
	desc     []byte
	avail    []byte
	used     []byte
	eventIdx bool
	indirect bool

	lastAvail uint16 // next avail entry to pop
	usedIdx   uint16 // next used entry to write
	pubIdx    uint16 // used idx last published
	// told is false from a (re)start until the first publish, which
	// notifies whatever the driver's used_event says (libvhost-user's
	// signalled_used_valid, QEMU's virtio too): completions published
	// before the restart, by an earlier connection or back-end process,
	// may never have been signalled, and used_event then lies behind the
	// used index where the event-idx test never fires again.
	told  bool
	fence uint32
}

// setup checks and translates the ring addresses (front-end user addresses)
// through m. It returns the guest address of the used ring.
func (r *splitRing) setup(m *Mem, num uint16, a wire.VringAddr) (usedGPA uint64, err error) {
	dn, an, un := virtio.RingSizes(int(num))
	desc, _, err := m.userSlice(a.Desc, uint64(dn))
	if err != nil {
		return 0, fmt.Errorf("descriptor table: %w", err)
	}
	avail, _, err := m.userSlice(a.Avail, uint64(an))
	if err != nil {
		return 0, fmt.Errorf("available ring: %w", err)
	}
	used, ugpa, err := m.userSlice(a.Used, uint64(un))
	if err != nil {
		return 0, fmt.Errorf("used ring: %w", err)
	}
	// The 32-bit atomics need the host addresses aligned as the guest ones.
	if uintptr(unsafe.Pointer(unsafe.SliceData(used)))%4 != 0 || uintptr(unsafe.Pointer(unsafe.SliceData(avail)))%2 != 0 {
		return 0, errors.New("ring memory misaligned in the back end's mapping")
	}
	r.num, r.desc, r.avail, r.used = num, desc, avail, used
	return ugpa, nil
}

// availIdx reads avail->idx (acquire).
func (r *splitRing) availIdx() uint16 {
	return virtio.Load16(r.avail, 2, &r.fence)
}

// availHead reads avail->ring[i % num].
func (r *splitRing) availHead(i uint16) uint16 {
	return virtio.Load16(r.avail, 4+2*int(i&(r.num-1)), &r.fence)
}

// availFlags reads avail->flags.
func (r *splitRing) availFlags() uint16 {
	return virtio.Load16(r.avail, 0, &r.fence)
}

// usedEvent reads used_event, after avail->ring.
func (r *splitRing) usedEvent() uint16 {
	return virtio.Load16(r.avail, 4+2*int(r.num), &r.fence)
}

// usedRingIdx reads used->idx as it is in guest memory.
func (r *splitRing) usedRingIdx() uint16 {
	_, idx := virtio.LoadWord(r.used)
	return idx
}

// setAvailEvent writes avail_event, after used->ring, followed by a full
// barrier so that the caller's next read of avail->idx is ordered after it.
func (r *splitRing) setAvailEvent(v uint16) {
	virtio.Store16(r.used, 4+8*int(r.num), v, &r.fence)
}

// pending returns how many entries the driver made available beyond
// lastAvail, or an error if the index moved by more than the queue size.
func (r *splitRing) pending() (uint16, error) {
	n := r.availIdx() - r.lastAvail
	if n > r.num {
		return 0, fmt.Errorf("available index moved %d entries past %d in a queue of %d", n, r.lastAvail, r.num)
	}
	return n, nil
}

// armKick asks for a kick when more entries become available and reports
// whether some already are (the caller then pops again). Virtio 1.x 2.7.10:
// with event idx the device writes avail_event; otherwise kicks are always
// on (this device never sets VIRTQ_USED_F_NO_NOTIFY).
func (r *splitRing) armKick() bool {
	if r.eventIdx {
		r.setAvailEvent(r.lastAvail)
	} else {
		atomic.AddUint32(&r.fence, 1)
	}
	return r.availIdx() != r.lastAvail
}

// putUsed writes one used element at usedIdx and advances it; the element
// becomes visible to the driver at the next publish. It returns the offset
// of the element in the used ring, for dirty logging.
func (r *splitRing) putUsed(id uint16, n uint32) int {
	off := 4 + 8*int(r.usedIdx&(r.num-1))
	e := r.used[off : off+8]
	le.PutUint32(e, uint32(id))
	le.PutUint32(e[4:], n)
	r.usedIdx++
	return off
}

// restart takes the used index the ring has in guest memory as the
// starting point of a queue (re)start.
func (r *splitRing) restart(used uint16) {
	r.usedIdx, r.pubIdx, r.told = used, used, false
}

// publish makes the used elements written since the last publish visible
// (a release store of used->idx) and reports whether the driver wants a
// notification (virtio 1.x 2.7.7.2, 2.7.10).
func (r *splitRing) publish() (notify bool) {
	old, new := r.pubIdx, r.usedIdx
	if old == new {
		return false
	}
	virtio.StoreWord(r.used, 0, new)
	r.pubIdx = new
	// storeWord is a full barrier: the reads below are ordered after it.
	if r.eventIdx {
		if !r.told {
			r.told = true
			return true
		}
		return virtio.NeedEvent(r.usedEvent(), new, old)
	}
	return r.availFlags()&virtio.AvailFlagNoInterrupt == 0
}

// salvageStatus finds the status byte of a chain that failed to walk, so
// that the driver still gets VIRTIO_BLK_S_IOERR: it follows the chain's
// links without translating buffers and returns the last byte of the last
// descriptor if that one is device-writable and inside guest memory. A chain
// that loops or leaves the table has no last descriptor.
func salvageStatus(m *Mem, desc []byte, num uint16, head uint16, indirect bool) ([]byte, uint64, bool) {
	table, n := desc, num
	idx := head
	inTable := false
	for k := 0; k <= int(maxSegments)+int(num); k++ {
		if idx >= n {
			return nil, 0, false
		}
		d := virtio.ReadDesc(table[int(idx)*virtio.DescSize:])
		if d.Flags&virtio.DescFlagIndirect != 0 {
			if inTable || !indirect || d.Flags&virtio.DescFlagNext != 0 || d.Len == 0 || d.Len%virtio.DescSize != 0 || d.Len/virtio.DescSize > maxSegments {
				return nil, 0, false
			}
			t, err := m.Slice(d.Addr, uint64(d.Len))
			if err != nil {
				return nil, 0, false
			}
			table, n, idx, inTable = t, uint16(d.Len/virtio.DescSize), 0, true
			continue
		}
		if d.Flags&virtio.DescFlagNext != 0 {
			idx = d.Next
			continue
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
	return nil, 0, false
}
