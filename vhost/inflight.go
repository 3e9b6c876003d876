package vhost

import (
	"fmt"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// Inflight I/O tracking (vhost-user.rst, "Inflight I/O tracking", split
// virtqueue). The back end creates a shared region on GET_INFLIGHT_FD; the
// front end keeps it and hands it back with SET_INFLIGHT_FD, also to a
// restarted back end, which resubmits what was in flight. The region is one
// QueueRegionSplit per queue, each padded to 64 bytes:
//
//	+0  u64 features        (0)
//	+8  u16 version         (1; 0 means not yet initialised)
//	+10 u16 desc_num        (queue size)
//	+12 u16 last_batch_head (list of the last batch of used heads)
//	+14 u16 used_idx        (used->idx after the last completed batch)
//	+16 DescStateSplit desc[desc_num], 16 bytes each:
//	    +0 u8 inflight, +1 u8 padding[5], +6 u16 next, +8 u64 counter
//
// The layout is private to the back end: the front end only stores it.

const (
	inflightVersion    = 1
	inflightHeaderSize = 16
	inflightDescSize   = 16
	inflightAlign      = 64
)

// inflightQueueBytes is the size of one queue's region: room for the split
// layout or the packed one (inflight_packed.go), as GET_INFLIGHT_FD comes
// before the features that choose between them.
func inflightQueueBytes(queueSize uint16) uint64 {
	n := uint64(inflightHeaderSize) + uint64(inflightDescSize)*uint64(queueSize)
	n = max(n, inflightPackedBytes(queueSize))
	return (n + inflightAlign - 1) &^ (inflightAlign - 1)
}

// inflightRegion is a mapped inflight region.
type inflightRegion struct {
	mapping   []byte
	data      []byte
	numQueues uint16
	queueSize uint16
}

// createInflight makes a new, zeroed region in a sealed memfd for
// GET_INFLIGHT_FD. The caller sends and then closes fd.
func createInflight(numQueues, queueSize uint16) (r *inflightRegion, fd int, d wire.InflightDesc, err error) {
	if numQueues == 0 || queueSize == 0 || queueSize > virtio.MaxQueueSize {
		return nil, -1, d, fmt.Errorf("inflight region for %d queues of %d: bad geometry", numQueues, queueSize)
	}
	size := uint64(numQueues) * inflightQueueBytes(queueSize)
	fd, err = unix.MemfdCreate("vhostdm-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, -1, d, fmt.Errorf("inflight region: memfd: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, -1, d, fmt.Errorf("inflight region: truncate: %w", err)
	}
	// Seal the size so that neither side can make the other fault.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		return nil, -1, d, fmt.Errorf("inflight region: seal: %w", err)
	}
	d = wire.InflightDesc{MmapSize: size, MmapOffset: 0, NumQueues: numQueues, QueueSize: queueSize}
	r, err = mapInflight(fd, d)
	if err != nil {
		unix.Close(fd)
		return nil, -1, d, err
	}
	return r, fd, d, nil
}

// mapInflight maps the region d describes from fd (SET_INFLIGHT_FD).
func mapInflight(fd int, d wire.InflightDesc) (*inflightRegion, error) {
	if d.NumQueues == 0 || d.QueueSize == 0 || d.QueueSize > virtio.MaxQueueSize {
		return nil, fmt.Errorf("inflight region for %d queues of %d: bad geometry", d.NumQueues, d.QueueSize)
	}
	need := uint64(d.NumQueues) * inflightQueueBytes(d.QueueSize)
	if d.MmapSize < need {
		return nil, fmt.Errorf("inflight region of %d bytes, %d queues of %d need %d", d.MmapSize, d.NumQueues, d.QueueSize, need)
	}
	// The back end reads the region at queue start on the connection
	// goroutine: a region the front end could shrink afterwards would
	// fault there. Every back end creates it sealed (this one,
	// libvhost-user), so an unsealed fd is refused.
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, fmt.Errorf("inflight region: not a sealed memfd: %w", err)
	}
	if seals&unix.F_SEAL_SHRINK == 0 {
		return nil, fmt.Errorf("inflight region: memfd not sealed against shrinking (seals %#x)", seals)
	}
	if d.MmapOffset > 1<<40 {
		return nil, fmt.Errorf("inflight region: offset %d too large", d.MmapOffset)
	}
	if err := checkFileSize(fd, d.MmapOffset, need); err != nil {
		return nil, fmt.Errorf("inflight region: %w", err)
	}
	page := uint64(os.Getpagesize())
	start := d.MmapOffset &^ (page - 1)
	delta := d.MmapOffset - start
	m, err := unix.Mmap(fd, int64(start), int(delta+need), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map inflight region: %w", err)
	}
	return &inflightRegion{mapping: m, data: m[delta:], numQueues: d.NumQueues, queueSize: d.QueueSize}, nil
}

func (r *inflightRegion) unmap() {
	if r != nil && r.mapping != nil {
		unix.Munmap(r.mapping)
		r.mapping, r.data = nil, nil
	}
}

// queue returns the tracking state of queue i, whose ring has num entries.
func (r *inflightRegion) queue(i int, num uint16) (*inflightQueue, error) {
	if i >= int(r.numQueues) {
		return nil, fmt.Errorf("inflight region has %d queues, not queue %d", r.numQueues, i)
	}
	if num != r.queueSize {
		return nil, fmt.Errorf("inflight region is for queues of %d, queue %d has %d", r.queueSize, i, num)
	}
	sz := inflightQueueBytes(num)
	return &inflightQueue{b: r.data[uint64(i)*sz : uint64(i+1)*sz], num: num}, nil
}

// inflightQueue is the tracking state of one queue. The pop side and the
// used side both touch it under the queue's used lock.
type inflightQueue struct {
	b       []byte
	num     uint16
	counter uint64
}

func (q *inflightQueue) desc(i uint16) []byte {
	o := inflightHeaderSize + int(i)*inflightDescSize
	return q.b[o : o+inflightDescSize]
}

// start prepares the region when the ring starts. usedIdx is used->idx in
// guest memory and base the front end's SET_VRING_BASE. A fresh region is
// initialised and base kept; a region left by an earlier back end is
// repaired and its in-flight heads are returned in submission order, with
// the next avail index to pop: every head popped is either used or in
// flight, so that index is usedIdx plus the number in flight.
func (q *inflightQueue) start(usedIdx, base uint16) (lastAvail uint16, resubmit []uint16, recovered bool) {
	version := le.Uint16(q.b[8:])
	descNum := le.Uint16(q.b[10:])
	if version != inflightVersion || descNum != q.num {
		clear(q.b)
		le.PutUint16(q.b[8:], inflightVersion)
		le.PutUint16(q.b[10:], q.num)
		le.PutUint16(q.b[14:], usedIdx)
		return base, nil, false
	}
	// "If the value of used_idx does not match the idx value of used ring
	// ... Set the inflight field of each DescStateSplit entry to 0 in last
	// batch list which starts from last_batch_head."
	if old := le.Uint16(q.b[14:]); old != usedIdx {
		k := usedIdx - old
		i := le.Uint16(q.b[12:])
		for n := uint16(0); n < k && n < q.num && i < q.num; n++ {
			d := q.desc(i)
			d[0] = 0
			i = le.Uint16(d[6:])
		}
		le.PutUint16(q.b[14:], usedIdx)
	}
	// "Resubmit inflight DescStateSplit entries in order of their counter
	// value."
	type ent struct {
		head    uint16
		counter uint64
	}
	var ents []ent
	for i := uint16(0); i < q.num; i++ {
		d := q.desc(i)
		if d[0] == 1 {
			c := le.Uint64(d[8:])
			ents = append(ents, ent{i, c})
			q.counter = max(q.counter, c+1)
		} else if d[0] != 0 {
			d[0] = 0
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
		resubmit = append(resubmit, e.head)
	}
	return usedIdx + uint16(len(ents)), resubmit, true
}

// popped records head as in flight: "Set desc[i].counter to the value of
// global counter; Increase global counter by 1; Set desc[i].inflight to 1".
func (q *inflightQueue) popped(head uint16) {
	d := q.desc(head)
	le.PutUint64(d[8:], q.counter)
	q.counter++
	d[0] = 1
}

// link adds head to the batch being pushed: "Set desc[i].next to
// last_batch_head; Set last_batch_head to i". Call before used->idx moves.
func (q *inflightQueue) link(head uint16) {
	le.PutUint16(q.desc(head)[6:], le.Uint16(q.b[12:]))
	le.PutUint16(q.b[12:], head)
}

// pushed completes a batch after used->idx moved to usedIdx: "Set the
// inflight field of each DescStateSplit entry in the batch to 0; Set
// used_idx to the idx value of used ring".
func (q *inflightQueue) pushed(heads []uint16, usedIdx uint16) {
	for _, h := range heads {
		q.desc(h)[0] = 0
	}
	le.PutUint16(q.b[14:], usedIdx)
}
