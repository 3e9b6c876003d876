package raid

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// The metadata devices hold dm-raid's superblock and md's write-intent
// bitmap (superblock.go has the layout), with md's semantics:
//
//   - A region's bit is set, and the bitmap written and flushed on every
//     metadata device in service, before the first write to the region;
//     the bitmap daemon (every daemon_sleep ms, default 5000) clears it
//     once no write to the region is in flight and the data devices were
//     flushed since the last one, and only while the array is whole: bits
//     set while a device is failed or missing stay set, as md's NEEDED
//     bits, until the device is back and recovered.
//   - events counts superblock updates (load, a device failing, a resync
//     or recovery ending, suspend); the bitmap superblock carries the
//     same count, and events_cleared the count when bits were last
//     cleared. The freshest superblock (highest events) describes the
//     array.
//   - failed_devices records which devices failed or were missing. A
//     recorded device that is back (in the table again) is recovered
//     only in the regions the bitmap marks, as md re-adds it, when its
//     own superblock is no older than events_cleared; otherwise, or when
//     the bitmap is stale (events behind the superblock's), in full.
//   - After a crash, regions whose bit is set are resynced (raid1: copied
//     from the first leg in sync, write-mostly legs last, since they may
//     have been behind; raid4/5/6: parity recomputed). The
//     kernel's dm-raid keeps array_resync_offset at MaxSector and ignores
//     such bits on an array that is not degraded; resyncing them is safe
//     and closes the window of a torn write. "nosync" skips the full
//     resync of a new array and a recorded resync offset, never these
//     regions.
//
// Arrays from older vhostdm, with its own "VDMRAIDB" bitmap, are migrated
// on activation: their dirty regions are resynced and the metadata is
// rewritten in the kernel's format.
const (
	legacyMagic          = "VDMRAIDB"
	legacyBitmapOffset   = 4096
	defaultRegionSize    = 8192
	defaultDaemonSleepMS = 5000
	maxRegions           = 1 << 24
)

type bitmap struct {
	// Immutable.
	region uint64 // sectors
	count  uint64
	sleep  time.Duration
	fresh  bool // no metadata was found: a new array
	// noBitmap: the metadata devices hold the superblock only (raid0, as
	// dm-raid, which sets up no bitmap for raid0).
	noBitmap bool

	mu            sync.Mutex
	events        uint64
	eventsCleared uint64
	partial       bool     // recovering members need only the regions in resync
	bits          []byte   // as on disk
	pending       []int32  // writes in flight per region
	gen           []uint32 // writes started per region
	resync        []byte   // regions to resync, from the bitmap found at load
	stop          chan struct{}
	done          chan struct{}
}

// bitsOffset is where the bitmap's bits start on a metadata device.
const bitsOffset = bitmapSBOffset + bitmapSBSize

// roundSector rounds n bytes up to whole sectors.
func roundSector(n int) int {
	return (n + mapper.SectorSize - 1) / mapper.SectorSize * mapper.SectorSize
}

func (b *bitmap) sectors() uint64 {
	if b.noBitmap {
		return bitmapSBOffset / mapper.SectorSize
	}
	return (bitsOffset + (b.count+7)/8 + mapper.SectorSize - 1) / mapper.SectorSize
}

func (b *bitmap) alloc(region, devSectors uint64) error {
	b.region = region
	b.count = (devSectors + region - 1) / region
	if b.count > maxRegions {
		return fmt.Errorf("region size %d: %d regions, more than %d", region, b.count, maxRegions)
	}
	nb := (b.count + 7) / 8
	b.bits, b.resync = make([]byte, nb), make([]byte, nb)
	b.pending, b.gen = make([]int32, b.count), make([]uint32, b.count)
	return nil
}

// tableRegion is the region size the table asks for, or vhostdm's (and
// dm-raid's) default, raised to the chunk size (raid4/5/6) and to at
// most 2^21 regions.
func tableRegion(r *raid) (uint64, error) {
	region := uint64(defaultRegionSize)
	if r.p.regionSize > 0 {
		region = uint64(r.p.regionSize)
	}
	chunk := r.chunk
	if r.typ.level == 1 {
		chunk = 1 // raid1 has no chunk: any region size
	}
	for region < chunk || (r.syncSectors+region-1)/region > 1<<21 {
		region *= 2
	}
	if r.p.regionSize > 0 && region != uint64(r.p.regionSize) {
		return 0, fmt.Errorf("region_size %d: smaller than chunk size %d or more than 2^21 regions", r.p.regionSize, chunk)
	}
	return region, nil
}

// openBitmap reads the metadata devices and sets up the array's state
// from the freshest dm-raid superblock and its bitmap.
func openBitmap(r *raid) (*bitmap, error) {
	b := &bitmap{sleep: defaultDaemonSleepMS * time.Millisecond}
	if r.p.daemonSleep > 0 {
		b.sleep = time.Duration(r.p.daemonSleep) * time.Millisecond
	}
	n := len(r.devs)
	heads := make([][]byte, n)
	sbs := make([]*superblock, n)
	legacy := -1
	var blank []int
	minSize, head, what := int64(bitsOffset+512), bitmapSBOffset+mapper.SectorSize, "the superblock and bitmap"
	if r.typ.level == 0 {
		minSize, head, what = bitmapSBOffset, bitmapSBOffset, "the superblock"
	}
	for i, m := range r.devs {
		if m.meta == nil {
			continue
		}
		if size, err := m.meta.Size(); err == nil && size < minSize {
			return nil, fmt.Errorf("metadata device %d: %d bytes, too small for %s (at least %d)", i, size, what, minSize)
		}
		buf := make([]byte, head)
		if err := m.meta.ReadAt([][]byte{buf}, 0); err != nil {
			return nil, fmt.Errorf("metadata device %d: %w", i, err)
		}
		heads[i] = buf
		switch s, ok := decodeSuperblock(buf); {
		case ok:
			sbs[i] = &s
		case bytes.Equal(buf[:8], []byte(legacyMagic)):
			if legacy < 0 {
				legacy = i
			}
		default:
			blank = append(blank, i)
		}
	}
	freshest := -1
	for i, s := range sbs {
		if s != nil && (freshest < 0 || s.events > sbs[freshest].events) {
			freshest = i
		}
	}
	if r.typ.level == 0 {
		return b, openRaid0(r, b, sbs, freshest)
	}
	if r.p.sync || (freshest < 0 && legacy < 0) {
		// A new array (or "sync": made anew, as the kernel skips the
		// superblocks): resynced in full unless nosync.
		region, err := tableRegion(r)
		if err != nil {
			return nil, err
		}
		b.fresh = true
		if err := b.alloc(region, r.syncSectors); err != nil {
			return nil, err
		}
		return b, r.checkMetaSize(b)
	}
	if freshest < 0 {
		return b, openLegacy(r, b, legacy)
	}
	fs := sbs[freshest]
	if err := r.checkSuperblock(freshest, fs); err != nil {
		return nil, err
	}
	for i, s := range sbs {
		if s != nil && s.position != uint32(i) {
			return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata device %d: superblock of device %d: cannot change device positions in raid set", i, s.position)
		}
	}
	for _, i := range blank {
		if r.devs[i].dev != nil && !r.devs[i].rebuild {
			return nil, mapper.Errorf(mapper.ErrInvalid, "metadata device %d: no superblock on a device of an existing array: give \"rebuild %d\" to add it", i, i)
		}
	}

	// The bitmap of the freshest device.
	bs, ok := decodeBitmapSuper(heads[freshest][bitmapSBOffset:])
	if !ok {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata device %d: dm-raid superblock without an md bitmap at byte %d", freshest, bitmapSBOffset)
	}
	switch {
	case bs.version != bitmapVersion && bs.version != bitmapVersionLo:
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata device %d: bitmap version %d: want %d or %d", freshest, bs.version, bitmapVersionLo, bitmapVersion)
	case bs.chunkBytes < mapper.SectorSize || bs.chunkBytes&(bs.chunkBytes-1) != 0:
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata device %d: bitmap chunk size %d bytes: not a power of two of at least 512", freshest, bs.chunkBytes)
	case bs.nodes != 0:
		return nil, mapper.Errorf(mapper.ErrUnsupported, "metadata device %d: clustered bitmap (%d nodes)", freshest, bs.nodes)
	case bs.writeBehind > bitmapCounterMax:
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata device %d: bitmap write_behind %d: more than %d", freshest, bs.writeBehind, bitmapCounterMax)
	}
	region := uint64(bs.chunkBytes) / mapper.SectorSize
	if r.p.regionSize > 0 && uint64(r.p.regionSize) != region {
		return nil, mapper.Errorf(mapper.ErrInvalid, "region_size %d: the array's bitmap has regions of %d sectors", r.p.regionSize, region)
	}
	if err := b.alloc(region, r.syncSectors); err != nil {
		return nil, err
	}
	if err := r.checkMetaSize(b); err != nil {
		return nil, err
	}
	if r.p.daemonSleep <= 0 && bs.daemonSleep > 0 {
		b.sleep = time.Duration(bs.daemonSleep) * time.Second
	}
	area := make([]byte, roundSector(bitmapSBSize+len(b.bits)))
	if err := r.devs[freshest].meta.ReadAt([][]byte{area}, bitmapSBOffset); err != nil {
		return nil, fmt.Errorf("metadata device %d: bitmap: %w", freshest, err)
	}
	copy(b.bits, area[bitmapSBSize:])
	if tail := b.count % 8; tail != 0 { // bits past the last region are not ours
		b.bits[len(b.bits)-1] &= 1<<tail - 1
	}
	b.events, b.eventsCleared = fs.events, bs.eventsCleared
	stale := bs.state&bitmapStale != 0 || bs.events < fs.events
	if stale {
		r.log.Warn("raid bitmap out of date: full resync", "bitmap_events", bs.events, "events", fs.events)
	}
	copy(b.resync, b.bits)

	// The members, as the freshest superblock and their own record them.
	partial := !stale
	recovering := false
	from := uint64(maxSector)
	for i, m := range r.devs {
		if m.dev == nil {
			continue
		}
		if m.rebuild {
			partial = false
			from = 0
			continue
		}
		switch {
		case fs.isFailed(i): // a device that failed is back
			m.inSync.Store(false)
			recovering = true
			from = 0
			if sbs[i] == nil || sbs[i].events < bs.eventsCleared {
				partial = false
			}
		case sbs[i] != nil && sbs[i].diskRecovery != maxSector:
			m.inSync.Store(false)
			recovering = true
			partial = false
			from = min(from, sbs[i].diskRecovery)
		}
	}
	if recovering {
		if partial {
			from = 0
		}
		if r.r10 != nil && !partial && from != 0 {
			from = 0 // a recovery offset in device sectors: recover in full
		}
		from = min(from, r.syncSectors) / r.chunk * r.chunk
		r.recoveryCP.Store(from)
		b.partial = partial
	}
	switch {
	case r.p.nosync: // the recorded resync offset, not the dirty regions
		r.resyncCP = math.MaxUint64
	case stale:
		r.resyncCP = 0
	case fs.arrayResync >= r.syncSectors:
		r.resyncCP = math.MaxUint64
	default:
		r.resyncCP = fs.arrayResync / r.chunk * r.chunk
	}
	return b, nil
}

// openRaid0 sets up the superblocks of a raid0 array: dm-raid keeps no
// bitmap, recovery or resync for raid0 and, unlike vhostdm, validates none
// of its superblock on load (it rewrites them); vhostdm still refuses a
// superblock of another array. Blank metadata devices get a superblock.
func openRaid0(r *raid, b *bitmap, sbs []*superblock, freshest int) error {
	b.noBitmap = true
	b.fresh = freshest < 0
	if freshest < 0 {
		return nil
	}
	fs := sbs[freshest]
	if err := r.checkSuperblock(freshest, fs); err != nil {
		return err
	}
	for i, s := range sbs {
		if s != nil && s.position != uint32(i) {
			return mapper.Errorf(mapper.ErrCorrupt, "metadata device %d: superblock of device %d: cannot change device positions in raid set", i, s.position)
		}
	}
	b.events = fs.events
	return nil
}

// checkSuperblock refuses a superblock that does not describe the array
// of the table, or that vhostdm cannot take over.
func (r *raid) checkSuperblock(i int, s *superblock) error {
	level, layout := r.mdLevelLayout()
	stripe := uint32(r.p.chunkGiven)
	if r.typ.level == 1 {
		stripe = s.stripe // raid1 has no chunk
	}
	bad := func(format string, args ...any) error {
		return mapper.Errorf(mapper.ErrInvalid, "metadata device %d: %s", i, fmt.Sprintf(format, args...))
	}
	raid4 := r.typ.level == 4 && s.level == 4 && s.layout == layout
	switch {
	case s.compat&^sbFeatureV190 != 0:
		return mapper.Errorf(mapper.ErrUnsupported, "metadata device %d: unknown compatible feature flags %#x", i, s.compat)
	case s.incompat != 0:
		return mapper.Errorf(mapper.ErrUnsupported, "metadata device %d: incompatible feature flags %#x", i, s.incompat)
	case s.numDevices != uint32(len(r.devs)):
		return bad("the array has %d devices, the table %d (reshape is not supported)", s.numDevices, len(r.devs))
	case (s.level != level || s.layout != layout) && !raid4:
		return bad("the array is md level %d layout %d, the table's %s is level %d layout %d (takeover is not supported)", s.level, s.layout, r.typ.name, level, layout)
	case s.stripe != stripe:
		return bad("the array has chunks of %d sectors, the table %d (reshape is not supported)", s.stripe, stripe)
	case s.flags&sbFlagReshape != 0 || s.reshapePos != maxSector:
		return mapper.Errorf(mapper.ErrUnsupported, "metadata device %d: the array is reshaping (position %d)", i, s.reshapePos)
	case s.newLevel != s.level || s.newLayout != s.layout || s.newStripe != s.stripe || s.deltaDisks != 0:
		return mapper.Errorf(mapper.ErrUnsupported, "metadata device %d: the array has a pending reshape or takeover", i)
	case s.dataOffset != 0 || s.newDataOffset != 0:
		return mapper.Errorf(mapper.ErrUnsupported, "metadata device %d: data offset %d (new %d): only data at offset 0 is supported", i, s.dataOffset, s.newDataOffset)
	case s.compat&sbFeatureV190 != 0 && s.sectors != r.devSectors:
		return bad("the array's devices hold %d sectors, the table's %d (resize is not supported)", s.sectors, r.devSectors)
	case s.compat&sbFeatureV190 != 0 && s.arraySectors != r.length:
		return bad("the array holds %d sectors, the table %d (resize is not supported)", s.arraySectors, r.length)
	}
	return nil
}

// checkMetaSize refuses metadata devices too small for b.
func (r *raid) checkMetaSize(b *bitmap) error {
	want := int64(b.sectors() * mapper.SectorSize)
	for i, m := range r.devs {
		if m.meta == nil {
			continue
		}
		if size, err := m.meta.Size(); err == nil && size < want {
			return fmt.Errorf("metadata device %d: %d bytes, want at least %d for %d regions", i, size, want, b.count)
		}
	}
	return nil
}

// openLegacy takes over an array with vhostdm's former "VDMRAIDB" bitmap
// on metadata device i:
//
//	byte 0 "VDMRAIDB", 8 u32 version 1, 12 u32 device count, 16 u64
//	region size, 24 u64 region count, 32 u64 per-device sectors; bit i of
//	the bitmap at byte 4096 set = region i dirty.
//
// Its dirty regions are resynced; the kernel's format replaces it when
// the array starts.
func openLegacy(r *raid, b *bitmap, i int) error {
	m := r.devs[i]
	hdr := make([]byte, mapper.SectorSize)
	if err := m.meta.ReadAt([][]byte{hdr}, 0); err != nil {
		return fmt.Errorf("metadata device %d: %w", i, err)
	}
	le := binary.LittleEndian
	version, devs, oregion, ocount, osectors := le.Uint32(hdr[8:]), le.Uint32(hdr[12:]), le.Uint64(hdr[16:]), le.Uint64(hdr[24:]), le.Uint64(hdr[32:])
	if version != 1 || devs != uint32(len(r.devs)) || oregion == 0 || osectors != r.devSectors || ocount != (osectors+oregion-1)/oregion || ocount > maxRegions {
		return mapper.Errorf(mapper.ErrCorrupt, "metadata device %d: vhostdm VDMRAIDB bitmap for another geometry (version %d, %d devices, region %d, %d regions, %d sectors)",
			i, version, devs, oregion, ocount, osectors)
	}
	region, err := tableRegion(r)
	if err != nil {
		return err
	}
	if err := b.alloc(region, r.syncSectors); err != nil {
		return err
	}
	if err := r.checkMetaSize(b); err != nil {
		return err
	}
	old := make([]byte, roundSector(int((ocount+7)/8)))
	if err := m.meta.ReadAt([][]byte{old}, legacyBitmapOffset); err != nil {
		return fmt.Errorf("metadata device %d: %w", i, err)
	}
	for j := range ocount {
		if old[j/8]&(1<<(j%8)) == 0 {
			continue
		}
		lo, hi := j*oregion, min((j+1)*oregion, r.devSectors)
		for k := lo / region; k < (hi+region-1)/region; k++ {
			b.resync[k/8] |= 1 << (k % 8)
		}
	}
	copy(b.bits, b.resync)
	r.resyncCP = math.MaxUint64 // the bitmap says what to resync
	r.log.Info("raid: migrating vhostdm's VDMRAIDB bitmap to dm-raid's superblock and md bitmap", "metadata_device", i)
	return nil
}

// writeLocked puts the bitmap, and with sb the dm-raid superblocks (one
// more event), on the metadata device of every member in service and
// flushes them; b.mu is held. A metadata device that fails takes its
// member out of service and the superblocks are written again to record
// it.
func (b *bitmap) writeLocked(r *raid, sb bool) error {
	var last error
	if b.noBitmap && !sb {
		return nil
	}
	for range len(r.devs) + 1 {
		if sb {
			b.events++
		}
		var bm []byte
		if !b.noBitmap {
			bm = b.encodeBitmapLocked(r)
		}
		var sbt superblock
		if sb {
			sbt = r.superblockTemplate(b.events)
		}
		ok, again := 0, false
		for i, m := range r.devs {
			if m.meta == nil || m.faulty.Load() {
				continue
			}
			buf, off := bm, int64(bitmapSBOffset)
			if sb {
				buf, off = make([]byte, bitmapSBOffset+len(bm)), 0
				s := sbt
				s.position = uint32(i)
				if !m.inSync.Load() {
					s.diskRecovery = r.recoveryCP.Load()
					if r.r10 != nil {
						s.diskRecovery = 0 // the checkpoint is in array sectors
					}
				}
				s.encode(buf)
				copy(buf[bitmapSBOffset:], bm)
			}
			err := m.meta.WriteAt([][]byte{buf}, off)
			if err == nil {
				err = m.meta.Flush()
			}
			if err != nil {
				last = fmt.Errorf("metadata device %d: %w", i, err)
				if b.noBitmap {
					// raid0: no member to take out of service, and the
					// superblock holds no state the data depends on.
					r.log.Warn("raid0 superblock write failed", "err", last)
					continue
				}
				r.markFailed(i, last)
				again = true
				continue
			}
			ok++
		}
		if b.noBitmap {
			return nil
		}
		if ok == 0 {
			return mapper.Errorf(mapper.ErrIO, "raid metadata: no metadata device written: %v", last)
		}
		if !again {
			return nil
		}
		sb = true
	}
	return mapper.Errorf(mapper.ErrIO, "raid metadata: %v", last)
}

// superblockTemplate is the superblock of the array's current state, for
// position 0 and an in-sync device.
func (r *raid) superblockTemplate(events uint64) superblock {
	level, layout := r.mdLevelLayout()
	s := superblock{
		numDevices: uint32(len(r.devs)), events: events,
		diskRecovery: maxSector, arrayResync: maxSector,
		level: level, layout: layout, stripe: uint32(r.p.chunkGiven),
		reshapePos:   maxSector,
		arraySectors: r.length, sectors: r.devSectors,
	}
	if cp := r.resyncMark.Load(); cp < r.syncSectors {
		s.arrayResync = cp
	}
	s.newLevel, s.newLayout, s.newStripe = s.level, s.layout, s.stripe
	for i, m := range r.devs {
		if m.faulty.Load() && i < 256 {
			s.failed[i/64] |= 1 << (i % 64)
		}
	}
	return s
}

// encodeBitmapLocked is the bitmap superblock and bits as written at byte
// 4096, padded to a sector; b.mu is held.
func (b *bitmap) encodeBitmapLocked(r *raid) []byte {
	buf := make([]byte, roundSector(bitmapSBSize+len(b.bits)))
	s := bitmapSuper{
		version: bitmapVersion, events: b.events, eventsCleared: b.eventsCleared,
		syncSz: r.syncSectors, chunkBytes: uint32(b.region * mapper.SectorSize),
		daemonSleep: uint32(max(1, b.sleep/time.Second)),
	}
	if r.p.maxWriteBehind > 0 {
		s.writeBehind = uint32(min(r.p.maxWriteBehind/2, bitmapCounterMax)) // as md records it
	}
	s.encode(buf)
	copy(buf[bitmapSBSize:], b.bits)
	return buf
}

// writeSuper records the array's state in the superblocks.
func (b *bitmap) writeSuper(r *raid) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.writeLocked(r, true)
}

// startWrite marks the regions of device sectors [lo, hi) dirty before a
// write.
func (b *bitmap) startWrite(r *raid, lo, hi uint64) error {
	first, last := lo/b.region, (hi-1)/b.region
	b.mu.Lock()
	defer b.mu.Unlock()
	set := false
	for i := first; i <= last; i++ {
		b.pending[i]++
		b.gen[i]++
		if b.bits[i/8]&(1<<(i%8)) == 0 {
			b.bits[i/8] |= 1 << (i % 8)
			set = true
		}
	}
	if !set {
		return nil
	}
	if err := b.writeLocked(r, false); err != nil {
		for i := first; i <= last; i++ {
			b.pending[i]--
		}
		return err
	}
	return nil
}

// hold keeps the regions of device sectors [lo, hi), marked by a
// startWrite not yet ended, dirty until a matching endWrite (a write
// behind).
func (b *bitmap) hold(lo, hi uint64) {
	b.mu.Lock()
	for i := lo / b.region; i <= (hi-1)/b.region; i++ {
		b.pending[i]++
	}
	b.mu.Unlock()
}

// endWrite ends a write started by startWrite.
func (b *bitmap) endWrite(lo, hi uint64) {
	b.mu.Lock()
	for i := lo / b.region; i <= (hi-1)/b.region; i++ {
		b.pending[i]--
	}
	b.mu.Unlock()
}

// needsResync reports whether the bitmap found at load had dirty regions.
func (b *bitmap) needsResync() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, v := range b.resync {
		if v != 0 {
			return true
		}
	}
	return false
}

// partialRecovery reports whether recovering members need only the
// regions the bitmap marked at load.
func (b *bitmap) partialRecovery() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.partial
}

// resyncWanted reports whether a region of device sectors [lo, hi) is to
// be resynced (or recovered).
func (b *bitmap) resyncWanted(lo, hi uint64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := lo / b.region; i <= (min(hi, b.count*b.region)-1)/b.region; i++ {
		if b.resync[i/8]&(1<<(i%8)) != 0 {
			return true
		}
	}
	return false
}

// recoveryDone ends a partial recovery: later ones are full.
func (b *bitmap) recoveryDone() {
	b.mu.Lock()
	b.partial = false
	b.mu.Unlock()
}

// resyncDone forgets the regions to resync; the daemon clears their bits.
func (b *bitmap) resyncDone() {
	b.mu.Lock()
	clear(b.resync)
	b.partial = false
	b.mu.Unlock()
}

// start writes the superblocks and bitmap (creating them on fresh
// devices) and starts the daemon.
func (b *bitmap) start(r *raid) {
	b.mu.Lock()
	if err := b.writeLocked(r, true); err != nil {
		r.log.Warn("raid metadata write failed", "err", err)
	}
	if b.stop == nil && !b.noBitmap {
		b.stop, b.done = make(chan struct{}), make(chan struct{})
		go b.daemon(r, b.stop, b.done)
	}
	b.mu.Unlock()
}

func (b *bitmap) daemon(r *raid, stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(b.sleep)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			if err := b.sync(r); err != nil {
				r.log.Warn("raid bitmap update failed", "err", err)
			}
		}
	}
}

// sync clears the bits of regions with no write in flight and none
// started since the data devices were last flushed here, unless the array
// is degraded.
func (b *bitmap) sync(r *raid) error {
	if r.failed() > 0 || r.needsRecovery() {
		return nil
	}
	b.mu.Lock()
	type cand struct {
		i   uint64
		gen uint32
	}
	var cands []cand
	for i := range b.count {
		if b.bits[i/8]&(1<<(i%8)) != 0 && b.pending[i] == 0 && b.resync[i/8]&(1<<(i%8)) == 0 {
			cands = append(cands, cand{i, b.gen[i]})
		}
	}
	b.mu.Unlock()
	if len(cands) == 0 {
		return nil
	}
	if err := r.Flush(); err != nil {
		return err
	}
	if r.failed() > 0 || r.needsRecovery() {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	changed := false
	for _, c := range cands {
		if b.pending[c.i] == 0 && b.gen[c.i] == c.gen {
			b.bits[c.i/8] &^= 1 << (c.i % 8)
			changed = true
		}
	}
	if !changed {
		return nil
	}
	b.eventsCleared = b.events
	return b.writeLocked(r, false)
}

// close stops the daemon.
func (b *bitmap) close() {
	b.mu.Lock()
	stop, done := b.stop, b.done
	b.stop, b.done = nil, nil
	b.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}
