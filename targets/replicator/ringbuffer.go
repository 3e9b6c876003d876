package replicator

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"sort"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// The ringbuffer replication log (our on-disk format; dm-replicator was
// never merged, so there is no reference format to match). All integers
// are little-endian; offsets are bytes from the start of the log device.
//
//	dev_start + 0     header slot 0 (one sector)
//	dev_start + 512   header slot 1 (one sector)
//	dev_start + 4096  ring of entries, to dev_start + size*512
//
// Header slot (the valid slot with the higher generation wins, so a torn
// header write leaves the other slot in force):
//
//	0   u32 magic "RPLG" (0x474c5052)   4   u32 version 1
//	8   u64 generation                   16  u64 size (sectors, header included)
//	24  u64 log id (random, per create)  32  u64 epoch (one more per open)
//	40  u64 tail offset                  48  u64 tail sequence (first live entry)
//	56  u32 number of sites              60  u32 zero
//	64  sites: {u32 slink_nr, u32 zero, u64 applied sequence} x 24
//	508 u32 CRC-32C of bytes 0..507
//
// Entry: a one-sector header followed, for writes, by the data:
//
//	0   u32 magic "RPLE" (0x454c5052)   4   u8 kind (1 write, 2 discard,
//	                                        3 write-zeroes, 4 wrap), 3 zero
//	8   u64 sequence                     16  u64 epoch
//	24  u64 log id                       32  u32 dev_nr, 4 zero
//	40  u64 sector                       48  u64 sectors
//	56  u32 CRC-32C of the data          508 u32 CRC-32C of bytes 0..507
//
// Entries never straddle the end of the ring: one that does not fit before
// the end is preceded by a wrap marker (an entry header of kind 4 with the
// entry's sequence) and written at the ring's start. Recovery starts at the
// header's tail and accepts entries while the sequence is the expected one,
// the log id matches, the epoch does not go backwards nor reach the current
// open's, and both checksums hold; the first entry that fails ends the log.
const (
	ringMagic      = 0x474c5052
	entryMagic     = 0x454c5052
	ringVersion    = 1
	ringDataOffset = 4096 // bytes from dev_start to the first entry
	maxSites       = 24
	minLogSectors  = 64

	kindWrite  = 1
	kindDiscrd = 2
	kindZeroes = 3
	kindWrap   = 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func init() {
	LogTypes.Register("ringbuffer", &LogType{Name: "ringbuffer", Version: [3]int{1, 0, 0}, New: newRing})
}

type ringMode int

const (
	modeDefault ringMode = iota // two parameters: auto, the rest of the device
	modeAuto
	modeCreate
	modeOpen
)

var modeNames = map[string]ringMode{"auto": modeAuto, "create": modeCreate, "open": modeOpen}

// ring is the ringbuffer log.
type ring struct {
	// Immutable.
	dev       mapper.Backend
	devStart  uint64 // sectors
	size      uint64 // sectors
	mode      ringMode
	base      int64 // bytes: dev_start
	dataStart int64
	end       int64

	// Guarded by the engine's lock (Reserve, Recover, Checkpoint's free).
	head, tail int64
	used       int64

	// Header state, guarded by hmu.
	hmu    sync.Mutex
	gen    uint64
	logID  uint64
	epoch  uint64
	failed bool
}

func newRing(c *mapper.Ctx, args []string) (Log, error) {
	if len(args) != 2 && len(args) != 4 {
		return nil, fmt.Errorf("ringbuffer: want <dev_path> <dev_start> [auto|create|open <size>], got %d parameters", len(args))
	}
	a := mapper.NewArgs(args)
	path, _ := a.Next("log device")
	start, err := a.Sector("log start")
	if err != nil {
		return nil, err
	}
	r := &ring{devStart: start}
	if len(args) == 4 {
		m, _ := a.Next("log mode")
		mode, ok := modeNames[m]
		if !ok {
			return nil, fmt.Errorf("log mode %q: not auto, create or open", m)
		}
		r.mode = mode
		if r.size, err = a.Uint("log size", minLogSectors, mapper.MaxSector); err != nil {
			return nil, err
		}
	}
	dev, err := c.Open(path)
	if err != nil {
		return nil, fmt.Errorf("log device %s: %w", path, err)
	}
	r.dev = dev
	if r.size != 0 {
		bytes, err := dev.Size()
		if err != nil {
			return nil, err
		}
		if sectors := uint64(bytes) >> mapper.SectorShift; start+r.size > sectors {
			return nil, fmt.Errorf("log device %s too small: log start %d + size %d > %d sectors", path, start, r.size, sectors)
		}
	}
	if r.size == 0 {
		bytes, err := dev.Size()
		if err != nil {
			return nil, err
		}
		sectors := uint64(bytes) >> mapper.SectorShift
		if sectors < start+minLogSectors {
			return nil, fmt.Errorf("log device %s: %d sectors after log start %d, need %d", path, sectors-min(sectors, start), start, minLogSectors)
		}
		r.size = sectors - start
	}
	r.base = int64(start) << mapper.SectorShift
	r.dataStart = r.base + ringDataOffset
	r.end = r.base + int64(r.size)<<mapper.SectorShift
	r.head, r.tail = r.dataStart, r.dataStart
	return r, nil
}

// Areas lists the log's area of its device.
func (r *ring) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	return fn(r.dev, r.devStart, r.size)
}

// Key implements Log: the device's identity and the log's start.
func (r *ring) Key() any {
	return struct {
		id    any
		start uint64
	}{mapper.Identity(r.dev), r.devStart}
}

// Creates reports whether the table asked for a new log.
func (r *ring) Creates() bool { return r.mode == modeCreate }

func (r *ring) capacity() int64 { return r.end - r.dataStart }

type ringHeader struct {
	gen, size, logID, epoch, tailOff, tailSeq uint64
	sites                                     map[uint32]uint64
}

func (h *ringHeader) encode() []byte {
	b := make([]byte, mapper.SectorSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], ringMagic)
	le.PutUint32(b[4:], ringVersion)
	le.PutUint64(b[8:], h.gen)
	le.PutUint64(b[16:], h.size)
	le.PutUint64(b[24:], h.logID)
	le.PutUint64(b[32:], h.epoch)
	le.PutUint64(b[40:], h.tailOff)
	le.PutUint64(b[48:], h.tailSeq)
	nrs := make([]uint32, 0, len(h.sites))
	for nr := range h.sites {
		nrs = append(nrs, nr)
	}
	sort.Slice(nrs, func(i, j int) bool { return nrs[i] < nrs[j] })
	nrs = nrs[:min(len(nrs), maxSites)]
	le.PutUint32(b[56:], uint32(len(nrs)))
	for i, nr := range nrs {
		le.PutUint32(b[64+16*i:], nr)
		le.PutUint64(b[72+16*i:], h.sites[nr])
	}
	le.PutUint32(b[508:], crc32.Checksum(b[:508], castagnoli))
	return b
}

func decodeHeader(b []byte) (*ringHeader, error) {
	le := binary.LittleEndian
	if le.Uint32(b[0:]) != ringMagic {
		return nil, errors.New("no log header")
	}
	if crc32.Checksum(b[:508], castagnoli) != le.Uint32(b[508:]) {
		return nil, errors.New("log header checksum mismatch")
	}
	if v := le.Uint32(b[4:]); v != ringVersion {
		return nil, fmt.Errorf("log header version %d, want %d", v, ringVersion)
	}
	h := &ringHeader{gen: le.Uint64(b[8:]), size: le.Uint64(b[16:]), logID: le.Uint64(b[24:]),
		epoch: le.Uint64(b[32:]), tailOff: le.Uint64(b[40:]), tailSeq: le.Uint64(b[48:]), sites: map[uint32]uint64{}}
	n := le.Uint32(b[56:])
	if n > maxSites {
		return nil, fmt.Errorf("log header lists %d sites, at most %d", n, maxSites)
	}
	for i := uint32(0); i < n; i++ {
		h.sites[le.Uint32(b[64+16*i:])] = le.Uint64(b[72+16*i:])
	}
	return h, nil
}

// readHeader returns the valid header slot with the higher generation.
func (r *ring) readHeader() (*ringHeader, error) {
	buf := make([]byte, 2*mapper.SectorSize)
	if err := r.dev.ReadAt([][]byte{buf}, r.base); err != nil {
		return nil, err
	}
	var best *ringHeader
	var firstErr error
	for i := 0; i < 2; i++ {
		h, err := decodeHeader(buf[i*mapper.SectorSize : (i+1)*mapper.SectorSize])
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if best == nil || h.gen > best.gen {
			best = h
		}
	}
	if best == nil {
		return nil, mapper.WithClass(firstErr, mapper.ErrCorrupt)
	}
	return best, nil
}

// writeHeader writes the next generation of the header and flushes it.
func (r *ring) writeHeader(h *ringHeader) error {
	r.hmu.Lock()
	defer r.hmu.Unlock()
	r.gen++
	h.gen, h.size, h.logID, h.epoch = r.gen, r.size, r.logID, r.epoch
	off := r.base + int64(r.gen%2)*mapper.SectorSize
	if err := r.dev.WriteAt([][]byte{h.encode()}, off); err != nil {
		r.failed = true
		return fmt.Errorf("write log header on %s: %w", r.dev.Name(), err)
	}
	if err := r.dev.Flush(); err != nil {
		r.failed = true
		return fmt.Errorf("flush log header on %s: %w", r.dev.Name(), err)
	}
	return nil
}

// Recover implements Log: open, create or auto as the table asked.
func (r *ring) Recover() ([]*Entry, uint64, map[uint32]uint64, error) {
	h, herr := r.readHeader()
	if herr == nil && h.size != r.size {
		return nil, 0, nil, mapper.Errorf(mapper.ErrInvalid, "log size %d: the log on %s has size %d", r.size, r.dev.Name(), h.size)
	}
	switch {
	case r.mode == modeCreate && herr == nil:
		return nil, 0, nil, mapper.Errorf(mapper.ErrBusy, "create: %s already holds a replication log", r.dev.Name())
	case r.mode == modeOpen && herr != nil:
		return nil, 0, nil, fmt.Errorf("open: %s: %w", r.dev.Name(), herr)
	case herr != nil && !errors.Is(herr, mapper.ErrCorrupt):
		return nil, 0, nil, herr
	case herr != nil: // create, or auto without a valid log
		r.logID = rand.Uint64()
		r.epoch = 1
		r.head, r.tail, r.used = r.dataStart, r.dataStart, 0
		err := r.writeHeader(&ringHeader{tailOff: uint64(r.dataStart), tailSeq: 1})
		return nil, 1, map[uint32]uint64{}, err
	}
	if h.tailOff < uint64(r.dataStart) || h.tailOff >= uint64(r.end) || (h.tailOff-uint64(r.base))%mapper.SectorSize != 0 {
		return nil, 0, nil, mapper.Errorf(mapper.ErrCorrupt, "log header tail offset %d outside the ring", h.tailOff)
	}
	r.gen, r.logID, r.epoch = h.gen, h.logID, h.epoch+1
	entries, err := r.scan(int64(h.tailOff), h.tailSeq, h.epoch)
	if err != nil {
		return nil, 0, nil, err
	}
	next := h.tailSeq + uint64(len(entries))
	// A new epoch, made durable before any new entry is written, so that
	// entries written after this open are told apart from stale ones.
	if err := r.writeHeader(&ringHeader{tailOff: h.tailOff, tailSeq: h.tailSeq, sites: h.sites}); err != nil {
		return nil, 0, nil, err
	}
	return entries, next, h.sites, nil
}

// scan reads entries from off while they are valid and in sequence, and
// sets head, tail and used accordingly.
func (r *ring) scan(off int64, seq, maxEpoch uint64) ([]*Entry, error) {
	var out []*Entry
	if off == r.end {
		off = r.dataStart
	}
	r.tail, r.head, r.used = off, off, 0
	var prevEpoch uint64
	hdr := make([]byte, mapper.SectorSize)
	var cached int64
	for r.used < r.capacity() {
		if off == r.end {
			off = r.dataStart
		}
		at := off
		e, epoch, err := r.readEntry(hdr, off, seq, prevEpoch, maxEpoch)
		if err != nil {
			return nil, err
		}
		if e != nil && e.Op == opWrap {
			if off == r.dataStart {
				break
			}
			off = r.dataStart
			e, epoch, err = r.readEntry(hdr, off, seq, epoch, maxEpoch)
			if err != nil {
				return nil, err
			}
			if e != nil && e.Op == opWrap {
				e = nil
			}
		}
		if e == nil {
			break
		}
		size := entryBytes(e)
		span := size
		if at != off {
			span += r.end - at
		}
		if r.used+span > r.capacity() {
			break
		}
		e.At, e.Pos, e.Span = at, off, span
		if e.Data != nil {
			if cached > cacheBudget {
				e.Data = nil
			}
			cached += int64(len(e.Data))
		}
		out = append(out, e)
		r.used += span
		prevEpoch = epoch
		seq++
		off += size
		r.head = off
	}
	if r.head == r.end {
		r.head = r.dataStart
	}
	return out, nil
}

// opWrap marks a wrap marker read by readEntry.
const opWrap mapper.Op = 0xff

// readEntry reads and checks the entry at off; it returns nil when the
// entry is not the expected one (the end of the log), and an error only
// when the device cannot be read.
func (r *ring) readEntry(hdr []byte, off int64, seq, minEpoch, maxEpoch uint64) (*Entry, uint64, error) {
	if off+mapper.SectorSize > r.end {
		return nil, 0, nil
	}
	if err := r.dev.ReadAt([][]byte{hdr}, off); err != nil {
		return nil, 0, fmt.Errorf("read log %s at %d: %w", r.dev.Name(), off, err)
	}
	le := binary.LittleEndian
	if le.Uint32(hdr[0:]) != entryMagic || crc32.Checksum(hdr[:508], castagnoli) != le.Uint32(hdr[508:]) {
		return nil, 0, nil
	}
	epoch := le.Uint64(hdr[16:])
	if le.Uint64(hdr[8:]) != seq || le.Uint64(hdr[24:]) != r.logID || epoch < minEpoch || epoch > maxEpoch {
		return nil, 0, nil
	}
	e := &Entry{Seq: seq, Dev: le.Uint32(hdr[32:]), Sector: le.Uint64(hdr[40:]), Sectors: le.Uint64(hdr[48:])}
	switch hdr[4] {
	case kindWrite:
		e.Op = mapper.OpWrite
	case kindDiscrd:
		e.Op = mapper.OpDiscard
	case kindZeroes:
		e.Op = mapper.OpWriteZeroes
	case kindWrap:
		e.Op = opWrap
		return e, epoch, nil
	default:
		return nil, 0, nil
	}
	if e.Sectors == 0 || e.Sectors > mapper.MaxSector {
		return nil, 0, nil
	}
	e.Span = entryBytes(e)
	if off+e.Span > r.end {
		return nil, 0, nil
	}
	if e.Op == mapper.OpWrite {
		e.Data = make([]byte, e.Sectors<<mapper.SectorShift)
		if err := r.dev.ReadAt([][]byte{e.Data}, off+mapper.SectorSize); err != nil {
			return nil, 0, fmt.Errorf("read log %s at %d: %w", r.dev.Name(), off, err)
		}
		if crc32.Checksum(e.Data, castagnoli) != le.Uint32(hdr[56:]) {
			return nil, 0, nil
		}
	}
	return e, epoch, nil
}

// entryBytes is the size of an entry in the ring: header and data.
func entryBytes(e *Entry) int64 {
	if e.Op == mapper.OpWrite {
		return mapper.SectorSize + int64(e.Sectors)<<mapper.SectorShift
	}
	return mapper.SectorSize
}

// Fits implements Log: an entry of n data bytes fits wherever the head is.
func (r *ring) Fits(n int) bool {
	return int64(n)+2*mapper.SectorSize <= r.capacity()/2
}

// Reserve implements Log.
func (r *ring) Reserve(e *Entry) bool {
	size := entryBytes(e)
	if r.used == 0 {
		r.tail = r.head
	}
	var at, pos, span int64
	switch {
	case r.used == 0 || r.head > r.tail: // free: [head, end) and [dataStart, tail)
		if r.head+size <= r.end {
			at, pos, span = r.head, r.head, size
		} else if r.dataStart+size <= r.tail { // tail == head when empty
			at, pos, span = r.head, r.dataStart, r.end-r.head+size
		} else {
			return false
		}
	default: // wrapped or full: free is [head, tail)
		if r.head+size > r.tail || r.used+size > r.capacity() {
			return false
		}
		at, pos, span = r.head, r.head, size
	}
	e.At, e.Pos, e.Span = at, pos, span
	r.used += span
	r.head = pos + size
	if r.head == r.end {
		r.head = r.dataStart
	}
	return true
}

func (r *ring) entryHeader(e *Entry, kind byte) []byte {
	b := make([]byte, mapper.SectorSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], entryMagic)
	b[4] = kind
	le.PutUint64(b[8:], e.Seq)
	le.PutUint64(b[16:], r.epoch)
	le.PutUint64(b[24:], r.logID)
	le.PutUint32(b[32:], e.Dev)
	le.PutUint64(b[40:], e.Sector)
	le.PutUint64(b[48:], e.Sectors)
	if kind == kindWrite {
		le.PutUint32(b[56:], crc32.Checksum(e.Data, castagnoli))
	}
	le.PutUint32(b[508:], crc32.Checksum(b[:508], castagnoli))
	return b
}

// Write implements Log.
func (r *ring) Write(e *Entry) error {
	if e.At != e.Pos && e.At+mapper.SectorSize <= r.end {
		if err := r.dev.WriteAt([][]byte{r.entryHeader(e, kindWrap)}, e.At); err != nil {
			return r.fail(err)
		}
	}
	var kind byte
	switch e.Op {
	case mapper.OpWrite:
		kind = kindWrite
	case mapper.OpDiscard:
		kind = kindDiscrd
	default:
		kind = kindZeroes
	}
	bufs := [][]byte{r.entryHeader(e, kind)}
	if kind == kindWrite {
		bufs = append(bufs, e.Data)
	}
	if err := r.dev.WriteAt(bufs, e.Pos); err != nil {
		return r.fail(err)
	}
	return nil
}

func (r *ring) fail(err error) error {
	r.hmu.Lock()
	r.failed = true
	r.hmu.Unlock()
	return fmt.Errorf("write log %s: %w", r.dev.Name(), err)
}

// ReadData implements Log.
func (r *ring) ReadData(e *Entry) ([]byte, error) {
	b := make([]byte, e.Sectors<<mapper.SectorShift)
	if err := r.dev.ReadAt([][]byte{b}, e.Pos+mapper.SectorSize); err != nil {
		return nil, fmt.Errorf("read log %s at %d: %w", r.dev.Name(), e.Pos, err)
	}
	return b, nil
}

// Flush implements Log.
func (r *ring) Flush() error {
	if err := r.dev.Flush(); err != nil {
		return r.fail(err)
	}
	return nil
}

// Head implements Log.
func (r *ring) Head() int64 { return r.head }

// Checkpoint implements Log.
func (r *ring) Checkpoint(tailOff int64, tailSeq uint64, sites map[uint32]uint64) error {
	return r.writeHeader(&ringHeader{tailOff: uint64(tailOff), tailSeq: tailSeq, sites: sites})
}

// Free implements Log.
func (r *ring) Free(tail *Entry) {
	if tail == nil {
		r.used, r.tail = 0, r.head
		return
	}
	r.tail = tail.At
	if r.head > r.tail {
		r.used = r.head - r.tail
	} else {
		r.used = (r.end - r.tail) + (r.head - r.dataStart)
	}
}

// Used implements Log.
func (r *ring) Used() (used, size uint64) {
	return uint64(r.used) >> mapper.SectorShift, uint64(r.capacity()) >> mapper.SectorShift
}

// Status implements Log.
func (r *ring) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusTable {
		switch r.mode {
		case modeDefault:
			return fmt.Sprintf("ringbuffer 2 %s %d", r.dev.Name(), r.devStart)
		case modeOpen:
			return fmt.Sprintf("ringbuffer 4 %s %d open %d", r.dev.Name(), r.devStart, r.size)
		default: // create prints as auto: the log exists now
			return fmt.Sprintf("ringbuffer 4 %s %d auto %d", r.dev.Name(), r.devStart, r.size)
		}
	}
	r.hmu.Lock()
	health := "A"
	if r.failed {
		health = "D"
	}
	r.hmu.Unlock()
	return fmt.Sprintf("ringbuffer %s %s", r.dev.Name(), health)
}

// Close implements Log; the table closes the device.
func (r *ring) Close() error { return nil }
