package snapshot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// The persistent exception store's on-disk format (the kernel's
// dm-snap-persistent.c, SNAPSHOT_DISK_VERSION 1). All fields little-endian,
// positions in chunks of chunkSize sectors:
//
//	chunk 0            header: u32 magic "SnAp" (0x70416e53), u32 valid,
//	                   u32 version (1), u32 chunk_size (sectors); rest zero
//	chunk 1            metadata area 0: exceptionsPerArea entries
//	                   {u64 old_chunk, u64 new_chunk}; new_chunk 0 ends the list
//	chunks 2..         data chunks of area 0 (exceptionsPerArea of them)
//	chunk 1+stride*i   metadata area i, stride = exceptionsPerArea+1
//
// A new exception's data is written, the device flushed, and only then the
// area naming it is written and flushed: an entry on disk always names data
// that is there. When an area fills, the next one is zeroed on disk before
// the full area is committed, so that a reader stops there.
const (
	snapMagic         = 0x70416e53
	snapDiskVersion   = 1
	diskExceptionSize = 16
	hdrChunks         = 1  // the header's chunks before area 0
	defaultChunk      = 32 // sectors: the kernel's DM_CHUNK_SIZE_DEFAULT_SECTORS
	maxChunk          = (1<<31 - 1) >> mapper.SectorShift
)

// errNoSpace is returned by prepare when the COW device is full.
var errNoSpace = errors.New("no free chunk in the COW device")

// store is an exception store: where a snapshot's exceptions are kept. The
// snapshot serialises prepare, drop, usage and the merge calls with its
// own lock; commit may run concurrently with everything and batches.
type store interface {
	// chunkSize returns the chunk size in sectors (a power of two).
	chunkSize() uint64
	// read loads the exceptions, calling add for each in commit order,
	// and reports whether the store is valid.
	read(add func(old, new uint64)) (valid bool, err error)
	// prepare allocates a chunk for a new exception, or errNoSpace.
	prepare() (newChunk uint64, err error)
	// commit makes the exception durable; its data must be written.
	commit(old, new uint64) error
	// drop marks the store invalid, on disk too.
	drop()
	// usage returns sectors allocated, total and metadata, as status shows.
	usage() (allocated, total, metadata uint64)
	// prepareMerge returns the last committed exception and how many
	// before it are consecutive (both chunks one less each time): 0 when
	// nothing is left to merge.
	prepareMerge() (lastOld, lastNew uint64, n int, err error)
	// commitMerge forgets the last n exceptions, durably.
	commitMerge(n int) error
	// table returns the TABLE words of the store: "P 8", "PO 8" or "N 8".
	table() string
}

// persistent is the kernel-compatible persistent store.
type persistent struct {
	// Immutable after read.
	cow        mapper.Backend
	chunk      uint64 // sectors
	overflowOK bool   // PO: overflow does not invalidate
	epa        uint64 // exceptions per area
	tableChunk uint64 // the chunk size the table gave (0: none)
	log        *slog.Logger

	// Guarded by mu: allocation and the merge cursor's view of next free.
	mu       sync.Mutex
	nextFree uint64 // chunks
	valid    bool

	// Guarded by cmu: the current area and the commit queue.
	cmu         sync.Mutex
	area        []byte // current area's content
	currentArea uint64
	committed   uint64 // entries in area
	queue       []*commitReq
	committing  bool
}

type commitReq struct {
	old, new uint64
	err      error
	done     chan struct{}
}

func newPersistent(cow mapper.Backend, chunk uint64, overflowOK bool, log *slog.Logger) *persistent {
	return &persistent{cow: cow, chunk: chunk, tableChunk: chunk, overflowOK: overflowOK, valid: true, nextFree: hdrChunks + 1, log: log}
}

func (p *persistent) chunkSize() uint64 { return p.chunk }

func (p *persistent) table() string {
	if p.overflowOK {
		return fmt.Sprintf("PO %d", p.chunk)
	}
	return fmt.Sprintf("P %d", p.chunk)
}

func (p *persistent) chunkBytes() int { return int(p.chunk << mapper.SectorShift) }

func (p *persistent) areaLocation(area uint64) uint64 { return hdrChunks + (p.epa+1)*area }

func (p *persistent) chunkIO(write bool, chunk uint64, buf []byte) error {
	off := int64(chunk*p.chunk) << mapper.SectorShift
	if write {
		return p.cow.WriteAt([][]byte{buf}, off)
	}
	return p.cow.ReadAt([][]byte{buf}, off)
}

func (p *persistent) cowChunks() (uint64, error) {
	size, err := p.cow.Size()
	if err != nil {
		return 0, err
	}
	return uint64(size) >> mapper.SectorShift / p.chunk, nil
}

func (p *persistent) writeHeader(valid bool) error {
	buf := make([]byte, p.chunkBytes())
	binary.LittleEndian.PutUint32(buf[0:], snapMagic)
	v := uint32(0)
	if valid {
		v = 1
	}
	binary.LittleEndian.PutUint32(buf[4:], v)
	binary.LittleEndian.PutUint32(buf[8:], snapDiskVersion)
	binary.LittleEndian.PutUint32(buf[12:], uint32(p.chunk))
	if err := p.chunkIO(true, 0, buf); err != nil {
		return err
	}
	return p.cow.Flush()
}

func (p *persistent) read(add func(old, new uint64)) (bool, error) {
	hdr := make([]byte, mapper.SectorSize)
	if err := p.cow.ReadAt([][]byte{hdr}, 0); err != nil {
		return false, fmt.Errorf("read snapshot header: %w", err)
	}
	magic := binary.LittleEndian.Uint32(hdr)
	if magic == 0 {
		// A new snapshot: write the header and an empty area 0.
		if p.chunk == 0 {
			p.chunk = defaultChunk
		}
		p.epa = uint64(p.chunkBytes()) / diskExceptionSize
		if n, err := p.cowChunks(); err != nil {
			return false, err
		} else if n < hdrChunks+1 {
			return false, fmt.Errorf("COW device %s: smaller than header and first area (%d sectors)", p.cow.Name(), 2*p.chunk)
		}
		p.area = make([]byte, p.chunkBytes())
		if err := p.chunkIO(true, p.areaLocation(0), p.area); err != nil {
			return false, fmt.Errorf("zero first area: %w", err)
		}
		if err := p.writeHeader(true); err != nil {
			return false, fmt.Errorf("write snapshot header: %w", err)
		}
		return true, nil
	}
	if magic != snapMagic {
		return false, mapper.Errorf(mapper.ErrCorrupt, "COW device %s: invalid or corrupt snapshot (magic %#x)", p.cow.Name(), magic)
	}
	valid := binary.LittleEndian.Uint32(hdr[4:]) != 0
	version := binary.LittleEndian.Uint32(hdr[8:])
	chunk := uint64(binary.LittleEndian.Uint32(hdr[12:]))
	if chunk == 0 || chunk&(chunk-1) != 0 || chunk > maxChunk {
		return false, mapper.Errorf(mapper.ErrCorrupt, "COW device %s: invalid on-disk chunk size %d", p.cow.Name(), chunk)
	}
	if p.chunk != 0 && p.chunk != chunk {
		p.log.Warn("chunk size in device metadata overrides table chunk size", "metadata", chunk, "table", p.chunk)
	}
	p.chunk = chunk
	p.epa = uint64(p.chunkBytes()) / diskExceptionSize
	p.valid = valid
	if !valid {
		return false, nil
	}
	if version != snapDiskVersion {
		return false, mapper.Errorf(mapper.ErrCorrupt, "COW device %s: unable to handle snapshot disk version %d", p.cow.Name(), version)
	}
	total, err := p.cowChunks()
	if err != nil {
		return false, err
	}
	p.area = make([]byte, p.chunkBytes())
	for area := uint64(0); ; area++ {
		loc := p.areaLocation(area)
		if loc >= total {
			return false, mapper.Errorf(mapper.ErrCorrupt, "COW device %s: metadata area %d at chunk %d beyond the device", p.cow.Name(), area, loc)
		}
		if err := p.chunkIO(false, loc, p.area); err != nil {
			return false, fmt.Errorf("read metadata area %d: %w", area, err)
		}
		p.currentArea = area
		for i := uint64(0); i < p.epa; i++ {
			old := binary.LittleEndian.Uint64(p.area[i*diskExceptionSize:])
			nw := binary.LittleEndian.Uint64(p.area[i*diskExceptionSize+8:])
			if nw == 0 {
				p.committed = i
				p.skipMetadata()
				return true, nil
			}
			if nw >= total || nw%(p.epa+1) == hdrChunks {
				return false, mapper.Errorf(mapper.ErrCorrupt, "COW device %s: exception %d->%d: new chunk outside data chunks", p.cow.Name(), old, nw)
			}
			if p.nextFree <= nw {
				p.nextFree = nw + 1
			}
			add(old, nw)
		}
	}
}

// skipMetadata moves nextFree past a metadata area's chunk.
func (p *persistent) skipMetadata() {
	if p.nextFree%(p.epa+1) == hdrChunks {
		p.nextFree++
	}
}

func (p *persistent) prepare() (uint64, error) {
	total, err := p.cowChunks()
	if err != nil {
		return 0, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if total < p.nextFree+1 {
		return 0, errNoSpace
	}
	c := p.nextFree
	p.nextFree++
	p.skipMetadata()
	return c, nil
}

// commit queues the exception and waits for it to be on disk. The first
// committer writes the queue for everyone waiting (group commit: one flush
// pair for many exceptions, as the kernel batches pending exceptions).
func (p *persistent) commit(old, new uint64) error {
	req := &commitReq{old: old, new: new, done: make(chan struct{})}
	p.cmu.Lock()
	p.queue = append(p.queue, req)
	if p.committing {
		p.cmu.Unlock()
		<-req.done
		return req.err
	}
	p.committing = true
	for len(p.queue) > 0 {
		batch := p.queue
		p.queue = nil
		err := p.writeBatch(batch)
		for _, r := range batch {
			r.err = err
			close(r.done)
		}
	}
	p.committing = false
	p.cmu.Unlock()
	return req.err
}

// writeBatch adds entries to the current area and writes it; called with
// cmu held.
func (p *persistent) writeBatch(batch []*commitReq) error {
	p.mu.Lock()
	valid := p.valid
	p.mu.Unlock()
	if !valid {
		return errors.New("snapshot store is invalid")
	}
	// Preflush: the data chunks the entries name are durable first.
	err := p.cow.Flush()
	dirty := false
	for _, r := range batch {
		if err != nil {
			break
		}
		i := p.committed
		binary.LittleEndian.PutUint64(p.area[i*diskExceptionSize:], r.old)
		binary.LittleEndian.PutUint64(p.area[i*diskExceptionSize+8:], r.new)
		p.committed++
		dirty = true
		if p.committed == p.epa {
			// Zero the next area, then commit the full one.
			zero := make([]byte, p.chunkBytes())
			if err = p.chunkIO(true, p.areaLocation(p.currentArea+1), zero); err != nil {
				break
			}
			if err = p.writeArea(); err != nil {
				break
			}
			p.currentArea++
			p.committed = 0
			clear(p.area)
			dirty = false
		}
	}
	if err == nil && dirty {
		err = p.writeArea()
	}
	if err != nil {
		p.mu.Lock()
		p.valid = false
		p.mu.Unlock()
		return fmt.Errorf("commit exceptions: %w", err)
	}
	return nil
}

// writeArea writes the current area with flushes around it (REQ_PREFLUSH
// and REQ_FUA in the kernel).
func (p *persistent) writeArea() error {
	if err := p.cow.Flush(); err != nil {
		return err
	}
	if err := p.chunkIO(true, p.areaLocation(p.currentArea), p.area); err != nil {
		return err
	}
	return p.cow.Flush()
}

func (p *persistent) drop() {
	p.mu.Lock()
	p.valid = false
	p.mu.Unlock()
	if err := p.writeHeader(false); err != nil {
		p.log.Warn("write header failed", "err", err)
	}
}

func (p *persistent) usage() (allocated, total, metadata uint64) {
	size, _ := p.cow.Size()
	p.mu.Lock()
	nf := p.nextFree
	p.mu.Unlock()
	p.cmu.Lock()
	area := p.currentArea
	p.cmu.Unlock()
	return nf * p.chunk, uint64(size) >> mapper.SectorShift, (area + 1 + hdrChunks) * p.chunk
}

func (p *persistent) entry(i uint64) (old, new uint64) {
	return binary.LittleEndian.Uint64(p.area[i*diskExceptionSize:]), binary.LittleEndian.Uint64(p.area[i*diskExceptionSize+8:])
}

func (p *persistent) prepareMerge() (uint64, uint64, int, error) {
	p.cmu.Lock()
	defer p.cmu.Unlock()
	if p.committed == 0 {
		if p.currentArea == 0 {
			return 0, 0, 0, nil
		}
		p.currentArea--
		if err := p.chunkIO(false, p.areaLocation(p.currentArea), p.area); err != nil {
			return 0, 0, 0, err
		}
		p.committed = p.epa
	}
	lastOld, lastNew := p.entry(p.committed - 1)
	n := uint64(1)
	for ; n < p.committed; n++ {
		o, nw := p.entry(p.committed - 1 - n)
		if o != lastOld-n || nw != lastNew-n {
			break
		}
	}
	return lastOld, lastNew, int(n), nil
}

func (p *persistent) commitMerge(n int) error {
	p.cmu.Lock()
	defer p.cmu.Unlock()
	if uint64(n) > p.committed {
		return fmt.Errorf("merge of %d exceptions: only %d in the area", n, p.committed)
	}
	for i := 0; i < n; i++ {
		j := p.committed - 1 - uint64(i)
		clear(p.area[j*diskExceptionSize : (j+1)*diskExceptionSize])
	}
	if err := p.writeArea(); err != nil {
		return err
	}
	p.committed -= uint64(n)
	p.mu.Lock()
	p.nextFree = p.areaLocation(p.currentArea) + p.committed + 1
	p.mu.Unlock()
	return nil
}

// transient keeps exceptions in memory only (the N store): nothing is
// written to the COW device but the data chunks, from chunk 0.
type transient struct {
	cow   mapper.Backend
	chunk uint64

	mu       sync.Mutex
	nextFree uint64 // sectors
}

func (t *transient) chunkSize() uint64                        { return t.chunk }
func (t *transient) table() string                            { return fmt.Sprintf("N %d", t.chunk) }
func (t *transient) read(func(old, new uint64)) (bool, error) { return true, nil }
func (t *transient) commit(old, new uint64) error             { return nil }
func (t *transient) drop()                                    {}

func (t *transient) prepare() (uint64, error) {
	size, err := t.cow.Size()
	if err != nil {
		return 0, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if uint64(size)>>mapper.SectorShift < t.nextFree+t.chunk {
		return 0, errNoSpace
	}
	c := t.nextFree / t.chunk
	t.nextFree += t.chunk
	return c, nil
}

func (t *transient) usage() (allocated, total, metadata uint64) {
	size, _ := t.cow.Size()
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nextFree, uint64(size) >> mapper.SectorShift, 0
}

func (t *transient) prepareMerge() (uint64, uint64, int, error) {
	return 0, 0, 0, errors.New("transient store cannot merge")
}

func (t *transient) commitMerge(int) error { return errors.New("transient store cannot merge") }
