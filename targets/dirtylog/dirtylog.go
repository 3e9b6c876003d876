// Package dirtylog holds the dirty region logs of mirroring targets (the
// kernel's dm-dirty-log, drivers/md/dm-log.c): which regions of a mirror
// are known to be in sync, which may differ because a write to them was in
// flight, and which are being recovered. Log types are plug-ins registered
// by name in [Types], the mapper's registry mechanism; the mirror target
// uses them, and the replicator can later.
//
//	core <region_size> [sync|nosync]
//	disk <log_device> <region_size> [sync|nosync]
//
// region_size is in sectors, a power of two from 2 to the target length.
// core keeps the log in memory: a restart resynchronises everything. disk
// keeps it on a device in the kernel's format, so that only regions that
// were dirty resynchronise after a crash:
//
//	sector 0    u32 magic 0x4D695272 ("rRiM" on disk), u32 version 2,
//	            u64 number of regions (little-endian)
//	byte 1024   clean bitmap: bit i (bit i%8 of byte i/8) set when region i
//	            is clean, padded to 32-bit words
//
// The whole area — header through bitmap, rounded up to a sector — is
// written at once. A region's clean bit is cleared and written (and flushed)
// before the first write to the region is issued; it is set again only after
// the mirror's legs have been flushed. sync forces a full resynchronisation
// (a new log); nosync declares every region in sync.
//
// Status, appended to the mirror's: INFO "1 core" or "3 disk <dev> A" (A
// alive, D failed, F flush failed); TABLE "core 1 1024" or "disk 3 <dev>
// 1024 nosync" (the count includes the sync argument when given).
package dirtylog

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// Log is a dirty region log. Its methods may be called concurrently; the
// log guards its own state.
type Log interface {
	// RegionSize returns the region size in sectors.
	RegionSize() uint64
	// Regions returns the number of regions.
	Regions() uint64
	// Resume loads the log (disk: reads the device) and resets the resync
	// cursor; it is called when the table goes live.
	Resume() error
	// IsClean reports whether region was clean (no write in flight).
	IsClean(region uint64) bool
	// InSync reports whether region is known to be the same on every leg.
	InSync(region uint64) bool
	// MarkRegion marks region dirty before a write; Flush persists it.
	MarkRegion(region uint64)
	// ClearRegion marks region clean after its writes completed.
	ClearRegion(region uint64)
	// Flush persists the marks; clearing marks are persisted only after
	// the data callback given to the constructor succeeded.
	Flush() error
	// ResyncWork returns the next region to recover, if any.
	ResyncWork() (region uint64, ok bool)
	// SetRegionSync records the outcome of recovering region, or that a
	// region fell out of sync (inSync false).
	SetRegionSync(region uint64, inSync bool)
	// SyncCount returns the number of regions in sync.
	SyncCount() uint64
	// Status returns the log's INFO or TABLE words.
	Status(kind mapper.StatusKind) string
	// Close releases the log.
	Close() error
}

// Type is a registered dirty log type (the kernel's dm_dirty_log_type).
type Type struct {
	Name    string
	Version [3]int
	// New builds a log for a target of c.Length sectors from its
	// arguments. flushData makes the mirrored data durable; the log calls
	// it before persisting clean marks. Backends are opened with c.Open.
	New func(c *mapper.Ctx, args []string, flushData func() error) (Log, error)
}

// Types is the plug-in registry of dirty log types.
var Types = mapper.NewRegistry[*Type]("dirty log type")

// Register registers a dirty log type; call it from init.
func Register(t *Type) {
	if t.New == nil {
		panic("dirtylog: type " + t.Name + " has no constructor")
	}
	Types.Register(t.Name, t)
}

// New builds a log of the named type.
func New(c *mapper.Ctx, name string, args []string, flushData func() error) (Log, error) {
	t, err := Types.Lookup(name)
	if err != nil {
		return nil, err
	}
	return t.New(c, args, flushData)
}

func init() {
	Register(&Type{Name: "core", Version: [3]int{1, 0, 0}, New: newCore})
	Register(&Type{Name: "disk", Version: [3]int{1, 0, 0}, New: newDisk})
}

// Disk format constants (dm-log.c): part of the on-disk format.
const (
	Magic         = 0x4D695272
	Version       = 2
	BitmapOffset  = 1024 // bytes: LOG_OFFSET, 2 sectors
	headerBytes   = 16
	maxRegionSize = 1 << 30
)

type syncMode int

const (
	defaultSync syncMode = iota
	forceSync            // "sync": resynchronise everything
	noSync               // "nosync": everything is in sync
)

// logc is the state of core and disk logs (dm-log.c's log_c).
type logc struct {
	// Immutable.
	typ       string
	region    uint64 // sectors
	count     uint64 // regions
	sync      syncMode
	dev       mapper.Backend // disk only
	flushData func() error
	bufBytes  int // disk: header area through bitmap, sector-rounded

	// Guarded by mu.
	mu             sync.Mutex
	buf            []byte // disk image: header and clean bitmap
	clean          []byte // clean bits (a slice of buf for disk)
	syncBits       []byte
	recovering     []byte
	syncCount      uint64
	syncSearch     uint64
	touchedDirtied bool
	touchedCleaned bool
	flushFailed    bool // a data flush failed: every region stays dirty
	devFailed      bool
	devFlushFailed bool
}

func parseCommon(c *mapper.Ctx, typ string, args []string) (*logc, error) {
	if len(args) < 1 || len(args) > 2 {
		return nil, fmt.Errorf("want <region_size> [sync|nosync], got %d arguments", len(args))
	}
	l := &logc{typ: typ}
	if len(args) == 2 {
		switch args[1] {
		case "sync":
			l.sync = forceSync
		case "nosync":
			l.sync = noSync
		default:
			return nil, fmt.Errorf("sync argument %q: not sync or nosync", args[1])
		}
	}
	rs, err := mapper.ParseUint("region size", args[0], 2, maxRegionSize)
	if err != nil {
		return nil, err
	}
	if rs&(rs-1) != 0 || rs > c.Length {
		return nil, fmt.Errorf("region size %d: not a power of 2 no larger than the target length %d", rs, c.Length)
	}
	l.region = rs
	l.count = (c.Length + rs - 1) / rs
	words := (l.count + 31) / 32
	bytes := int(words * 4)
	l.syncBits = make([]byte, bytes)
	l.recovering = make([]byte, bytes)
	if l.sync == noSync {
		setAll(l.syncBits, l.count)
		l.syncCount = l.count
	}
	return l, nil
}

func newCore(c *mapper.Ctx, args []string, flushData func() error) (Log, error) {
	l, err := parseCommon(c, "core", args)
	if err != nil {
		return nil, err
	}
	l.clean = make([]byte, len(l.syncBits))
	for i := range l.clean {
		l.clean[i] = 0xff
	}
	return l, nil
}

func newDisk(c *mapper.Ctx, args []string, flushData func() error) (Log, error) {
	if len(args) < 2 || len(args) > 3 {
		return nil, fmt.Errorf("want <log_device> <region_size> [sync|nosync], got %d arguments", len(args))
	}
	l, err := parseCommon(c, "disk", args[1:])
	if err != nil {
		return nil, err
	}
	l.flushData = flushData
	l.bufBytes = (BitmapOffset + len(l.syncBits) + mapper.SectorSize - 1) &^ (mapper.SectorSize - 1)
	dev, err := c.Open(args[0])
	if err != nil {
		return nil, fmt.Errorf("log device: %w", err)
	}
	size, err := dev.Size()
	if err != nil {
		return nil, err
	}
	if size < int64(l.bufBytes) {
		return nil, fmt.Errorf("log device %s too small: need %d bytes", args[0], l.bufBytes)
	}
	l.dev = dev
	l.buf = make([]byte, l.bufBytes)
	l.clean = l.buf[BitmapOffset : BitmapOffset+len(l.syncBits)]
	return l, nil
}

func (l *logc) RegionSize() uint64 { return l.region }
func (l *logc) Regions() uint64    { return l.count }

// Areas lists the disk log's area of its device.
func (l *logc) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	if l.dev == nil {
		return nil
	}
	return fn(l.dev, 0, uint64(l.bufBytes)>>mapper.SectorShift)
}

func testBit(bs []byte, i uint64) bool { return bs[i/8]&(1<<(i%8)) != 0 }
func setBit(bs []byte, i uint64)       { bs[i/8] |= 1 << (i % 8) }
func clearBit(bs []byte, i uint64)     { bs[i/8] &^= 1 << (i % 8) }

func setAll(bs []byte, n uint64) {
	for i := uint64(0); i < n; i++ {
		setBit(bs, i)
	}
}

func (l *logc) setClean(i uint64) { setBit(l.clean, i); l.touchedCleaned = true }
func (l *logc) clearClean(i uint64) {
	clearBit(l.clean, i)
	l.touchedDirtied = true
}

// Resume loads a disk log (core logs have nothing to load): regions the
// header does not cover become clean with nosync and dirty otherwise, the
// clean bits become the sync bits, and the header is rewritten.
func (l *logc) Resume() error {
	if l.dev == nil {
		l.mu.Lock()
		l.syncSearch = 0
		l.mu.Unlock()
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	var known uint64
	err := l.dev.ReadAt([][]byte{l.buf}, 0)
	if err == nil {
		magic := binary.LittleEndian.Uint32(l.buf[0:])
		version := binary.LittleEndian.Uint32(l.buf[4:])
		known = binary.LittleEndian.Uint64(l.buf[8:])
		if l.sync != defaultSync || magic != Magic {
			known, version = 0, Version
		}
		if version == 1 { // version 1 is version 2 on little-endian hosts
			version = Version
		}
		if version != Version {
			err = fmt.Errorf("log device %s: incompatible disk log version %d", l.dev.Name(), version)
		}
	}
	if err != nil {
		l.devFailed = true
		known = 0
	}
	for i := min(known, l.count); i < l.count; i++ {
		if l.sync == noSync {
			l.setClean(i)
		} else {
			l.clearClean(i)
		}
	}
	for i := l.count; i < uint64(len(l.clean))*8; i++ {
		clearBit(l.clean, i)
	}
	copy(l.syncBits, l.clean)
	l.syncCount = 0
	for i := uint64(0); i < l.count; i++ {
		if testBit(l.syncBits, i) {
			l.syncCount++
		}
	}
	l.syncSearch = 0
	binary.LittleEndian.PutUint32(l.buf[0:], Magic)
	binary.LittleEndian.PutUint32(l.buf[4:], Version)
	binary.LittleEndian.PutUint64(l.buf[8:], l.count)
	if werr := l.dev.WriteAt([][]byte{l.buf}, 0); werr != nil {
		l.devFailed = true
		return fmt.Errorf("write log header on %s: %w", l.dev.Name(), werr)
	}
	if ferr := l.dev.Flush(); ferr != nil {
		l.devFailed, l.devFlushFailed = true, true
		return fmt.Errorf("flush log device %s: %w", l.dev.Name(), ferr)
	}
	l.touchedCleaned, l.touchedDirtied = false, false
	return err
}

func (l *logc) IsClean(r uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return testBit(l.clean, r)
}

func (l *logc) InSync(r uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return testBit(l.syncBits, r)
}

func (l *logc) MarkRegion(r uint64) {
	l.mu.Lock()
	l.clearClean(r)
	l.mu.Unlock()
}

func (l *logc) ClearRegion(r uint64) {
	l.mu.Lock()
	if !l.flushFailed {
		l.setClean(r)
	}
	l.mu.Unlock()
}

// Flush writes a disk log that changed. Before clean marks reach the disk
// the mirror's data is flushed; if that fails, every region is marked dirty
// instead.
func (l *logc) Flush() error {
	if l.dev == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.touchedCleaned && !l.touchedDirtied {
		return nil
	}
	if l.touchedCleaned && l.flushData != nil {
		if err := l.flushData(); err != nil {
			l.flushFailed = true
			for i := uint64(0); i < l.count; i++ {
				l.clearClean(i)
			}
		}
	}
	if err := l.dev.WriteAt([][]byte{l.buf}, 0); err != nil {
		l.devFailed = true
		return fmt.Errorf("write log %s: %w", l.dev.Name(), err)
	}
	if l.touchedDirtied {
		if err := l.dev.Flush(); err != nil {
			l.devFailed, l.devFlushFailed = true, true
			return fmt.Errorf("flush log %s: %w", l.dev.Name(), err)
		}
		l.touchedDirtied = false
	}
	l.touchedCleaned = false
	return nil
}

func (l *logc) ResyncWork() (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.syncSearch < l.count {
		r := l.syncSearch
		l.syncSearch++
		if !testBit(l.syncBits, r) && !testBit(l.recovering, r) {
			setBit(l.recovering, r)
			return r, true
		}
	}
	return 0, false
}

func (l *logc) SetRegionSync(r uint64, inSync bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	clearBit(l.recovering, r)
	if inSync {
		if !testBit(l.syncBits, r) {
			setBit(l.syncBits, r)
			l.syncCount++
		}
	} else if testBit(l.syncBits, r) {
		clearBit(l.syncBits, r)
		l.syncCount--
	}
}

func (l *logc) SyncCount() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.syncCount
}

func (l *logc) Status(kind mapper.StatusKind) string {
	syncArg := ""
	switch l.sync {
	case forceSync:
		syncArg = " sync"
	case noSync:
		syncArg = " nosync"
	}
	n := 1
	if l.sync != defaultSync {
		n++
	}
	if l.dev == nil {
		if kind == mapper.StatusTable {
			return fmt.Sprintf("core %d %d%s", n, l.region, syncArg)
		}
		return "1 core"
	}
	if kind == mapper.StatusTable {
		return fmt.Sprintf("disk %d %s %d%s", n+1, l.dev.Name(), l.region, syncArg)
	}
	l.mu.Lock()
	health := "A"
	if l.devFlushFailed {
		health = "F"
	} else if l.devFailed {
		health = "D"
	}
	l.mu.Unlock()
	return fmt.Sprintf("3 disk %s %s", l.dev.Name(), health)
}

func (l *logc) Close() error { return nil }
