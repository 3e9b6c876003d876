// Package raid holds the raid target (the kernel's dm-raid, drivers/md/dm-raid.c
// 1.15 over md's raid0, raid1, raid10 and raid456 personalities, kernel
// 6.1), with md's exact data and parity layouts so that arrays move between
// vhostdm and the kernel: raid0, raid1, raid10 near, far and offset, raid4,
// raid5 in all five layouts and raid6 in all eight.
//
//	import _ "github.com/vhostdm/vhostdm/targets/raid"
//
// Units: sectors of 512 bytes unless a name ends in Bytes. A stripe is one
// chunk-row across the member devices; device offsets start at 0 (no
// metadata area on the data devices, as dm-raid without reshape space).
//
// Concurrency: Map runs concurrently. Writes and every read that must
// reconstruct take the stripe's lock (one of a fixed set of mutexes, by
// stripe number), so parity is updated atomically with the data of a
// stripe, and the stripe cache's entries of a stripe are used only under
// its lock; plain reads of healthy chunks take no lock. One background
// goroutine at a time runs the sync action (resync, recover, check,
// repair), taking the same stripe locks.
package raid

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// raid is a RAID-0/1/10/4/5/6 array over member devices.
//
//	raid <raid_type> <#raid_params> <chunk_size> [sync|nosync] [rebuild <idx>]...
//	     [daemon_sleep <ms>] [min_recovery_rate <kB/s>] [max_recovery_rate <kB/s>]
//	     [write_mostly <idx>]... [max_write_behind <sectors>] [stripe_cache <stripes>]
//	     [region_size <sectors>] [raid10_copies <n>] [raid10_format near|far|offset]
//	     <#raid_devs> {<meta_dev|-> <data_dev|->}{#raid_devs}
//
// raid_type is raid0, raid1, raid10 (or raid10_near, raid10_far,
// raid10_offset: one type, as in dm-raid), raid4 (parity on the first
// device: md's PARITY_0, as kernel 6.1 maps it, not the "last disk" of
// older documents), raid5_la, raid5_ra, raid5_ls, raid5_rs, raid5_n,
// raid6_zr, raid6_nr, raid6_nc, raid6_n_6, raid6_la_6, raid6_ra_6,
// raid6_ls_6 or raid6_rs_6.
//
// raid0 stripes chunks over its devices (md's raid0 with one strip zone);
// it takes no optional parameter (dm-raid: "Invalid flags combination")
// and no missing device, and has no sync action; its metadata devices,
// when given, hold dm-raid's superblock only (no bitmap, as the kernel's
// raid0_meta arrays; a failed superblock write is logged and takes no
// device out of service). The
// target length must divide by the devices, and the per-device size by
// the chunk size.
//
// raid10 keeps raid10_copies copies (2 to #raid_devs, default 2) of every
// chunk in md's layout of raid10_format (default near, whatever the type
// name says, as dm-raid): see raid10.go. The target length times the
// copies must divide by the devices; vhostdm also wants the length and
// the per-device size in whole chunks (far: whole chunk*copies), so that
// far copies start on a chunk. A chunk is read from one valid copy and
// written to every copy; the array runs while every chunk has a copy on
// a device in service. Its sync actions, bitmap and checkpoints count
// array sectors, as md's raid10 does; INFO names the type by layout
// (raid10, raid10_far, raid10_offset) and shows in-sync/array sectors.
// chunk_size is a power of two of at least 8 sectors (raid1 ignores it and
// TABLE prints 0, as the kernel does). The target length must divide by
// the number of data devices, and the per-device size (length / data
// devices) by the chunk size. A "-" data device is missing: the array runs
// degraded and reads reconstruct its chunks. Without nosync a new array is
// resynchronised in the background (parity recomputed, raid1 legs copied
// from the first); "rebuild <idx>" recovers device idx from the others.
// The sync actions run between min_recovery_rate and max_recovery_rate
// (kB/s per device, as md's sync_speed_min and sync_speed_max): never
// faster than the maximum, and above the minimum only while the guest
// sends no request (guest I/O has priority); without min_recovery_rate
// they do not give way. write_mostly legs of raid1 are read last; with
// metadata devices (a bitmap) and max_write_behind <sectors>, writes to
// them complete in the background, up to max_write_behind/2 writes behind
// per leg, as md counts the value dm-raid passes it (behind.go); without
// a bitmap max_write_behind is checked and echoed only. daemon_sleep is
// the bitmap daemon's period. stripe_cache is the number of entries of the
// raid4/5/6 stripe cache (cache.go: 4 KiB rows across every member, as
// md's stripe_heads), set up as dm-raid does: 256 when not given, raised
// to chunk_size/2 when smaller, and refused outside md's 17..32768 unless
// it is 256; TABLE echoes it only when given, as the count set up (as the
// kernel prints max_nr_stripes), and INFO does not show it.
//
// Metadata devices: when given, they hold the kernel's formats (see
// superblock.go and bitmap.go): dm-raid's superblock in the first 4 KiB
// and md's write-intent bitmap (version 4, region_size sectors per bit,
// default 8192) from byte 4096, so that arrays with metadata devices move
// between vhostdm and the kernel both ways. A crash resyncs only the
// regions being written; a failed device is recorded in the superblocks
// (failed_devices) before the write that found it failed completes, and
// when it is back in the table it is recovered only in the regions
// written meanwhile. An existing array's superblock must match the table
// (type, chunk, device count, positions, size: takeover, reshape and
// resize are refused with the kernel's reasons); a device with a blank
// metadata device joins only with "rebuild". Metadata in vhostdm's former
// format ("VDMRAIDB") is migrated on activation.
//
// INFO:  "raid5_ls 4 AAAA 8192/8192 idle 0 0 -" (type, #devices, one
// health character per device: A alive and in sync, a alive but not in
// sync, D failed, - missing; then synced/per-device sectors, the sync
// action, the mismatch count in sectors from the last check or repair,
// the data offset 0, and "-" for no journal).
// TABLE: "raid5_ls 3 64 nosync rebuild 1 4 - /img/a - /img/b - /img/c - /img/d".
//
// Messages: idle, frozen, resync, recover, check, repair (dm-raid's; the
// last four fail with "busy" while another action runs). Events:
// "device-failed" (data: index, device, error) when I/O to a device fails
// and it leaves service, and "in-sync" when a resync or recovery
// completes.
//
// Where vhostdm differs from kernel 6.1: discards are refused on raid4/5/6
// (as the kernel does unless raid456's devices_handle_discard_safely is
// set) and passed to every leg on raid1; write-zeroes writes zeros through
// the parity path.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "raid", Version: [3]int{1, 15, 1}, New: newRaid})
}

// maxDevices bounds #raid_devs (dm-raid's MAX_RAID_DEVICES is 253).
const maxDevices = 64

// lockCount is the number of stripe locks; stripes share them by number.
const lockCount = 1024

// raid1Unit is the sectors one raid1 lock and sync step covers.
const raid1Unit = 128

// mismatchUnit is md's STRIPE_SECTORS: mismatches count in 4 KiB rows.
const mismatchUnit = 8

type member struct {
	name, metaName string // as the table gave them; "-" when missing
	dev, meta      mapper.Backend
	writeMostly    bool
	rebuild        bool

	faulty atomic.Bool // failed or missing: out of service
	inSync atomic.Bool // holds valid data beyond the recovery checkpoint
}

// params are the optional raid parameters as given.
type params struct {
	sync, nosync     bool
	rebuild          []int
	daemonSleep      int64 // ms, -1 when not given
	minRate, maxRate int64 // kB/s, -1 when not given
	writeMostly      []int
	maxWriteBehind   int64 // -1 when not given
	stripeCache      int64
	regionSize       int64
	copies           int64  // raid10_copies, -1 when not given
	format           string // raid10_format, "" when not given
	count            int    // #raid_params including chunk_size
	chunkGiven       uint64
}

type raid struct {
	// Immutable after construction.
	typ        *raidType
	geo        *geometry // raid4/5/6 only
	r10        *r10geo   // raid10 only
	devs       []*member
	p          params
	chunk      uint64 // sectors; raid1: raid1Unit
	devSectors uint64 // used sectors of each device
	// syncSectors is the extent of the sync actions, the bitmap and the
	// checkpoints: devSectors, or for raid10 the array's length (md's
	// raid10 resyncs by array address).
	syncSectors uint64
	length      uint64
	event       mapper.EventRaiser
	log         *slog.Logger
	bm          *bitmap        // nil without metadata devices
	cacheSize   int            // stripe cache entries (raid4/5/6), as TABLE reports them
	cache       *stripeCache   // nil for raid1 (and in tests without a cache)
	behind      []*behindQueue // write-behind queues by member, nil without write-behind

	locks [lockCount]sync.Mutex

	rr         atomic.Uint32 // raid1 read balancing
	recoveryCP atomic.Uint64 // device sectors below which recovering members are valid
	resyncMark atomic.Uint64 // resyncCP, for the superblocks (read without mu)
	guestAt    atomic.Int64  // when the last request was mapped (UnixNano), for the sync throttle

	// Sync state, guarded by mu.
	mu         sync.Mutex
	action     string // running action: resync, recover, check, repair; or idle, frozen
	progress   uint64 // device sectors done by the running action
	resyncCP   uint64 // parity (raid1: legs) consistent below this device sector
	mismatches uint64 // sectors, from the last check or repair
	suspended  bool
	stop       chan struct{} // closes to stop the worker
	done       chan struct{} // closed when the worker has stopped
}

func newRaid(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) < 4 {
		return nil, fmt.Errorf("want at least <raid_type> <#raid_params> <chunk_size> <#raid_devs>, got %d arguments", len(args))
	}
	a := mapper.NewArgs(args)
	tname, _ := a.Next("raid type")
	typ, err := lookupType(tname)
	if err != nil {
		return nil, err
	}
	np, err := a.Uint("raid parameter count", 1, 64)
	if err != nil {
		return nil, err
	}
	if uint64(a.Len()) < np {
		return nil, fmt.Errorf("raid parameter count %d: only %d arguments follow", np, a.Len())
	}
	p, err := parseParams(typ, args[2:2+np])
	if err != nil {
		return nil, err
	}
	for range np {
		a.Next("")
	}
	n, err := a.Uint("raid device count", uint64(typ.minDevs), maxDevices)
	if err != nil {
		return nil, err
	}
	if uint64(a.Len()) != 2*n {
		return nil, fmt.Errorf("raid device count %d: want %d <meta_dev> <data_dev> arguments, got %d", n, 2*n, a.Len())
	}
	for _, i := range append(slices.Clone(p.rebuild), p.writeMostly...) {
		if uint64(i) >= n {
			return nil, fmt.Errorf("device index %d: must be below raid device count %d", i, n)
		}
	}
	r := &raid{typ: typ, p: p, length: c.Length, event: c.Event(), log: c.Logger(), action: "idle"}
	data := int(n) - typ.parity()
	switch typ.level {
	case 1:
		r.chunk = raid1Unit
		r.devSectors = c.Length
	case 10:
		r.chunk = p.chunkGiven
		copies, format := 2, "near"
		if p.copies >= 0 {
			copies = int(p.copies)
		}
		if p.format != "" {
			format = p.format
		}
		if r.devSectors, err = r10Check(c.Length, int(n), copies, format, r.chunk); err != nil {
			return nil, err
		}
		r.r10 = newR10(int(n), copies, format, r.chunk, r.devSectors)
	case 0:
		r.chunk = p.chunkGiven
		if c.Length%n != 0 {
			return nil, fmt.Errorf("target length %d not divisible by %d devices", c.Length, n)
		}
		r.devSectors = c.Length / n
		if r.devSectors%r.chunk != 0 {
			return nil, fmt.Errorf("device size %d (target length %d / %d devices) not divisible by chunk size %d", r.devSectors, c.Length, n, r.chunk)
		}
	default:
		r.chunk = p.chunkGiven
		if c.Length%uint64(data) != 0 {
			return nil, fmt.Errorf("target length %d not divisible by %d data devices", c.Length, data)
		}
		r.devSectors = c.Length / uint64(data)
		if r.devSectors%r.chunk != 0 {
			return nil, fmt.Errorf("device size %d (target length %d / %d data devices) not divisible by chunk size %d", r.devSectors, c.Length, data, r.chunk)
		}
		r.geo = newGeometry(typ, int(n), r.chunk)
		if r.cacheSize, err = stripeCacheEntries(p.stripeCache, r.chunk); err != nil {
			return nil, err
		}
		entries := r.cacheSize
		if testCacheEntries > 0 {
			entries = testCacheEntries
		}
		if !testNoCache {
			r.cache = newStripeCache(entries, int(n))
		}
	}
	r.syncSectors = r.devSectors
	if r.r10 != nil {
		r.syncSectors = c.Length
	}
	if r.devSectors > mapper.MaxSector {
		return nil, fmt.Errorf("target length %d: devices beyond the largest device", c.Length)
	}
	type pair struct{ meta, dev string }
	var pairs []pair
	missing, metas := 0, 0
	for i := range n {
		meta, _ := a.Next("metadata device")
		dev, _ := a.Next("data device")
		if dev == "-" {
			missing++
			if slices.Contains(p.rebuild, int(i)) {
				return nil, fmt.Errorf("rebuild %d: device %d is missing", i, i)
			}
		}
		if meta != "-" {
			metas++
		}
		if typ.level == 0 && dev == "-" {
			return nil, fmt.Errorf("device %d: missing, and raid0 has no redundancy", i)
		}
		pairs = append(pairs, pair{meta, dev})
	}
	redundancy := typ.parity()
	if typ.level == 1 {
		redundancy = int(n) - 1
	}
	if r.r10 != nil {
		if r.r10.lost(func(i int) bool { return pairs[i].dev == "-" || slices.Contains(p.rebuild, i) }) {
			return nil, fmt.Errorf("%d missing and %d rebuilt devices: every copy of some chunks is among them", missing, len(p.rebuild))
		}
	} else if missing+len(p.rebuild) > redundancy {
		return nil, fmt.Errorf("%d missing and %d rebuilt devices: %s survives %d", missing, len(p.rebuild), typ.name, redundancy)
	}
	for i, pr := range pairs {
		m := &member{name: pr.dev, metaName: pr.meta, writeMostly: slices.Contains(p.writeMostly, i), rebuild: slices.Contains(p.rebuild, i)}
		if pr.meta != "-" {
			if m.meta, err = c.Open(pr.meta); err != nil {
				return nil, fmt.Errorf("metadata device %d: %w", i, err)
			}
		}
		if pr.dev != "-" {
			if m.dev, err = c.Open(pr.dev); err != nil {
				return nil, fmt.Errorf("data device %d: %w", i, err)
			}
		}
		m.faulty.Store(m.dev == nil)
		m.inSync.Store(m.dev != nil && !m.rebuild)
		r.devs = append(r.devs, m)
	}
	if p.nosync || typ.level == 0 {
		r.resyncCP = math.MaxUint64
	}
	if metas > 0 {
		if r.bm, err = openBitmap(r); err != nil {
			return nil, err
		}
	}
	r.resyncMark.Store(r.resyncCP)
	r.startBehind()
	return r, nil
}

// parseParams reads <chunk_size> and the optional parameters.
func parseParams(typ *raidType, args []string) (params, error) {
	p := params{daemonSleep: -1, minRate: -1, maxRate: -1, maxWriteBehind: -1, stripeCache: -1, regionSize: -1, copies: -1, count: len(args)}
	chunk, err := mapper.ParseUint("chunk size", args[0], 0, 1<<30)
	if err != nil {
		return p, err
	}
	if typ.level != 1 {
		if chunk < 8 || chunk&(chunk-1) != 0 {
			return p, fmt.Errorf("chunk size %d: must be a power of two of at least 8 sectors", chunk)
		}
		p.chunkGiven = chunk
	}
	seen := map[string]bool{}
	a := mapper.NewArgs(args[1:])
	for a.Len() > 0 {
		key, _ := a.Next("raid parameter")
		if typ.level == 0 {
			return p, fmt.Errorf("raid parameter %q: raid0 takes none (dm-raid: Invalid flags combination)", key)
		}
		switch key {
		case "sync", "nosync":
			if p.sync || p.nosync {
				return p, fmt.Errorf("raid parameter %q: only one of sync and nosync may be given", key)
			}
			p.sync, p.nosync = key == "sync", key == "nosync"
			continue
		case "raid10_format":
			if typ.level != 10 {
				return p, fmt.Errorf("raid parameter %q: only raid10 has a format (dm-raid: 'raid10_format' is an invalid parameter for this RAID type)", key)
			}
			if p.format != "" {
				return p, fmt.Errorf("raid parameter %q: duplicated", key)
			}
			v, err := a.Next("raid10_format")
			if err != nil {
				return p, fmt.Errorf("raid parameter %q: missing value", key)
			}
			switch v {
			case "near", "far", "offset":
				p.format = v
			default:
				return p, fmt.Errorf("raid10_format %q: want near, far or offset (dm-raid: Invalid 'raid10_format' value given)", v)
			}
			continue
		}
		v, err := a.Uint(key, 0, math.MaxInt32)
		if err != nil {
			if strings.HasPrefix(err.Error(), "missing") {
				return p, fmt.Errorf("raid parameter %q: missing value", key)
			}
			return p, err
		}
		repeatable := key == "rebuild" || key == "write_mostly"
		if seen[key] && !repeatable {
			return p, fmt.Errorf("raid parameter %q: duplicated", key)
		}
		seen[key] = true
		switch key {
		case "rebuild":
			if slices.Contains(p.rebuild, int(v)) {
				return p, fmt.Errorf("rebuild %d: duplicated", v)
			}
			p.rebuild = append(p.rebuild, int(v))
		case "write_mostly":
			if typ.level != 1 {
				return p, fmt.Errorf("write_mostly %d: only raid1 has write-mostly devices", v)
			}
			if slices.Contains(p.writeMostly, int(v)) {
				return p, fmt.Errorf("write_mostly %d: duplicated", v)
			}
			p.writeMostly = append(p.writeMostly, int(v))
		case "daemon_sleep":
			if v < 1 {
				return p, fmt.Errorf("daemon_sleep %d: must be at least 1 ms", v)
			}
			p.daemonSleep = int64(v)
		case "min_recovery_rate":
			p.minRate = int64(v)
		case "max_recovery_rate":
			if v < 1 {
				return p, fmt.Errorf("max_recovery_rate %d: must be at least 1 kB/s", v)
			}
			p.maxRate = int64(v)
		case "max_write_behind":
			if typ.level != 1 {
				return p, fmt.Errorf("max_write_behind %d: only raid1 writes behind", v)
			}
			p.maxWriteBehind = int64(v)
		case "stripe_cache":
			if typ.level == 1 || typ.level == 10 {
				return p, fmt.Errorf("stripe_cache %d: only raid4/5/6 have a stripe cache", v)
			}
			p.stripeCache = int64(v)
		case "region_size":
			if v < 8 || v&(v-1) != 0 {
				return p, fmt.Errorf("region_size %d: must be a power of two of at least 8 sectors", v)
			}
			p.regionSize = int64(v)
		case "raid10_copies":
			if typ.level != 10 {
				return p, fmt.Errorf("raid10_copies %d: only raid10 has copies (dm-raid: Invalid flags combination)", v)
			}
			p.copies = int64(v)
		default:
			return p, fmt.Errorf("raid parameter %q: unknown", key)
		}
	}
	if p.minRate >= 0 && p.maxRate >= 0 && p.minRate > p.maxRate {
		return p, fmt.Errorf("min_recovery_rate %d: greater than max_recovery_rate %d", p.minRate, p.maxRate)
	}
	slices.Sort(p.rebuild)
	slices.Sort(p.writeMostly)
	return p, nil
}

// Discards implements mapper.Discarder: raid0, raid1 and raid10 pass discards to their legs; parity levels (raid4/5/6), whose parity a discard would leave stale, do not, as the kernel without devices_handle_discard_safely.
func (r *raid) Discards() bool { return r.geo == nil }

// WritesZeroes implements mapper.Discarder.
func (r *raid) WritesZeroes() bool { return true }

// Map implements mapper.Target.
func (r *raid) Map(req *mapper.Request) error {
	r.guestAt.Store(time.Now().UnixNano())
	var err error
	switch req.Op {
	case mapper.OpFlush:
		return r.Flush()
	case mapper.OpRead:
		switch {
		case r.typ.level == 0:
			return r.r0IO(mapper.OpRead, req.Sector, req.Sectors, req.Data)
		case r.r10 != nil:
			return r.r10Read(req.Sector, req.Sectors, req.Data)
		case r.geo == nil:
			return r.mirrorRead(req.Sector, req.Sectors, req.Data)
		}
		return r.stripes(req.Sector, req.Sectors, req.Data, false)
	case mapper.OpWrite:
		err = r.write(req.Sector, req.Sectors, req.Data)
	case mapper.OpWriteZeroes:
		err = r.writeZeroes(req.Sector, req.Sectors)
	case mapper.OpDiscard:
		switch {
		case r.typ.level == 0:
			err = r.r0IO(mapper.OpDiscard, req.Sector, req.Sectors, nil)
		case r.r10 != nil:
			err = r.r10Write(mapper.OpDiscard, req.Sector, req.Sectors, nil)
		case r.geo != nil:
			return mapper.Errorf(mapper.ErrUnsupported, "discard: not supported by %s", r.typ.name)
		default:
			err = r.mirrorDiscard(req.Sector, req.Sectors)
		}
	default:
		return mapper.Errorf(mapper.ErrUnsupported, "%s: not supported", req.Op)
	}
	if err == nil && req.FUA {
		err = r.Flush()
	}
	return err
}

// write writes data at array sectors [sector, sector+n).
func (r *raid) write(sector, n uint64, data [][]byte) error {
	switch {
	case r.typ.level == 0:
		return r.r0IO(mapper.OpWrite, sector, n, data)
	case r.r10 != nil:
		return r.r10Write(mapper.OpWrite, sector, n, data)
	case r.geo == nil:
		return r.mirrorWrite(sector, n, data)
	}
	return r.stripes(sector, n, data, true)
}

// Flush implements mapper.Flusher: every device in service is flushed.
// raid0 fails the flush when a device fails it.
func (r *raid) Flush() error {
	var wg sync.WaitGroup
	var r0err atomic.Pointer[error]
	for i, m := range r.devs {
		if m.faulty.Load() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := m.dev.Flush(); err != nil {
				if r.typ.level == 0 {
					r0err.Store(&err)
					return
				}
				r.fail(i, err)
			}
		}()
	}
	wg.Wait()
	if e := r0err.Load(); e != nil {
		return mapper.Errorf(mapper.ErrIO, "raid0 flush: %v", *e)
	}
	return r.survives()
}

// writeZeroes writes zeros through the write path, a chunk at a time.
func (r *raid) writeZeroes(sector, n uint64) error {
	zero := make([]byte, min(n, 1024)<<mapper.SectorShift)
	for n > 0 {
		k := min(n, 1024)
		if err := r.write(sector, k, [][]byte{zero[:k<<mapper.SectorShift]}); err != nil {
			return err
		}
		sector, n = sector+k, n-k
	}
	return nil
}

// fail takes device i out of service after err, once, and records it in
// the superblocks (failed_devices) before returning.
func (r *raid) fail(i int, err error) {
	if r.markFailed(i, err) && r.bm != nil {
		if err := r.bm.writeSuper(r); err != nil {
			r.log.Warn("raid metadata write failed", "err", err)
		}
	}
}

// markFailed takes device i out of service after err; it reports whether
// the device was in service.
func (r *raid) markFailed(i int, err error) bool {
	m := r.devs[i]
	if !m.faulty.CompareAndSwap(false, true) {
		return false
	}
	r.invalidate()
	r.log.Warn("raid device failed", "index", i, "device", m.name, "err", err)
	r.event("device-failed", map[string]any{"index": i, "device": m.name, "error": err.Error()})
	return true
}

// setResyncCP sets resyncCP; r.mu is held.
func (r *raid) setResyncCP(v uint64) {
	r.resyncCP = v
	r.resyncMark.Store(v)
}

// failed returns how many devices are out of service.
func (r *raid) failed() int {
	f := 0
	for _, m := range r.devs {
		if m.faulty.Load() {
			f++
		}
	}
	return f
}

// survives returns an error if more devices failed than the array survives.
func (r *raid) survives() error {
	if r.r10 != nil {
		if r.r10.lost(func(i int) bool { return r.devs[i].faulty.Load() }) {
			return mapper.Errorf(mapper.ErrIO, "%d of %d devices failed: every copy of some chunks is lost", r.failed(), len(r.devs))
		}
		return nil
	}
	red := r.typ.parity()
	if r.typ.level == 1 {
		red = len(r.devs) - 1
	}
	if f := r.failed(); f > red {
		return mapper.Errorf(mapper.ErrIO, "%d of %d devices failed: %s survives %d", f, len(r.devs), r.typ.name, red)
	}
	return nil
}

// readable reports whether device i holds valid data for device sectors
// below end.
func (r *raid) readable(i int, end uint64) bool {
	m := r.devs[i]
	if m.faulty.Load() {
		return false
	}
	return m.inSync.Load() || end <= r.recoveryCP.Load()
}

func (r *raid) lock(unit uint64) *sync.Mutex { return &r.locks[unit%lockCount] }

// Status implements mapper.Target.
func (r *raid) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusInfo {
		return r.info()
	}
	var b strings.Builder
	p := &r.p
	chunk := p.chunkGiven
	fmt.Fprintf(&b, "%s %d %d", r.typ.name, p.count, chunk)
	if p.sync {
		b.WriteString(" sync")
	}
	if p.nosync {
		b.WriteString(" nosync")
	}
	for _, i := range p.rebuild {
		fmt.Fprintf(&b, " rebuild %d", i)
	}
	opt := func(name string, v int64) {
		if v >= 0 {
			fmt.Fprintf(&b, " %s %d", name, v)
		}
	}
	opt("daemon_sleep", p.daemonSleep)
	opt("min_recovery_rate", p.minRate)
	opt("max_recovery_rate", p.maxRate)
	for _, i := range p.writeMostly {
		fmt.Fprintf(&b, " write_mostly %d", i)
	}
	opt("max_write_behind", p.maxWriteBehind)
	if p.stripeCache >= 0 {
		opt("stripe_cache", int64(r.cacheSize))
	}
	opt("region_size", p.regionSize)
	opt("raid10_copies", p.copies)
	if p.format != "" {
		fmt.Fprintf(&b, " raid10_format %s", p.format)
	}
	fmt.Fprintf(&b, " %d", len(r.devs))
	for _, m := range r.devs {
		fmt.Fprintf(&b, " %s %s", m.metaName, m.name)
	}
	return b.String()
}

// info is the INFO status line.
func (r *raid) info() string {
	r.mu.Lock()
	action, mism := r.action, r.mismatches
	var done uint64
	switch action {
	case "resync", "recover", "check", "repair":
		done = r.progress
	default:
		done = min(r.resyncCP, r.syncSectors)
	}
	resyncing := action == "resync"
	r.mu.Unlock()
	var b strings.Builder
	name := r.typ.name
	if r.r10 != nil {
		name = r.r10.infoName()
	}
	fmt.Fprintf(&b, "%s %d ", name, len(r.devs))
	for _, m := range r.devs {
		switch {
		case m.dev == nil:
			b.WriteByte('-')
		case m.faulty.Load():
			b.WriteByte('D')
		case resyncing || !m.inSync.Load():
			b.WriteByte('a')
		default:
			b.WriteByte('A')
		}
	}
	fmt.Fprintf(&b, " %d/%d %s %d 0 -", done, r.syncSectors, action, mism)
	return b.String()
}

// Message implements mapper.Messenger: dm-raid's sync actions.
func (r *raid) Message(args []string) (string, error) {
	if r.typ.level == 0 {
		return "", mapper.Errorf(mapper.ErrInvalid, "message %q: raid0 has no sync actions", strings.Join(args, " "))
	}
	if len(args) != 1 {
		return "", mapper.Errorf(mapper.ErrInvalid, "message %q: want one of idle, frozen, resync, recover, check, repair", strings.Join(args, " "))
	}
	switch a := args[0]; a {
	case "idle", "frozen":
		r.stopWorker()
		r.mu.Lock()
		r.action = a
		r.mu.Unlock()
		if a == "idle" {
			r.startNeeded()
		}
		return "", nil
	case "resync", "recover", "check", "repair":
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.action != "idle" && r.action != "frozen" {
			return "", mapper.Errorf(mapper.ErrBusy, "message %q: %s in progress", a, r.action)
		}
		if r.suspended {
			return "", mapper.Errorf(mapper.ErrBusy, "message %q: suspended", a)
		}
		switch a {
		case "resync":
			r.setResyncCP(0)
		case "recover":
			if !r.needsRecovery() {
				r.action = "idle"
				return "", nil
			}
		case "check", "repair":
			if r.failed() > 0 {
				return "", mapper.Errorf(mapper.ErrBusy, "message %q: array is degraded", a)
			}
			r.mismatches = 0
		}
		r.startLocked(a, 0)
		return "", nil
	}
	return "", mapper.Errorf(mapper.ErrInvalid, "message %q: want one of idle, frozen, resync, recover, check, repair", args[0])
}

// Presuspend implements mapper.Suspender: the sync action stops (it
// resumes from its checkpoint on Resume).
func (r *raid) Presuspend(noflush bool) error {
	r.stopWorker()
	r.drainBehind(-1)
	r.mu.Lock()
	r.suspended = true
	r.mu.Unlock()
	r.invalidate()
	if r.bm != nil {
		if err := r.bm.sync(r); err != nil {
			return err
		}
		return r.bm.writeSuper(r)
	}
	return nil
}

// Resume implements mapper.Suspender: a needed resync or recovery starts.
func (r *raid) Resume() error {
	r.mu.Lock()
	r.suspended = false
	r.mu.Unlock()
	r.invalidate()
	if r.bm != nil {
		r.bm.start(r)
	}
	r.startNeeded()
	return nil
}

// Close implements mapper.Target.
func (r *raid) Close() error {
	r.stopWorker()
	r.stopBehind()
	if r.bm != nil {
		r.bm.close()
	}
	return nil
}

// Areas implements mapper.AreaLister.
func (r *raid) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	for _, m := range r.devs {
		if m.dev != nil {
			if err := fn(m.dev, 0, r.devSectors); err != nil {
				return err
			}
		}
	}
	if r.bm != nil {
		for _, m := range r.devs {
			if m.meta != nil {
				if err := fn(m.meta, 0, r.bm.sectors()); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// errTooManyFailed is returned when a stripe cannot be read or rebuilt.
var errTooManyFailed = errors.New("too many failed devices in stripe")
