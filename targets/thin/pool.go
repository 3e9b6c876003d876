// Package thin implements the thin-pool and thin targets on the Linux
// kernel's thin-provisioning metadata format (dm-thin-metadata.c, kept by
// package pdata), so that a pool moves between vhostdm, the kernel and
// LVM without conversion; thin-provisioning-tools (thin_check, thin_dump,
// thin_restore) read and write the same metadata.
//
//	thin-pool <metadata dev> <data dev> <data block size> <low water mark> [<#features> <feature>...]
//	thin <pool dev> <dev id> [<external origin dev>]
//
// Features: skip_block_zeroing, ignore_discard, no_discard_passdown,
// read_only, error_if_no_space. The data block size is in sectors, a
// multiple of 128 from 128 to 2097152; the low water mark is in data
// blocks. A metadata device whose first 4 KiB are zero is formatted.
// The pool's data blocks are its table length divided by the block size;
// reloading a longer table (over a larger data device) grows the pool.
//
// Pool INFO, as kernel 6.1 prints it:
//
//	<transaction id> <used metadata blocks>/<total metadata blocks>
//	<used data blocks>/<total data blocks> <held metadata root|->
//	rw|ro|out_of_data_space discard_passdown|no_discard_passdown|ignore_discard
//	queue_if_no_space|error_if_no_space needs_check|- <metadata low water mark>
//
// ("0 419/4096 3/1024 - rw discard_passdown queue_if_no_space - 1024"), or
// "Fail". Pool TABLE: "/meta.img /data.img 128 0 1 skip_block_zeroing"
// (the backend names as loaded, where the kernel prints major:minor).
// Thin INFO: "<mapped sectors> <highest mapped sector|->" ("384 1663");
// TABLE: "/dev/mapper/pool 1".
//
// Messages to the pool: create_thin <id>, create_snap <id> <origin id>
// (suspend an active origin first), delete <id>, set_transaction_id
// <current> <new>, reserve_metadata_snap, release_metadata_snap. Each
// successful message commits.
//
// Metadata is committed when a thin device or the pool is flushed (after
// the data device is flushed), on suspend, every second when changed, and
// after each message; an acknowledged flush survives a crash. A commit
// closes the transaction under the pool's lock and writes it without:
// guest reads and writes, and the next transaction, go on meanwhile.
//
// Metadata blocks read are kept in a least-recently-used cache of clean
// blocks, bounded per pool by the device's metadata cache option
// (mapper.DeviceOptions.MetadataCache, the TOML device.metadata-cache;
// it can change while the pool runs) or, without it, by a default sized
// for the pool: 48 bytes per data block (the kernel's sizing guide for
// the metadata device: a fully provisioned pool's mapping and space
// maps) in 4 KiB blocks, at least 1 MiB, at most 128 MiB, never more
// than the metadata device; it is computed again when the pool grows.
// The kernel bounds its dm-bufio caches differently: one budget for all
// clients of the host (the dm_bufio_cache_size module parameter, by
// default 2% of memory or 25% of vmalloc space, whichever is lower),
// buffers unused for 300 s released down to 256 KiB per client, and a
// shrinker under memory pressure; dm-thin-metadata sets no per-pool
// bound. The table grammar stays the kernel's: the option is not in it.
//
// Space, as kernel 6.1 (each case compared with its status line and
// event count in TestNoSpaceKernel): an allocation that finds the free
// data blocks at the low water mark raises "low_water_mark" once per
// resume. A write that needs a block when none is free (after a commit
// to reclaim freed ones) puts the pool in out_of_data_space ("out_of_data_space"
// event) and fails at once with error_if_no_space, or waits
// (queue_if_no_space) up to the no-space timeout of 60 s, after which
// the pool turns to error_if_no_space ("error_if_no_space" event) and
// the waiting writes fail. Writes to mapped blocks go on. When the free
// metadata blocks fall to the reserve (a tenth, at most 4096) the pool is
// out of metadata space: status ro, messages and new blocks refused
// ("out_of_metadata_space"); falling to the metadata low water mark
// (the last status field) raises "metadata_low_water_mark". A resume
// returns the pool to write mode ("write" event on a change), as the
// kernel's; reloading a longer table over a larger data device grows the
// data, a reload over a larger metadata device grows the metadata space
// map (the superblock's metadata_nr_blocks stays, as the kernel's). A
// pool whose metadata has needs_check set is read-only and does not grow.
//
// Sharing follows the kernel: a block mapped before the device's last
// snapshot is treated as shared and copied on its first write.
//
// The pool finds its thin devices' pool through the manager's shared
// state: a thin table names the pool as /dev/mapper/NAME.
package thin

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/targets/thin/pdata"
)

func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "thin-pool", Version: [3]int{1, 22, 0}, Features: mapper.Singleton, New: newPool})
	mapper.RegisterTarget(&mapper.TargetType{Name: "thin", Version: [3]int{1, 22, 0}, New: newThin})
}

// Limits of the kernel's pool_ctr.
const (
	minBlockSize = 128
	maxBlockSize = 2097152
	commitPeriod = time.Second
)

// noSpaceTimeout is how long a write that needs a block waits in a full
// pool without error_if_no_space, as the kernel's no_space_timeout module
// parameter (default 60 s). Pools read it when they are made; tests
// shorten it.
var noSpaceTimeout = 60 * time.Second

// features are the pool's optional behaviours, as in the table.
type features struct {
	skipZeroing    bool
	ignoreDiscard  bool
	noPassdown     bool
	readOnly       bool
	errorIfNoSpace bool
}

// String returns the features as the table has them: "<#features> <feature>...".
func (f features) String() string {
	var w []string
	for _, x := range []struct {
		on   bool
		name string
	}{{f.skipZeroing, "skip_block_zeroing"}, {f.ignoreDiscard, "ignore_discard"}, {f.noPassdown, "no_discard_passdown"},
		{f.readOnly, "read_only"}, {f.errorIfNoSpace, "error_if_no_space"}} {
		if x.on {
			w = append(w, x.name)
		}
	}
	return strings.Join(append([]string{strconv.Itoa(len(w))}, w...), " ")
}

func parseFeatures(a *mapper.Args) (features, error) {
	var f features
	if a.Len() == 0 {
		return f, nil
	}
	n, err := a.Uint("feature count", 0, 5)
	if err != nil {
		return f, err
	}
	for i := uint64(0); i < n; i++ {
		w, err := a.Next("feature")
		if err != nil {
			return f, err
		}
		switch w {
		case "skip_block_zeroing":
			f.skipZeroing = true
		case "ignore_discard":
			f.ignoreDiscard = true
		case "no_discard_passdown":
			f.noPassdown = true
		case "read_only":
			f.readOnly = true
		case "error_if_no_space":
			f.errorIfNoSpace = true
		default:
			return f, fmt.Errorf("feature %q: unrecognised pool feature", w)
		}
	}
	return f, a.Done()
}

// registry finds pools: by metadata device (one pool object per
// metadata, shared by the tables loaded over it) and by the name of the
// device whose live table is the pool (for thin tables).
type registry struct {
	mu     sync.Mutex
	byMeta map[any]*pool
	byName map[string]*pool
}

type registryKey struct{}

func registryOf(c *mapper.Ctx) *registry {
	return c.Shared(registryKey{}, func() any {
		return &registry{byMeta: map[any]*pool{}, byName: map[string]*pool{}}
	}).(*registry)
}

// pool is one pool's state, shared by the pool tables loaded over its
// metadata device and the thin targets using it.
type pool struct {
	reg     *registry
	metaKey any
	refs    int // guarded by reg.mu

	blockSize uint64 // sectors; immutable

	// commitMu serialises commits; taken before mu. A commit holds mu
	// only to close the transaction and, after its I/O, to land it.
	commitMu sync.Mutex

	mu         sync.Mutex // guards everything below
	committing bool       // a commit's I/O is under way
	md         *metadata
	data       mapper.Backend // the live pool table's data device
	feat       features
	lowWater   uint64
	event      mapper.EventRaiser
	log        *slog.Logger
	failed     error // metadata failure: the pool is down
	noSpace    bool  // out_of_data_space
	errNoSpace bool  // error_if_no_space: the table's, or set by the no-space timeout
	metaOOS    bool  // out of metadata space: read-only until the metadata grows
	spaceTimer *time.Timer
	timeout    time.Duration // noSpaceTimeout when the pool was made
	lowRaised  bool
	grown      *sync.Cond // broadcast when space may have appeared
	pending    []uint64   // data blocks freed, to pass discards down
	metaTotal  uint64
	live       *poolTarget // the table whose settings are the pool's
	cacheBytes int64       // the live table's metadata cache option; 0: default
	cacheLimit int         // metadata cache bound in force, in blocks

	locksMu sync.Mutex
	locks   map[blockKey]*blockLock

	stop chan struct{}
	done chan struct{}
}

type blockKey struct{ dev, vb uint64 }

type blockLock struct {
	mu   sync.Mutex
	refs int
}

// lockBlock serialises changes to one virtual block of one device.
func (p *pool) lockBlock(k blockKey) func() {
	p.locksMu.Lock()
	l := p.locks[k]
	if l == nil {
		l = &blockLock{}
		p.locks[k] = l
	}
	l.refs++
	p.locksMu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		p.locksMu.Lock()
		if l.refs--; l.refs == 0 {
			delete(p.locks, k)
		}
		p.locksMu.Unlock()
	}
}

// poolTarget is one thin-pool table line.
type poolTarget struct {
	p        *pool
	device   string
	meta     mapper.Backend
	data     mapper.Backend
	feat     features
	lowWater uint64 // data blocks
	length   uint64 // sectors
	event    mapper.EventRaiser
	// cacheBytes is the device's metadata cache option (0: the
	// default sized for the pool), applied when the table is live.
	// Guarded by p.mu.
	cacheBytes int64
}

func newPool(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) < 4 {
		return nil, fmt.Errorf("want <metadata dev> <data dev> <data block size> <low water mark> [<#features> <feature>...], got %d argument(s)", len(args))
	}
	a := mapper.NewArgs(args)
	metaName, _ := a.Next("metadata dev")
	dataName, _ := a.Next("data dev")
	bs, err := a.Uint("data block size", minBlockSize, maxBlockSize)
	if err != nil {
		return nil, err
	}
	if bs%minBlockSize != 0 {
		return nil, fmt.Errorf("data block size %d: not a multiple of %d sectors", bs, minBlockSize)
	}
	lw, err := a.Uint("low water mark", 0, mapper.MaxSector)
	if err != nil {
		return nil, err
	}
	feat, err := parseFeatures(a)
	if err != nil {
		return nil, err
	}
	if c.Length < bs {
		return nil, fmt.Errorf("pool length %d: less than one data block of %d sectors", c.Length, bs)
	}
	nrData := c.Length / bs
	if nrData > maxDataBlockNr {
		return nil, fmt.Errorf("pool of %d data blocks: more than the format's %d", nrData, uint64(maxDataBlockNr))
	}
	if c.ReadOnly {
		feat.readOnly = true
	}
	meta, err := c.Open(metaName)
	if err != nil {
		return nil, err
	}
	data, err := c.Open(dataName)
	if err != nil {
		return nil, err
	}
	t := &poolTarget{device: c.Device, meta: meta, data: data, feat: feat, lowWater: lw, length: c.Length, event: c.Event(),
		cacheBytes: c.MetadataCache}
	reg := registryOf(c)
	reg.mu.Lock()
	defer reg.mu.Unlock()
	key := mapper.Identity(meta)
	p := reg.byMeta[key]
	if p == nil {
		md, err := openMetadata(meta, uint32(bs), nrData)
		if err != nil {
			return nil, err
		}
		if n := md.data.NrBlocks(); nrData < n {
			return nil, fmt.Errorf("pool target (%d blocks) too small: expected %d", nrData, n)
		}
		size, _ := meta.Size()
		p = &pool{reg: reg, metaKey: key, blockSize: bs, md: md, data: data, feat: feat, lowWater: lw,
			event: t.event, log: c.Logger(), locks: map[blockKey]*blockLock{}, metaTotal: metaBlocksOf(size),
			errNoSpace: feat.errorIfNoSpace, timeout: noSpaceTimeout, cacheBytes: t.cacheBytes,
			stop: make(chan struct{}), done: make(chan struct{})}
		p.applyCache()
		p.grown = sync.NewCond(&p.mu)
		md.data.OnFree = p.freed
		md.tm.SM.OnLow = p.metaLow
		md.tm.SM.LowThreshold = p.metaThreshold()
		if md.flags&flagNeedsCheck != 0 {
			p.log.Warn("pool metadata needs checking: read-only until thin_check repairs it")
		}
		reg.byMeta[key] = p
		go p.periodicCommit()
	} else if p.blockSize != bs {
		return nil, fmt.Errorf("data block size %d: the pool's is %d, and changing it is not supported", bs, p.blockSize)
	}
	p.mu.Lock()
	n, metaN := p.md.data.NrBlocks(), p.md.tm.SM.NrBlocks()
	p.mu.Unlock()
	if nrData < n {
		return nil, fmt.Errorf("pool target (%d blocks) too small: expected %d", nrData, n)
	}
	if size, err := meta.Size(); err != nil {
		return nil, err
	} else if metaBlocksOf(size) < metaN {
		return nil, fmt.Errorf("metadata device (%d blocks) too small: expected %d", metaBlocksOf(size), metaN)
	}
	p.refs++
	t.p = p
	return t, nil // bound to the device's name on resume, as the kernel's preresume
}

// periodicCommit commits changed metadata every second, as the kernel's
// COMMIT_PERIOD.
func (p *pool) periodicCommit() {
	defer close(p.done)
	tick := time.NewTicker(commitPeriod)
	defer tick.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-tick.C:
			if err := p.commit(); err != nil {
				p.log.Error("periodic metadata commit failed", "err", err)
			}
		}
	}
}

// freed is the data space map's OnFree: remember the block for discard
// passdown.
func (p *pool) freed(b uint64) {
	if !p.feat.ignoreDiscard && !p.feat.noPassdown {
		p.pending = append(p.pending, b)
	}
}

// release drops a reference to the pool; the last one commits and forgets
// it.
func (p *pool) release() error {
	p.reg.mu.Lock()
	p.refs--
	last := p.refs == 0
	if last {
		delete(p.reg.byMeta, p.metaKey)
		for n, q := range p.reg.byName {
			if q == p {
				delete(p.reg.byName, n)
			}
		}
	}
	p.reg.mu.Unlock()
	if !last {
		return nil
	}
	close(p.stop)
	<-p.done
	p.mu.Lock()
	failed := p.failed
	p.mu.Unlock()
	if failed != nil {
		return nil
	}
	return p.commit()
}

// commit commits the metadata if it changed.
func (p *pool) commit() error {
	p.commitMu.Lock()
	defer p.commitMu.Unlock()
	_, err := p.commitHeld()
	return err
}

// commitHeld closes the running transaction under the pool's lock, then,
// without it, flushes the data device (every write whose mapping the
// transaction holds has completed) and writes the metadata; guest I/O and
// the next transaction go on meanwhile. It reports whether there was
// anything to commit. A failure puts the pool in fail mode: nothing more
// is written. Called with commitMu.
func (p *pool) commitHeld() (bool, error) {
	p.mu.Lock()
	if p.failed != nil {
		defer p.mu.Unlock()
		return false, p.failed
	}
	if !p.md.changed {
		p.mu.Unlock()
		return false, nil
	}
	pc, err := p.md.prepare()
	if err != nil {
		defer p.mu.Unlock()
		p.fail(err)
		return true, p.failed
	}
	data := p.data
	p.committing = true
	p.mu.Unlock()
	err = data.Flush()
	if err == nil {
		err = pc.write()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.committing = false
	if err != nil {
		p.fail(err)
		return true, p.failed
	}
	if p.failed == nil {
		pc.landed()
		p.checkMetaSpace()
		if p.noSpace && !p.metaOOS && p.md.data.NrFree() > p.md.data.NrReserved() {
			p.setWrite() // the kernel's check_for_data_space
		}
	}
	p.grown.Broadcast() // blocks freed in the transaction are free now
	return true, p.failed
}

func (p *pool) fail(err error) {
	if p.failed == nil {
		p.failed = fmt.Errorf("pool metadata failed: %w: %w", err, mapper.ErrIO)
		p.log.Error("thin-pool metadata failed: pool is down", "err", err)
		p.md.bm.Forget()
	}
}

func (p *pool) readOnly() bool {
	return p.feat.readOnly || p.metaOOS || p.md.flags&flagNeedsCheck != 0
}

// metaReserve is the kernel's metadata reserve: a tenth of the metadata
// blocks, at most 4096. When no more than the reserve is free, the pool
// is out of metadata space.
func (p *pool) metaReserve() uint64 {
	return min(p.md.tm.SM.NrBlocks()/10, 4096)
}

// checkMetaSpace puts the pool in out-of-metadata-space mode (read-only)
// when the free metadata blocks are down to the reserve, as the kernel
// checks after each commit and each data block allocation.
func (p *pool) checkMetaSpace() {
	if p.metaOOS || p.readOnly() || p.failed != nil {
		return
	}
	if p.md.tm.SM.NrFree() <= p.metaReserve() {
		p.metaOOS = true
		p.log.Error("no free metadata blocks: switching the pool to read-only mode until its metadata device grows")
		p.event("out_of_metadata_space", nil)
	}
}

// setNoSpace enters out_of_data_space mode: writes that need a block
// wait (queue_if_no_space) for the pool to grow, at most the no-space
// timeout, after which the pool turns to error_if_no_space.
func (p *pool) setNoSpace() {
	if p.noSpace {
		return
	}
	p.noSpace = true
	p.log.Warn("thin-pool is out of data space")
	p.event("out_of_data_space", nil)
	if !p.errNoSpace && p.timeout > 0 {
		p.spaceTimer = time.AfterFunc(p.timeout, func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			if p.noSpace && !p.errNoSpace {
				p.errNoSpace = true
				p.log.Warn("thin-pool out of data space for the no-space timeout: failing writes that need a block (error_if_no_space)", "timeout", p.timeout)
				p.event("error_if_no_space", nil)
				p.grown.Broadcast()
			}
		})
	}
}

// metaThreshold is the metadata low water mark: a quarter of the
// metadata device, at most 1024 blocks (4 MiB), as the kernel's.
func (p *pool) metaThreshold() uint64 { return min(uint64(1024), p.metaTotal/4) }

// metaLow is the metadata space map's OnLow: the kernel raises an event
// when free metadata blocks fall to the metadata low water mark.
func (p *pool) metaLow(free uint64) {
	p.log.Warn("reached low water mark for metadata device: sending event", "free", free)
	p.event("metadata_low_water_mark", map[string]any{"free": free})
}

// setWrite leaves out_of_data_space and out-of-metadata-space modes, as
// the kernel's resume does (they come back at the next allocation if the
// space is still short); error_if_no_space returns to the table's. A
// change of mode raises the "write" event, as the kernel's.
func (p *pool) setWrite() {
	if p.spaceTimer != nil {
		p.spaceTimer.Stop()
		p.spaceTimer = nil
	}
	if p.noSpace || p.metaOOS {
		p.log.Info("switching the pool to write mode")
		p.event("write", nil)
	}
	p.noSpace, p.metaOOS = false, false
	p.errNoSpace = p.feat.errorIfNoSpace
	p.grown.Broadcast()
}

// flush makes every acknowledged write and mapping durable: it waits for
// a commit under way, then commits, or flushes the data device when the
// metadata has not changed.
func (p *pool) flush() error {
	p.commitMu.Lock()
	defer p.commitMu.Unlock()
	committed, err := p.commitHeld()
	if committed || err != nil {
		return err
	}
	p.mu.Lock()
	data := p.data
	p.mu.Unlock()
	return data.Flush()
}

// alloc reserves a free data block, committing to reclaim blocks freed in
// this transaction and then, when none is left, failing or waiting for the
// pool to grow. Called with p.mu held, which it may drop while it waits.
func (p *pool) alloc() (uint64, error) {
	for {
		if p.failed != nil {
			return 0, p.failed
		}
		if p.readOnly() {
			return 0, mapper.Errorf(mapper.ErrIO, "pool is read-only: cannot provision")
		}
		if !p.noSpace {
			p.checkLowWater()
		}
		b, err := p.md.data.Reserve()
		if err == nil {
			p.noSpace = false
			p.checkMetaSpace()
			if p.metaOOS {
				p.md.data.Release(b)
				return 0, mapper.Errorf(mapper.ErrIO, "pool is out of metadata space")
			}
			return b, nil
		}
		if !errors.Is(err, pdata.ErrNoSpace) {
			return 0, err
		}
		if p.md.changed || p.committing {
			p.mu.Unlock()
			err := p.commit()
			p.mu.Lock()
			if err != nil {
				return 0, err
			}
			continue // blocks freed in the transaction are free now
		}
		p.setNoSpace()
		if p.errNoSpace {
			return 0, mapper.Errorf(mapper.ErrIO, "pool is out of data space")
		}
		p.grown.Wait()
	}
}

// checkLowWater raises the low water mark event, once per resume, when
// the free data blocks (after the reservations in flight) are at the
// mark before an allocation, as the kernel's alloc_data_block checks.
func (p *pool) checkLowWater() {
	free := p.md.data.NrFree() - p.md.data.NrReserved()
	if !p.lowRaised && free <= p.lowWater {
		p.lowRaised = true
		p.log.Warn("reached low water mark for data device: sending event", "free", free)
		p.event("low_water_mark", map[string]any{"free": free})
	}
}

// passdown discards data blocks that were freed, if the pool passes
// discards down. Called without p.mu.
func (p *pool) passdown(blocks []uint64, data mapper.Backend) {
	for _, b := range blocks {
		off := int64(b * p.blockSize * mapper.SectorSize)
		if err := data.Discard(off, int64(p.blockSize*mapper.SectorSize)); err != nil && !errors.Is(err, mapper.ErrUnsupported) {
			p.log.Warn("discard passdown failed", "block", b, "err", err)
		}
	}
}

func (p *pool) takePending() []uint64 {
	x := p.pending
	p.pending = nil
	return x
}

// Map passes I/O to the pool device through to the data device, as the
// kernel's pool_map does; a flush also commits the metadata.
func (t *poolTarget) Map(r *mapper.Request) error {
	switch r.Op {
	case mapper.OpFlush:
		return t.p.flush()
	case mapper.OpRead:
		return t.data.ReadAt(r.Data, int64(r.Sector*mapper.SectorSize))
	case mapper.OpWrite:
		return t.data.WriteAt(r.Data, int64(r.Sector*mapper.SectorSize))
	case mapper.OpDiscard:
		return t.data.Discard(int64(r.Sector*mapper.SectorSize), int64(r.Bytes()))
	case mapper.OpWriteZeroes:
		return t.data.WriteZeroes(int64(r.Sector*mapper.SectorSize), int64(r.Bytes()), r.Unmap)
	}
	return mapper.Errorf(mapper.ErrUnsupported, "%s", r.Op)
}

// Status returns the pool's INFO or TABLE line.
func (t *poolTarget) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusTable {
		return fmt.Sprintf("%s %s %d %d %s", t.meta.Name(), t.data.Name(), t.p.blockSize, t.lowWater, t.feat)
	}
	p := t.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failed != nil {
		return "Fail"
	}
	md := p.md
	held := "-"
	if md.heldRoot != 0 {
		held = strconv.FormatUint(md.heldRoot, 10)
	}
	mode := "rw"
	switch {
	case p.noSpace:
		mode = "out_of_data_space"
	case p.readOnly():
		mode = "ro"
	}
	disc := "discard_passdown"
	switch {
	case t.feat.ignoreDiscard:
		disc = "ignore_discard"
	case t.feat.noPassdown:
		disc = "no_discard_passdown"
	}
	space := "queue_if_no_space"
	if p.errNoSpace {
		space = "error_if_no_space"
	}
	check := "-"
	if md.flags&flagNeedsCheck != 0 {
		check = "needs_check"
	}
	// Like the kernel, count the metadata reserve (a tenth of the
	// metadata, at most 4096 blocks) as used.
	metaTotal := md.tm.SM.NrBlocks()
	used := min(md.tm.SM.NrAllocated()+min(metaTotal/10, 4096), metaTotal)
	return fmt.Sprintf("%d %d/%d %d/%d %s %s %s %s %s %d", md.transID,
		used, metaTotal, md.data.NrAllocated(), md.data.NrBlocks(),
		held, mode, disc, space, check, p.metaThreshold())
}

// Message handles the pool's messages; each success commits.
func (t *poolTarget) Message(args []string) (string, error) {
	if len(args) == 0 {
		return "", mapper.Errorf(mapper.ErrInvalid, "empty message")
	}
	p := t.p
	want := map[string]int{"create_thin": 2, "create_snap": 3, "delete": 2, "set_transaction_id": 3,
		"reserve_metadata_snap": 1, "release_metadata_snap": 1}
	n, ok := want[args[0]]
	if !ok {
		return "", mapper.Errorf(mapper.ErrInvalid, "unrecognised thin pool target message %q", args[0])
	}
	if len(args) != n {
		return "", mapper.Errorf(mapper.ErrInvalid, "%s: want %d argument(s), got %d", args[0], n-1, len(args)-1)
	}
	var ids []uint64
	for i, s := range args[1:] {
		what := "device id"
		max := uint64(maxDevID)
		if args[0] == "set_transaction_id" {
			what, max = [2]string{"current transaction id", "new transaction id"}[i], ^uint64(0)
		} else if i == 1 {
			what = "origin device id"
		}
		v, err := mapper.ParseUint(what, s, 0, max)
		if err != nil {
			return "", mapper.WithClass(err, mapper.ErrInvalid)
		}
		ids = append(ids, v)
	}
	if err := p.change(args[0], ids); err != nil {
		return "", err
	}
	if err := p.commit(); err != nil {
		return "", err
	}
	p.mu.Lock()
	pend := p.takePending()
	data := p.data
	p.mu.Unlock()
	p.passdown(pend, data)
	return "", nil
}

// change applies a message to the metadata in memory.
func (p *pool) change(msg string, ids []uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failed != nil {
		return p.failed
	}
	if p.readOnly() {
		return mapper.Errorf(mapper.ErrInvalid, "%s: pool is read-only", msg)
	}
	md := p.md
	var err error
	switch msg {
	case "create_thin":
		err = md.createThin(ids[0])
	case "create_snap":
		err = md.createSnap(ids[0], ids[1])
	case "delete":
		if d := md.devs[ids[0]]; d != nil && d.open > 0 {
			err = mapper.Errorf(mapper.ErrBusy, "device %d is open", ids[0])
		} else {
			err = md.deleteDev(ids[0])
		}
	case "set_transaction_id":
		if md.transID != ids[0] {
			err = mapper.Errorf(mapper.ErrInvalid, "mismatched transaction id: pool has %d, message says %d", md.transID, ids[0])
		} else {
			md.transID, md.changed = ids[1], true
		}
	case "reserve_metadata_snap":
		err = md.reserveSnap()
	case "release_metadata_snap":
		err = md.releaseSnap()
	}
	if err != nil && errors.Is(err, mapper.ErrCorrupt) {
		p.fail(err)
	}
	return err
}

// Presuspend commits the metadata.
func (t *poolTarget) Presuspend(noflush bool) error {
	t.p.mu.Lock()
	failed := t.p.failed
	t.p.mu.Unlock()
	if failed != nil {
		return nil
	}
	return t.p.commit()
}

// Resume makes this table's devices and settings the pool's, grows the
// pool to the table's length and re-arms the low water mark event.
func (t *poolTarget) Resume() error {
	p := t.p
	p.reg.mu.Lock()
	p.reg.byName[t.device] = p
	p.reg.mu.Unlock()
	metaSize, err := t.meta.Size()
	if err != nil {
		return err
	}
	metaBlocks := metaBlocksOf(metaSize)
	p.mu.Lock()
	p.data, p.feat, p.lowWater, p.event = t.data, t.feat, t.lowWater, t.event
	p.live, p.cacheBytes = t, t.cacheBytes
	p.lowRaised = false
	p.metaTotal = metaBlocks
	p.md.tm.SM.LowThreshold = p.metaThreshold()
	p.setWrite()
	if p.failed != nil {
		p.mu.Unlock()
		return nil
	}
	md := p.md
	grow := t.length/p.blockSize > md.data.NrBlocks()
	growMeta := metaBlocks > md.tm.SM.NrBlocks()
	if (grow || growMeta) && md.flags&flagNeedsCheck != 0 {
		p.log.Error("pool metadata needs checking: not growing the pool until it is repaired")
		grow, growMeta = false, false
	}
	if grow {
		p.log.Info("growing the data device", "from", md.data.NrBlocks(), "to", t.length/p.blockSize)
		md.data.Extend(t.length / p.blockSize)
		md.changed = true
	}
	if growMeta {
		// As the kernel: the metadata space map grows; the superblock's
		// metadata_nr_blocks keeps the size the pool was formatted with.
		p.log.Info("growing the metadata device", "from", md.tm.SM.NrBlocks(), "to", metaBlocks)
		md.bm.Extend(metaBlocks)
		md.tm.SM.Extend(metaBlocks)
		md.changed = true
	}
	p.mu.Unlock()
	if grow || growMeta {
		if err := p.commit(); err != nil {
			return err
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.applyCache() // the option of this table, for the pool's size now
	p.checkMetaSpace()
	p.grown.Broadcast()
	return nil
}

// Close drops the table's reference to the pool.
func (t *poolTarget) Close() error { return t.p.release() }

// Areas lists the data device range the pool uses.
func (t *poolTarget) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	return fn(t.data, 0, t.length)
}
