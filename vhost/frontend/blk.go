package frontend

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// BlkConfig is struct virtio_blk_config as read with GET_CONFIG.
type BlkConfig struct {
	Capacity              uint64 // 512-byte sectors
	SizeMax               uint32
	SegMax                uint32
	BlkSize               uint32
	PhysicalBlockExp      uint8
	AlignmentOffset       uint8
	MinIOSize             uint16
	OptIOSize             uint32
	Writeback             uint8
	NumQueues             uint16
	MaxDiscardSectors     uint32
	MaxDiscardSeg         uint32
	DiscardSectorAlign    uint32
	MaxWriteZeroesSectors uint32
	MaxWriteZeroesSeg     uint32
	WriteZeroesMayUnmap   uint8
}

// ParseBlkConfig decodes a config space prefix; missing fields are zero.
func ParseBlkConfig(b []byte) BlkConfig {
	var c [virtio.ConfigSpaceSize]byte
	copy(c[:], b)
	return BlkConfig{
		Capacity: le.Uint64(c[0:]), SizeMax: le.Uint32(c[8:]), SegMax: le.Uint32(c[12:]),
		BlkSize: le.Uint32(c[20:]), PhysicalBlockExp: c[24], AlignmentOffset: c[25],
		MinIOSize: le.Uint16(c[26:]), OptIOSize: le.Uint32(c[28:]), Writeback: c[32],
		NumQueues: le.Uint16(c[34:]), MaxDiscardSectors: le.Uint32(c[36:]), MaxDiscardSeg: le.Uint32(c[40:]),
		DiscardSectorAlign: le.Uint32(c[44:]), MaxWriteZeroesSectors: le.Uint32(c[48:]),
		MaxWriteZeroesSeg: le.Uint32(c[52:]), WriteZeroesMayUnmap: c[56],
	}
}

// Range is one discard or write-zeroes segment.
type Range struct {
	Sector  uint64
	Sectors uint32
	Flags   uint32 // BlkDiscardUnmap for write-zeroes
}

// Virtio-blk values a caller of Submit uses (virtio 1.x, 5.2).
const (
	BlkTypeIn          = virtio.BlkTypeIn
	BlkTypeOut         = virtio.BlkTypeOut
	BlkTypeFlush       = virtio.BlkTypeFlush
	BlkTypeGetID       = virtio.BlkTypeGetID
	BlkTypeDiscard     = virtio.BlkTypeDiscard
	BlkTypeWriteZeroes = virtio.BlkTypeWriteZeroes
	BlkStatusOK        = virtio.BlkStatusOK
	BlkStatusIOErr     = virtio.BlkStatusIOErr
	BlkStatusUnsupp    = virtio.BlkStatusUnsupp
	// BlkDiscardUnmap is VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
	BlkDiscardUnmap = virtio.BlkDiscardUnmap
	// BlkFeatureRO is the read-only device feature, in Features.
	BlkFeatureRO = virtio.BlkFeatureRO
)

// BlkRequest is one virtio-blk request. Data buffers must be guest memory
// (from Client.Buf): they are device-writable for IN and GET_ID,
// device-readable otherwise.
type BlkRequest struct {
	Type   uint32
	Sector uint64
	Data   [][]byte
	Ranges []Range // DISCARD, WRITE_ZEROES
}

// Result is the outcome of a request: the status byte the device wrote and
// the used length it reported, or Err if the request never completed.
type Result struct {
	Status uint8
	Len    uint32
	Err    error
}

// StatusError is a request completed with a status other than OK.
type StatusError struct{ Status uint8 }

func (e *StatusError) Error() string {
	switch e.Status {
	case virtio.BlkStatusIOErr:
		return "virtio-blk status IOERR"
	case virtio.BlkStatusUnsupp:
		return "virtio-blk status UNSUPP"
	}
	return fmt.Sprintf("virtio-blk status %d", e.Status)
}

// Submit makes r available on queue q; done is called with the result on
// the queue's completion goroutine. It returns ErrRingFull when the ring
// has no room.
func (c *Client) Submit(q int, r *BlkRequest, done func(Result)) error {
	if q < 0 || q >= len(c.queues) {
		return fmt.Errorf("vhost client: queue %d of %d", q, len(c.queues))
	}
	cq := c.queues[q]
	var descs [maxSlotTable]virtio.Desc
	n := 0
	// Header, written into the head's slot once the head is known.
	descs[n] = virtio.Desc{Len: virtio.BlkHeaderSize}
	n++
	dataWrite := r.Type == virtio.BlkTypeIn || r.Type == virtio.BlkTypeGetID
	for _, b := range r.Data {
		g, ok := c.GuestAddr(b)
		if !ok {
			return errors.New("vhost client: request data is not guest memory")
		}
		if n >= maxSlotTable-2 {
			return errors.New("vhost client: too many data buffers")
		}
		d := virtio.Desc{Addr: g, Len: uint32(len(b))}
		if dataWrite {
			d.Flags = virtio.DescFlagWrite
		}
		descs[n] = d
		n++
	}
	if len(r.Ranges) > 0 {
		if len(r.Ranges) > (slotTableOff-slotRangesOff)/virtio.BlkDiscardSize {
			return errors.New("vhost client: too many ranges")
		}
		descs[n] = virtio.Desc{Len: uint32(len(r.Ranges) * virtio.BlkDiscardSize)}
		n++
	}
	descs[n] = virtio.Desc{Len: 1, Flags: virtio.DescFlagWrite}
	n++
	indirect := c.cfg.Indirect && c.features&virtio.FeatureIndirectDesc != 0
	if cq.pk != nil {
		return cq.submitPacked(descs[:n], indirect, func(slot []byte, sg uint64) { fillSlot(slot, sg, r, descs[:n]) }, done)
	}
	ring := n
	if indirect {
		ring = 1
	}
	cq.mu.Lock()
	if cq.dead {
		cq.mu.Unlock()
		return ErrClientClosed
	}
	if len(cq.free) < ring {
		cq.mu.Unlock()
		return ErrRingFull
	}
	idx := cq.free[len(cq.free)-ring:]
	cq.free = cq.free[:len(cq.free)-ring]
	head := idx[len(idx)-1]
	slot := cq.slots[int(head)*slotSize : (int(head)+1)*slotSize]
	sg := cq.sGPA + uint64(head)*slotSize
	fillSlot(slot, sg, r, descs[:n])
	used := make([]uint16, ring)
	copy(used, idx)
	if indirect {
		for i := 0; i < n; i++ {
			d := descs[i]
			if i < n-1 {
				d.Flags |= virtio.DescFlagNext
				d.Next = uint16(i + 1)
			}
			virtio.WriteDesc(slot[slotTableOff+i*virtio.DescSize:], d)
		}
		virtio.WriteDesc(cq.desc[int(head)*virtio.DescSize:], virtio.Desc{Addr: sg + slotTableOff, Len: uint32(n * virtio.DescSize), Flags: virtio.DescFlagIndirect})
	} else {
		// Chain head first: head, then the other indices in order.
		order := make([]uint16, 0, n)
		order = append(order, head)
		for i := 0; i < n-1; i++ {
			order = append(order, idx[i])
		}
		for i := 0; i < n; i++ {
			d := descs[i]
			if i < n-1 {
				d.Flags |= virtio.DescFlagNext
				d.Next = order[i+1]
			}
			virtio.WriteDesc(cq.desc[int(order[i])*virtio.DescSize:], d)
		}
	}
	cq.pend[head] = clientPending{inUse: true, descs: used, done: done}
	cq.publishLocked(head)
	return nil
}

// fillSlot writes r's header, status and ranges into its slot (guest
// address sg) and points descs at them.
func fillSlot(slot []byte, sg uint64, r *BlkRequest, descs []virtio.Desc) {
	n := len(descs)
	le.PutUint32(slot[0:], r.Type)
	le.PutUint32(slot[4:], 0)
	le.PutUint64(slot[8:], r.Sector)
	slot[slotStatusOff] = 0xff
	descs[0].Addr = sg
	descs[n-1].Addr = sg + slotStatusOff
	if len(r.Ranges) > 0 {
		for i, rg := range r.Ranges {
			o := slotRangesOff + i*virtio.BlkDiscardSize
			le.PutUint64(slot[o:], rg.Sector)
			le.PutUint32(slot[o+8:], rg.Sectors)
			le.PutUint32(slot[o+12:], rg.Flags)
		}
		descs[n-2].Addr = sg + slotRangesOff
	}
}

// Do submits r on queue q and waits for its result, waiting for ring space
// if needed.
func (c *Client) Do(ctx context.Context, q int, r *BlkRequest) (Result, error) {
	ch := make(chan Result, 1)
	for {
		err := c.Submit(q, r, func(res Result) { ch <- res })
		if err == nil {
			break
		}
		if !errors.Is(err, ErrRingFull) {
			return Result{}, err
		}
		select {
		case <-c.queues[q].space:
		case <-ctx.Done():
			return Result{}, ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	select {
	case res := <-ch:
		return res, res.Err
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// do runs a request with data copied through guest memory when p is not
// guest memory already, and turns a bad status into an error.
func (c *Client) do(ctx context.Context, q int, typ uint32, sector uint64, p []byte, ranges []Range) (Result, error) {
	r := &BlkRequest{Type: typ, Sector: sector, Ranges: ranges}
	var bounce []byte
	if len(p) > 0 {
		if _, ok := c.GuestAddr(p); ok {
			r.Data = [][]byte{p}
		} else {
			b, err := c.Buf(len(p))
			if err != nil {
				return Result{}, err
			}
			defer c.FreeBuf(b)
			if typ == virtio.BlkTypeOut {
				copy(b, p)
			}
			bounce = b
			r.Data = [][]byte{b}
		}
	}
	res, err := c.Do(ctx, q, r)
	if err != nil {
		return res, err
	}
	if bounce != nil && (typ == virtio.BlkTypeIn || typ == virtio.BlkTypeGetID) {
		copy(p, bounce)
	}
	if res.Status != virtio.BlkStatusOK {
		return res, &StatusError{Status: res.Status}
	}
	return res, nil
}

// ReadAt reads len(p) bytes at sector on queue q.
func (c *Client) ReadAt(ctx context.Context, q int, p []byte, sector uint64) error {
	_, err := c.do(ctx, q, virtio.BlkTypeIn, sector, p, nil)
	return err
}

// WriteAt writes p at sector on queue q.
func (c *Client) WriteAt(ctx context.Context, q int, p []byte, sector uint64) error {
	_, err := c.do(ctx, q, virtio.BlkTypeOut, sector, p, nil)
	return err
}

// Flush sends a flush on queue q.
func (c *Client) Flush(ctx context.Context, q int) error {
	_, err := c.do(ctx, q, virtio.BlkTypeFlush, 0, nil, nil)
	return err
}

// Discard discards sectors at sector.
func (c *Client) Discard(ctx context.Context, q int, sector uint64, sectors uint32) error {
	_, err := c.do(ctx, q, virtio.BlkTypeDiscard, 0, nil, []Range{{Sector: sector, Sectors: sectors}})
	return err
}

// WriteZeroes zeroes sectors at sector, letting the device deallocate them
// if unmap is set.
func (c *Client) WriteZeroes(ctx context.Context, q int, sector uint64, sectors uint32, unmap bool) error {
	rg := Range{Sector: sector, Sectors: sectors}
	if unmap {
		rg.Flags = virtio.BlkDiscardUnmap
	}
	_, err := c.do(ctx, q, virtio.BlkTypeWriteZeroes, 0, nil, []Range{rg})
	return err
}

// GetID returns the device's serial (GET_ID), without NUL padding.
func (c *Client) GetID(ctx context.Context, q int) (string, error) {
	var id [virtio.BlkIDBytes]byte
	if _, err := c.do(ctx, q, virtio.BlkTypeGetID, 0, id[:], nil); err != nil {
		return "", err
	}
	n := 0
	for n < len(id) && id[n] != 0 {
		n++
	}
	return string(id[:n]), nil
}
