package vhost

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/mapper"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// This file is the virtio-blk device (virtio 1.x, 5.2): its features and
// config space, and the requestHandler the queue runtime (queue.go) calls:
// a request's header and layout checked (prepare), discard and
// write-zeroes ranges, and the mapping of each request to mapper requests
// (tryIO, io).

// Limits this device advertises in its config space.
const (
	blkSizeMax       = 1 << 20 // size_max: bytes per segment
	blkSegMax        = 126     // seg_max: data segments per request (QEMU's 128-entry queue minus 2)
	blkMaxDiscard    = 32768   // max_discard_sectors, as QEMU's VIRTIO_BLK_MAX_DISCARD_SECTORS
	blkMaxDiscardSeg = 16      // max_discard_seg
	blkMaxZeroes     = 32768   // max_write_zeroes_sectors
	blkMaxZeroesSeg  = 16      // max_write_zeroes_seg
)

// blkFeatures returns the virtio and vhost feature bits the export offers.
func (e *Export) blkFeatures() uint64 {
	f := uint64(virtio.FeatureVersion1 | virtio.FeatureEventIdx | virtio.FeatureIndirectDesc | virtio.FeatureRingPacked | virtio.FeatureLogAll | virtio.FeatureProtocolFeatures |
		virtio.BlkFeatureSizeMax | virtio.BlkFeatureSegMax | virtio.BlkFeatureBlkSize | virtio.BlkFeatureTopology | virtio.BlkFeatureFlush |
		virtio.BlkFeatureConfigWCE | virtio.BlkFeatureMQ)
	if e.readOnly {
		f |= virtio.BlkFeatureRO
	} else {
		if e.discard.Load() {
			f |= virtio.BlkFeatureDiscard
		}
		if e.zeroes.Load() {
			f |= virtio.BlkFeatureWriteZeroes
		}
	}
	return f
}

// blkDev is the virtio-blk device of one connection: its writable config
// and negotiated features, and the requestHandler of its queues. It never
// sees the socket or the rings.
type blkDev struct {
	exp       *Export
	writeback atomic.Bool // config writeback (CONFIG_WCE); true: writeback cache
	features  atomic.Uint64

	nowait NowaitDevice // the device's non-blocking submit, if it has one
}

func newBlkDev(e *Export) *blkDev {
	d := &blkDev{exp: e}
	d.nowait, _ = e.dev.(NowaitDevice)
	d.writeback.Store(true)
	return d
}

// blkReq is the virtio-blk state of one request in flight (request.blk).
type blkReq struct {
	typ     uint32
	sector  uint64
	data    [][]byte
	dataLen uint64
	nranges int
	mreq    mapper.Request
	buf     *blkBuf
}

// blkBuf is the reusable memory of one request in flight (chainBuf.blk):
// the data slices handed to the mapper and the discard ranges.
type blkBuf struct {
	data   [][]byte
	ranges [blkMaxDiscardSeg]blkRange
}

// acquire gives r the buffer b for the time it is in flight.
func (r *blkReq) acquire(b *blkBuf) {
	r.buf = b
	r.data = b.data[:0]
}

// release hands the buffer back into b, keeping what the request grew, and
// drops r's references to guest memory.
func (r *blkReq) release(b *blkBuf) {
	b.data = r.data[:0]
	r.data, r.buf = nil, nil
	r.mreq.Data = nil
}

// config returns struct virtio_blk_config (virtio 1.x, 5.2.4).
func (d *blkDev) config() [virtio.ConfigSpaceSize]byte {
	var c [virtio.ConfigSpaceSize]byte
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
	return d.writeback.Load() && d.features.Load()&virtio.BlkFeatureFlush != 0
}

// blkRange is one discard or write-zeroes segment.
type blkRange struct {
	sector  uint64
	sectors uint32
	flags   uint32
}

// prepare parses and checks the request header and layout. It returns
// async=true when the request needs I/O, else the status to complete with.
func (d *blkDev) prepare(q *queue, rq *request) (status byte, usedLen uint32, async bool) {
	c := &rq.chain
	r := &rq.blk
	// Virtio 1.x 5.2.6: the driver-readable header is 16 bytes; it may
	// span descriptors.
	var hdr [virtio.BlkHeaderSize]byte
	if c.rBytes < virtio.BlkHeaderSize {
		q.badRequest(c.head, fmt.Errorf("request header of %d bytes, want %d", c.rBytes, virtio.BlkHeaderSize))
		return virtio.BlkStatusIOErr, 1, false
	}
	copyFromSegs(hdr[:], c.segs[:c.nRead], 0)
	r.typ = le.Uint32(hdr[0:])
	r.sector = le.Uint64(hdr[8:])
	e := d.exp
	ro := e.readOnly
	switch r.typ {
	case virtio.BlkTypeIn:
		r.dataLen = c.wBytes - 1
		r.data = appendBufs(r.data[:0], c.segs[c.nRead:], 0, r.dataLen)
		if err := d.checkRange(r.sector, r.dataLen); err != nil {
			q.badRequest(c.head, err)
			return virtio.BlkStatusIOErr, 1, false
		}
		if r.dataLen == 0 {
			return virtio.BlkStatusOK, 1, false
		}
		r.mreq = mapper.Request{Op: mapper.OpRead, Sector: r.sector, Sectors: r.dataLen >> mapper.SectorShift, Data: r.data, Resident: q.mem.resident}
		return 0, 0, true
	case virtio.BlkTypeOut:
		if ro {
			return virtio.BlkStatusIOErr, 1, false
		}
		r.dataLen = c.rBytes - virtio.BlkHeaderSize
		r.data = appendBufs(r.data[:0], c.segs[:c.nRead], virtio.BlkHeaderSize, r.dataLen)
		if err := d.checkRange(r.sector, r.dataLen); err != nil {
			q.badRequest(c.head, err)
			return virtio.BlkStatusIOErr, 1, false
		}
		if r.dataLen == 0 {
			return virtio.BlkStatusOK, 1, false
		}
		r.mreq = mapper.Request{Op: mapper.OpWrite, Sector: r.sector, Sectors: r.dataLen >> mapper.SectorShift, Data: r.data, Resident: q.mem.resident}
		return 0, 0, true
	case virtio.BlkTypeFlush:
		r.mreq = mapper.Request{Op: mapper.OpFlush}
		return 0, 0, true
	case virtio.BlkTypeGetID:
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
		return virtio.BlkStatusOK, uint32(n) + 1, false
	case virtio.BlkTypeDiscard, virtio.BlkTypeWriteZeroes:
		if ro {
			return virtio.BlkStatusIOErr, 1, false
		}
		// 5.2.6.2: an operation the device does not serve (any more:
		// the table was reloaded) is UNSUPP, not IOERR.
		if (r.typ == virtio.BlkTypeDiscard && !e.discard.Load()) || (r.typ == virtio.BlkTypeWriteZeroes && !e.zeroes.Load()) {
			return virtio.BlkStatusUnsupp, 1, false
		}
		st, err := d.parseRanges(c, r)
		if err != nil {
			q.badRequest(c.head, err)
			return st, 1, false
		}
		return 0, 0, true
	}
	return virtio.BlkStatusUnsupp, 1, false
}

// checkRange checks a read or write of n bytes at sector: aligned to the
// logical block size and inside the capacity (QEMU's
// virtio_blk_sect_range_ok does the same checks).
func (d *blkDev) checkRange(sector, n uint64) error {
	lbs := uint64(d.exp.cfg.LogicalBlockSize)
	per := lbs / mapper.SectorSize
	if n%lbs != 0 {
		return fmt.Errorf("data of %d bytes is not a multiple of the block size %d", n, lbs)
	}
	if sector%per != 0 {
		return fmt.Errorf("sector %d is not aligned to the block size %d", sector, lbs)
	}
	cap := d.exp.capacity()
	sectors := n >> mapper.SectorShift
	if sector > cap || sectors > cap-sector {
		return fmt.Errorf("%d sectors at %d beyond capacity %d", sectors, sector, cap)
	}
	return nil
}

// parseRanges reads the discard or write-zeroes segments after the header
// (virtio 1.x 5.2.6: struct virtio_blk_discard_write_zeroes).
func (d *blkDev) parseRanges(c *chain, r *blkReq) (byte, error) {
	n := c.rBytes - virtio.BlkHeaderSize
	maxSeg, maxSectors := uint64(blkMaxDiscardSeg), uint64(blkMaxDiscard)
	if r.typ == virtio.BlkTypeWriteZeroes {
		maxSeg, maxSectors = blkMaxZeroesSeg, blkMaxZeroes
	}
	if n == 0 || n%virtio.BlkDiscardSize != 0 || n/virtio.BlkDiscardSize > maxSeg {
		return virtio.BlkStatusIOErr, fmt.Errorf("%d bytes of segments, want 1 to %d segments of %d", n, maxSeg, virtio.BlkDiscardSize)
	}
	r.nranges = int(n / virtio.BlkDiscardSize)
	lbs := uint64(d.exp.cfg.LogicalBlockSize)
	per := lbs / mapper.SectorSize
	cap := d.exp.capacity()
	var b [virtio.BlkDiscardSize]byte
	for i := 0; i < r.nranges; i++ {
		copyFromSegs(b[:], c.segs[:c.nRead], virtio.BlkHeaderSize+uint64(i)*virtio.BlkDiscardSize)
		rg := blkRange{sector: le.Uint64(b[0:]), sectors: le.Uint32(b[8:]), flags: le.Uint32(b[12:])}
		// 5.2.6.2: "the device MUST set the status byte to
		// VIRTIO_BLK_S_UNSUPP for discard commands if the unmap flag is
		// set" and for unknown flags.
		if rg.flags&^virtio.BlkDiscardUnmap != 0 || (r.typ == virtio.BlkTypeDiscard && rg.flags != 0) {
			return virtio.BlkStatusUnsupp, fmt.Errorf("segment %d: unsupported flags %#x", i, rg.flags)
		}
		if rg.sectors == 0 || uint64(rg.sectors) > maxSectors {
			return virtio.BlkStatusIOErr, fmt.Errorf("segment %d: %d sectors, want 1 to %d", i, rg.sectors, maxSectors)
		}
		if rg.sector%per != 0 || uint64(rg.sectors)%per != 0 {
			return virtio.BlkStatusIOErr, fmt.Errorf("segment %d: %d sectors at %d not aligned to the block size %d", i, rg.sectors, rg.sector, lbs)
		}
		if rg.sector > cap || uint64(rg.sectors) > cap-rg.sector {
			return virtio.BlkStatusIOErr, fmt.Errorf("segment %d: %d sectors at %d beyond capacity %d", i, rg.sectors, rg.sector, cap)
		}
		r.buf.ranges[i] = rg
	}
	return virtio.BlkStatusOK, nil
}

// io performs the I/O of a prepared request on a worker goroutine.
func (d *blkDev) io(q *queue, rq *request) (status byte, usedLen uint32) {
	r := &rq.blk
	dev := d.exp.dev
	var err error
	switch r.typ {
	case virtio.BlkTypeIn:
		err = dev.Submit(&r.mreq)
	case virtio.BlkTypeOut:
		err = dev.Submit(&r.mreq)
		if err == nil && !d.writebackOn() {
			// Writethrough: the write is durable before completion.
			r.mreq = mapper.Request{Op: mapper.OpFlush}
			err = dev.Submit(&r.mreq)
		}
	case virtio.BlkTypeFlush:
		err = dev.Submit(&r.mreq)
	case virtio.BlkTypeDiscard, virtio.BlkTypeWriteZeroes:
		for i := 0; i < r.nranges && err == nil; i++ {
			rg := r.buf.ranges[i]
			r.mreq = mapper.Request{Op: mapper.OpDiscard, Sector: rg.sector, Sectors: uint64(rg.sectors)}
			if r.typ == virtio.BlkTypeWriteZeroes {
				r.mreq.Op = mapper.OpWriteZeroes
				r.mreq.Unmap = rg.flags&virtio.BlkDiscardUnmap != 0
			}
			err = dev.Submit(&r.mreq)
		}
		if err == nil && r.typ == virtio.BlkTypeWriteZeroes && !d.writebackOn() {
			r.mreq = mapper.Request{Op: mapper.OpFlush}
			err = dev.Submit(&r.mreq)
		}
	default:
		return virtio.BlkStatusUnsupp, 1
	}
	return d.result(q, rq, err)
}

// result turns the outcome of r's I/O into its status and used length;
// a read's data is marked in the dirty log.
func (d *blkDev) result(q *queue, rq *request, err error) (status byte, usedLen uint32) {
	r := &rq.blk
	usedLen = 1
	if r.typ == virtio.BlkTypeIn {
		if err == nil && q.dlog != nil {
			for _, s := range rq.chain.segs[rq.chain.nRead:] {
				q.dlog.mark(s.gpa, uint64(len(s.b)))
			}
		}
		usedLen = uint32(min(r.dataLen+1, uint64(^uint32(0))))
	}
	r.mreq.Data = nil
	if err != nil {
		if errors.Is(err, mapper.ErrUnsupported) {
			return virtio.BlkStatusUnsupp, usedLen
		}
		if n := q.badLogs.Add(1); n <= 10 || n%1000 == 0 {
			q.log.Warn("virtio-blk request failed", "head", rq.chain.head, "type", r.typ, "sector", r.sector, "err", err)
		}
		return virtio.BlkStatusIOErr, usedLen
	}
	return virtio.BlkStatusOK, usedLen
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
