// Package mirror holds the mirror target (the kernel's dm-raid1 "mirror",
// drivers/md/dm-raid1.c and dm-region-hash.c, kernel 6.1) with its dirty
// region logs from package dirtylog.
//
//	import _ "github.com/vhostdm/vhostdm/targets/mirror"
package mirror

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/copier"
	"github.com/vhostdm/vhostdm/internal/bgtask"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/targets/dirtylog"
)

// mirror keeps two or more legs identical: writes go to every leg, reads
// to one in-sync leg, and regions that may differ are recovered in the
// background by copying them from the default (first healthy) leg.
//
//	mirror <log_type> <#log_args> <log_args>... <#legs> [<dev> <offset>]{#legs} [<#features> [handle_errors] [keep_log] [max_recovery_rate:<kB/s>]]
//
// log_type is a registered dirty log ("core", "disk"; package dirtylog).
// handle_errors makes a failed leg leave service: it is marked D, an
// event is raised, the default leg moves to a healthy one, and the regions
// written while it failed go out of sync. keep_log (which needs
// handle_errors) fails writes when the log device has failed.
// max_recovery_rate:<kB/s> (a vhostdm feature; the kernel refuses it)
// throttles the resync's reads to that many KiB per second, leaving the
// legs' bandwidth to guest I/O; without it the resync copies as fast as
// the copier goes.
//
// INFO:  "2 /img/a /img/b 8/8 1 AA 3 disk /img/log A" (#legs, legs, regions
// in sync/regions, 1, one health character per leg: A alive, D write
// failure, S resync failure, R read failure, F flush failure; then the
// log's INFO). TABLE: "disk 2 /img/log 1024 2 /img/a 0 /img/b 0 1
// handle_errors".
//
// Events: "leg-failed" (data: leg, device, error) with handle_errors, and
// "in-sync" when recovery has brought every region in sync.
//
// Where vhostdm differs from kernel 6.1 on purpose: with handle_errors the
// kernel holds a write that failed on a leg until userspace (dmeventd)
// reloads the table; vhostdm, which has no dmeventd, completes it when
// another leg took it, so the guest goes on (the region is out of sync and
// resynchronises once the leg is replaced). Discards are refused as the
// kernel refuses them.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "mirror", Version: [3]int{1, 14, 0}, New: newMirror})
}

// maxLegs is the kernel's MAX_NR_MIRRORS (DM_KCOPYD_MAX_REGIONS + 1).
const maxLegs = 9

// rateFeature is vhostdm's resync throttle feature,
// max_recovery_rate:<kB/s>, named and counted as dm-raid's
// max_recovery_rate; the kernel's mirror has none (its kcopyd throttle is
// the raid1_resync_throttle module parameter).
const rateFeature = "max_recovery_rate:"

// maxRate is the largest max_recovery_rate, in kB/s (as dm-raid: INT_MAX).
const maxRate = 1<<31 - 1

// Leg error kinds, in the order of their status priority.
const (
	errFlush = 1 << iota
	errWrite
	errSync
	errRead
)

type leg struct {
	dev    mapper.Backend
	offset uint64 // sectors
	errs   atomic.Uint32
	count  atomic.Uint32
}

func (l *leg) status() byte {
	if l.count.Load() == 0 {
		return 'A'
	}
	e := l.errs.Load()
	switch {
	case e&errFlush != 0:
		return 'F'
	case e&errWrite != 0:
		return 'D'
	case e&errSync != 0:
		return 'S'
	case e&errRead != 0:
		return 'R'
	}
	return 'U'
}

// Region states (dm-region-hash).
const (
	stateClean = iota
	stateDirty
	stateNoSync
	stateRecovering
)

type region struct {
	state   int
	pending int
	marked  chan struct{} // closed once the dirty mark is on disk
	markErr error
}

type mirror struct {
	// Immutable.
	legs         []*leg
	log          dirtylog.Log
	regionShift  uint
	length       uint64
	handleErrors bool
	keepLog      bool
	rate         uint64 // resync throttle in kB/s (KiB/s, as dm-raid counts), 0: none
	event        mapper.EventRaiser
	kcopyd       *copier.Copier

	// Guarded by mu: the region hash.
	mu         sync.Mutex
	cond       *sync.Cond
	regions    map[uint64]*region
	defaultLeg int
	logFailed  bool

	rr atomic.Uint32 // read balancing

	recovery bgtask.Task // runs recover
}

func newMirror(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) < 2 {
		return nil, fmt.Errorf("want <log_type> <#log_args> ..., got %d arguments", len(args))
	}
	a := mapper.NewArgs(args)
	logType, _ := a.Next("log type")
	nLog, err := a.Uint("log argument count", 0, 1<<20)
	if err != nil {
		return nil, err
	}
	if uint64(a.Len()) < nLog {
		return nil, fmt.Errorf("log argument count %d: only %d arguments follow", nLog, a.Len())
	}
	logArgs := args[2 : 2+nLog]
	for range nLog {
		a.Next("")
	}
	nLegs, err := a.Uint("mirror count", 2, maxLegs)
	if err != nil {
		return nil, err
	}
	if uint64(a.Len()) < 2*nLegs {
		return nil, fmt.Errorf("mirror count %d: want %d <dev> <offset> arguments, got %d", nLegs, 2*nLegs, a.Len())
	}
	type legArg struct {
		name   string
		offset uint64
	}
	var legArgs []legArg
	for range nLegs {
		name, _ := a.Next("device")
		off, err := a.Sector("device offset")
		if err != nil {
			return nil, err
		}
		if off+c.Length > mapper.MaxSector {
			return nil, fmt.Errorf("device offset %d + length %d: beyond the largest device", off, c.Length)
		}
		legArgs = append(legArgs, legArg{name, off})
	}
	m := &mirror{length: c.Length, event: c.Event(), regions: map[uint64]*region{}}
	m.cond = sync.NewCond(&m.mu)
	if a.Len() > 0 {
		nf, err := a.Uint("feature count", 0, 3)
		if err != nil {
			return nil, err
		}
		if uint64(a.Len()) < nf {
			return nil, fmt.Errorf("feature count %d: only %d arguments follow", nf, a.Len())
		}
		for range nf {
			f, _ := a.Next("feature")
			switch {
			case f == "handle_errors" && !m.handleErrors:
				m.handleErrors = true
			case f == "keep_log" && !m.keepLog:
				m.keepLog = true
			case strings.HasPrefix(f, rateFeature) && m.rate == 0:
				v, err := strconv.ParseUint(f[len(rateFeature):], 10, 32)
				if err != nil || v == 0 || v > maxRate {
					return nil, fmt.Errorf("feature %q: rate must be 1 to %d kB/s", f, maxRate)
				}
				m.rate = v
			case f == "handle_errors" || f == "keep_log" || strings.HasPrefix(f, rateFeature):
				return nil, fmt.Errorf("feature %q: duplicated", f)
			default:
				return nil, fmt.Errorf("feature %q: unrecognised", f)
			}
		}
		if err := a.Done(); err != nil {
			return nil, err
		}
		if m.keepLog && !m.handleErrors {
			return nil, errors.New("feature keep_log: requires the handle_errors feature")
		}
	}
	opts := copier.Options{MemoryBytes: 2 << 20}
	if m.rate > 0 {
		// Pieces of about 1/8 s at the rate, so that the throttle's
		// sleeps stay short (suspend waits for the piece in flight).
		bps := int64(m.rate) * 1024
		opts.BytesPerSecond = bps
		opts.PieceBytes = int(max(4096, min(copier.DefaultPieceBytes, bps/8)) &^ 4095)
	}
	m.kcopyd = copier.New(opts)
	log, err := dirtylog.New(c, logType, logArgs, m.flushLegs)
	if err != nil {
		return nil, fmt.Errorf("dirty log %s: %w", logType, err)
	}
	m.log = log
	for s := log.RegionSize(); s > 1; s >>= 1 {
		m.regionShift++
	}
	for _, la := range legArgs {
		dev, err := c.Open(la.name)
		if err != nil {
			log.Close()
			return nil, err
		}
		m.legs = append(m.legs, &leg{dev: dev, offset: la.offset})
	}
	return m, nil
}

// flushLegs flushes every healthy leg: the disk log's data callback.
func (m *mirror) flushLegs() error {
	var errs []error
	for i, l := range m.legs {
		if err := l.dev.Flush(); err != nil {
			m.fail(i, errFlush, err)
			errs = append(errs, err)
		}
	}
	if len(errs) == len(m.legs) {
		return errors.Join(errs...)
	}
	return nil
}

// fail records an error of leg i; with handle_errors the leg leaves the
// default position and an event is raised the first time.
func (m *mirror) fail(i int, kind uint32, err error) {
	l := m.legs[i]
	l.count.Add(1)
	if old := l.errs.Or(kind); old&kind != 0 || !m.handleErrors {
		return
	}
	m.mu.Lock()
	if m.defaultLeg == i {
		for j, o := range m.legs {
			if o.count.Load() == 0 {
				m.defaultLeg = j
				break
			}
		}
	}
	m.mu.Unlock()
	m.event("leg-failed", map[string]any{"leg": i, "device": l.dev.Name(), "error": err.Error()})
}

func (m *mirror) healthy(i int) bool { return m.legs[i].count.Load() == 0 }

// Map serves I/O region by region.
// Discards implements mapper.Discarder: the mirror does not pass discards to its legs.
func (*mirror) Discards() bool { return false }

// WritesZeroes implements mapper.Discarder.
func (*mirror) WritesZeroes() bool { return true }

func (m *mirror) Map(r *mapper.Request) error {
	switch r.Op {
	case mapper.OpFlush:
		return m.Flush()
	case mapper.OpDiscard:
		return mapper.ErrUnsupported
	}
	bufOff := 0
	end := r.Sector + r.Sectors
	for s := r.Sector; s < end; {
		reg := s >> m.regionShift
		e := min((reg+1)<<m.regionShift, end)
		n := e - s
		var data [][]byte
		if r.Data != nil {
			data = mapper.SliceBufs(nil, r.Data, bufOff, int(n<<mapper.SectorShift))
		}
		var err error
		if r.Op == mapper.OpRead {
			err = m.read(reg, s, n, data)
		} else {
			err = m.write(r.Op, reg, s, n, data, r.FUA)
		}
		if err != nil {
			return err
		}
		bufOff += int(n << mapper.SectorShift)
		s = e
	}
	return nil
}

func (m *mirror) legIO(i int, op mapper.Op, s, n uint64, data [][]byte) error {
	l := m.legs[i]
	off := int64(l.offset+s) << mapper.SectorShift
	switch op {
	case mapper.OpRead:
		return l.dev.ReadAt(data, off)
	case mapper.OpWriteZeroes:
		return l.dev.WriteZeroes(off, int64(n)<<mapper.SectorShift, false)
	}
	return l.dev.WriteAt(data, off)
}

// read reads from a healthy leg when the region is in sync (round robin),
// else from the default leg; a failed read is retried on another leg of an
// in-sync region.
func (m *mirror) read(reg, s, n uint64, data [][]byte) error {
	inSync := m.log.InSync(reg)
	m.mu.Lock()
	def := m.defaultLeg
	m.mu.Unlock()
	order := []int{def}
	if inSync {
		start := int(m.rr.Add(1)) % len(m.legs)
		order = order[:0]
		for k := range m.legs {
			if i := (start + k) % len(m.legs); m.healthy(i) {
				order = append(order, i)
			}
		}
		if len(order) == 0 {
			order = []int{def}
		}
	}
	var err error
	for _, i := range order {
		if err = m.legIO(i, mapper.OpRead, s, n, data); err == nil {
			return nil
		}
		m.fail(i, errRead, err)
	}
	return err
}

// inc admits a write to region reg: the region becomes dirty (its mark
// reaching the log before any write is issued), and waits while the region
// is being recovered. It reports whether the region is out of sync.
func (m *mirror) inc(reg uint64) (noSync bool, err error) {
	m.mu.Lock()
	for {
		rg := m.regions[reg]
		if rg == nil {
			rg = &region{state: stateClean}
			if !m.log.InSync(reg) {
				rg.state = stateNoSync
			}
			m.regions[reg] = rg
		}
		if rg.state == stateRecovering {
			m.cond.Wait()
			continue
		}
		rg.pending++
		var wait chan struct{}
		if rg.state == stateClean {
			rg.state = stateDirty
			rg.marked = make(chan struct{})
			m.log.MarkRegion(reg)
			m.mu.Unlock()
			err := m.log.Flush()
			m.mu.Lock()
			rg.markErr = err
			close(rg.marked)
		} else if rg.state == stateDirty {
			wait = rg.marked
		}
		noSync = rg.state == stateNoSync
		m.mu.Unlock()
		if wait != nil {
			<-wait
		}
		m.mu.Lock()
		err = rg.markErr
		if err != nil {
			m.logFailed = true
		}
		m.mu.Unlock()
		return noSync, err
	}
}

// dec ends a write to region reg; a dirty region whose writes are done
// becomes clean (its clean mark goes to the log with the next flush).
func (m *mirror) dec(reg uint64, outOfSync bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rg := m.regions[reg]
	rg.pending--
	if outOfSync && rg.state != stateRecovering {
		rg.state = stateNoSync
	}
	if rg.pending > 0 {
		return
	}
	switch rg.state {
	case stateDirty:
		m.log.ClearRegion(reg)
		delete(m.regions, reg)
	case stateNoSync:
		delete(m.regions, reg)
	}
	m.cond.Broadcast()
}

// write writes [s, s+n) of region reg to every leg (only the default leg
// when the region is out of sync: recovery will copy it).
func (m *mirror) write(op mapper.Op, reg, s, n uint64, data [][]byte, fua bool) error {
	noSync, err := m.inc(reg)
	if err != nil && m.keepLog {
		m.dec(reg, false)
		return fmt.Errorf("dirty log failed: %w", mapper.ErrIO)
	}
	m.mu.Lock()
	def := m.defaultLeg
	m.mu.Unlock()
	targets := []int{def}
	if !noSync {
		targets = targets[:0]
		for i := range m.legs {
			targets = append(targets, i)
		}
	}
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	for k, i := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[k] = m.legIO(i, op, s, n, data)
			if errs[k] == nil && fua {
				errs[k] = m.legs[i].dev.Flush()
			}
		}()
	}
	wg.Wait()
	ok, failed := 0, false
	for k, err := range errs {
		if err != nil {
			m.fail(targets[k], errWrite, err)
			failed = true
		} else {
			ok++
		}
	}
	if failed {
		m.log.SetRegionSync(reg, false)
	}
	m.dec(reg, failed)
	if ok == 0 {
		return errors.Join(errs...)
	}
	return nil
}

// Flush flushes the legs, then the log.
func (m *mirror) Flush() error {
	if err := m.flushLegs(); err != nil {
		return err
	}
	if err := m.log.Flush(); err != nil && m.keepLog {
		return err
	}
	return nil
}

// Status returns the kernel's INFO and TABLE forms.
func (m *mirror) Status(kind mapper.StatusKind) string {
	var b strings.Builder
	if kind == mapper.StatusTable {
		fmt.Fprintf(&b, "%s %d", m.log.Status(kind), len(m.legs))
		for _, l := range m.legs {
			fmt.Fprintf(&b, " %s %d", l.dev.Name(), l.offset)
		}
		var feats []string
		if m.handleErrors {
			feats = append(feats, "handle_errors")
		}
		if m.keepLog {
			feats = append(feats, "keep_log")
		}
		if m.rate > 0 {
			feats = append(feats, fmt.Sprintf("%s%d", rateFeature, m.rate))
		}
		if len(feats) > 0 {
			fmt.Fprintf(&b, " %d %s", len(feats), strings.Join(feats, " "))
		}
		return b.String()
	}
	fmt.Fprintf(&b, "%d ", len(m.legs))
	health := make([]byte, len(m.legs))
	for i, l := range m.legs {
		fmt.Fprintf(&b, "%s ", l.dev.Name())
		health[i] = l.status()
	}
	fmt.Fprintf(&b, "%d/%d 1 %s %s", m.log.SyncCount(), m.log.Regions(), health, m.log.Status(kind))
	return b.String()
}

// Presuspend stops recovery and writes the log.
func (m *mirror) Presuspend(noflush bool) error {
	m.stopRecovery()
	return nil
}

// Resume loads the log and starts recovery of the regions out of sync.
func (m *mirror) Resume() error {
	if err := m.log.Resume(); err != nil {
		m.mu.Lock()
		m.logFailed = true
		m.mu.Unlock()
	}
	m.mu.Lock()
	clear(m.regions) // states come from the log again
	m.mu.Unlock()
	m.startRecovery()
	return nil
}

// Close stops recovery and writes the log.
func (m *mirror) Close() error {
	m.stopRecovery()
	err := m.log.Flush()
	m.kcopyd.Close()
	return errors.Join(err, m.log.Close())
}

// Areas lists each leg's area and the log's.
func (m *mirror) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	for _, l := range m.legs {
		if err := fn(l.dev, l.offset, m.length); err != nil {
			return err
		}
	}
	if al, ok := m.log.(mapper.AreaLister); ok {
		return al.Areas(fn)
	}
	return nil
}

func (m *mirror) startRecovery() { m.recovery.Start(m.recover) }

func (m *mirror) stopRecovery() { m.recovery.Stop() }

// recover resynchronises the regions the log reports out of sync, one at a
// time: the region is quiesced (new writes wait), copied from the default
// leg to the others, and marked in sync.
func (m *mirror) recover(stop <-chan struct{}) {
	worked := false
	for {
		select {
		case <-stop:
			return
		default:
		}
		reg, ok := m.log.ResyncWork()
		if !ok {
			break
		}
		worked = true
		m.recoverRegion(reg)
	}
	m.log.Flush()
	if worked && m.log.SyncCount() == m.log.Regions() {
		m.event("in-sync", nil)
	}
}

func (m *mirror) recoverRegion(reg uint64) {
	m.mu.Lock()
	// Look the region up again after every wait: the last write's dec
	// may have dropped it from the map meanwhile, and a region recovered
	// outside the map would let the next writer in beside the copy.
	var rg *region
	for {
		rg = m.regions[reg]
		if rg == nil {
			rg = &region{state: stateNoSync}
			m.regions[reg] = rg
		}
		if rg.state != stateRecovering && rg.pending == 0 {
			break
		}
		m.cond.Wait()
	}
	rg.state = stateRecovering
	def := m.defaultLeg
	m.mu.Unlock()

	start := reg << m.regionShift
	n := min(uint64(1)<<m.regionShift, m.length-start)
	src := m.legs[def]
	var dsts []copier.Region
	var idx []int
	for i, l := range m.legs {
		if i != def {
			dsts = append(dsts, copier.Region{Dev: l.dev, Sector: l.offset + start, Sectors: n})
			idx = append(idx, i)
		}
	}
	res := m.kcopyd.CopySync(copier.Region{Dev: src.dev, Sector: src.offset + start, Sectors: n}, dsts)
	success := res.Err() == nil
	// The copies must be durable before the region counts as in sync:
	// reads then go to every leg, and the clean mark the log writes later
	// (after flushing the legs again) would outlive a crash. A flush that
	// fails may have lost the copy, and a later flush of the same leg can
	// succeed without bringing it back (a device reports a lost write-back
	// once), so the recovery of the region has failed: it stays out of
	// sync, read from the default leg, and dirty in the log.
	for k, i := range idx {
		if res.WriteErrs[k] == nil && res.ReadErr == nil {
			if err := m.legs[i].dev.Flush(); err != nil {
				m.fail(i, errFlush, err)
				success = false
			}
		}
	}
	if res.ReadErr != nil {
		m.fail(def, errRead, res.ReadErr)
	}
	for k, err := range res.WriteErrs {
		if err != nil {
			m.fail(idx[k], errSync, err)
		}
	}
	m.log.SetRegionSync(reg, success)
	m.mu.Lock()
	if success {
		m.log.ClearRegion(reg)
		delete(m.regions, reg)
	} else {
		rg.state = stateNoSync
		if rg.pending == 0 {
			delete(m.regions, reg)
		}
	}
	m.cond.Broadcast()
	m.mu.Unlock()
}
