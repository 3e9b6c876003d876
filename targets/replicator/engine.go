package replicator

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/targets/dirtylog"
)

// Tunables; variables so that tests can shorten them.
var (
	// retryInterval is how long a failed site waits before it is tried
	// again (by resynchronising its dirty regions).
	retryInterval = 2 * time.Second
	// tickInterval wakes waiters to look at clocks (timeouts, retries).
	tickInterval = 20 * time.Millisecond
	// checkpointInterval is how often the log's tail is moved forward.
	checkpointInterval = 200 * time.Millisecond
	// cacheBudget bounds the entry data kept in memory; beyond it, sites
	// read entries back from the log.
	cacheBudget int64 = 64 << 20
	// maxEntryBytes bounds one entry's data: larger writes are split.
	maxEntryBytes = 1 << 20
	// copyChunk is the unit of a resynchronisation copy, in sectors.
	copyChunk uint64 = 512
)

// siteState is a remote site's state.
type siteState int

const (
	siteActive siteState = iota
	siteFailed
	sitePaused
)

// engine is the state one replication log shares between every table
// naming it: the replicator target (one per loaded table) and its
// replicator-dev targets. All fields below mu are guarded by it.
type engine struct {
	// Immutable.
	key  any
	log  Log
	slog *slog.Logger

	refs int // guarded by the directory's lock

	mu           sync.Mutex
	cond         *sync.Cond
	closed       bool
	logErr       error
	event        mapper.EventRaiser
	links        map[uint32]SiteLink
	sites        map[uint32]*site // remote sites (nr != 0)
	devs         map[uint32]*devReg
	nextSeq      uint64
	q            []*qent // live entries, contiguous sequences, oldest first
	baseCum      uint64  // payload bytes of every entry before q[0]
	cached       int64
	written      uint64 // every entry through this sequence is written
	durable      uint64 // every entry through this sequence is durable
	localWM      uint64 // every entry through this sequence is applied locally
	spaceWaiters int
	wg           sync.WaitGroup
	kick         chan struct{} // wakes the checkpointer
	done         chan struct{} // closed by close

	// testApplied, when set, is called by a site's worker after it has
	// consumed entry seq (applied it, or marked it dirty when !applied);
	// consistent tells whether the site held a prefix of the log before.
	testApplied func(slink uint32, seq uint64, applied, consistent bool)
	// testLogged, when set, is called with mu held when an entry gets
	// its sequence number.
	testLogged func(en *Entry)
}

// qent is a live entry with the engine's bookkeeping.
type qent struct {
	*Entry
	t            time.Time
	cum          uint64 // payload bytes of every entry through this one
	written      bool
	localStarted bool
	localDone    bool
	waitSites    []*site // sites the writer waits for
}

func (q *qent) bytes() uint64 { return q.Sectors << mapper.SectorShift }

// site is a remote site link's replication state.
type site struct {
	nr             uint32
	policy         Policy
	applied        uint64 // entries through this sequence applied or marked dirty
	state          siteState
	behind         bool // async, over its fall-behind threshold: writes wait for it
	overflow       bool // the log is full and waits for this site: fall back to the dirty log
	failedAt       time.Time
	lastErr        string
	dirty          bool   // may have out-of-sync regions
	consistentFrom uint64 // the site holds a prefix of the log once applied reaches this
	removed        bool
	waiting        bool   // waiting for a replicator-dev that is not loaded
	stop           func() // from SiteStarter, nil without
	reported       int8   // consistency last told a ConsistencyReporter: 0 never, 1 no, 2 yes
}

// devReg is a registered replicator-dev: its devices at each site.
type devReg struct {
	nr       uint32
	owner    *devTarget // nil when detached (its table closed)
	length   uint64
	local    LocalDevice
	sites    map[uint32]*siteDev
	inflight []*qent     // entries not yet applied locally, by sequence
	copying  [][2]uint64 // sector ranges being copied for resync
	dropped  bool        // "device del": its entries are skipped
}

type siteDev struct {
	dev    SiteDevice
	log    dirtylog.Log
	cursor uint64
}

func newEngine(key any, lg Log, links map[uint32]SiteLink, logger *slog.Logger) (*engine, error) {
	entries, next, pos, err := lg.Recover()
	if err != nil {
		return nil, err
	}
	e := &engine{key: key, log: lg, slog: logger, links: links, sites: map[uint32]*site{}, devs: map[uint32]*devReg{},
		nextSeq: next, event: func(string, map[string]any) {}, kick: make(chan struct{}, 1), done: make(chan struct{})}
	e.cond = sync.NewCond(&e.mu)
	tail := next - uint64(len(entries))
	var cum uint64
	for _, en := range entries {
		cum += en.Sectors << mapper.SectorShift
		q := &qent{Entry: en, t: time.Now(), cum: cum, written: true}
		e.cached += int64(len(en.Data))
		e.q = append(e.q, q)
	}
	e.written, e.durable = next-1, next-1
	e.localWM = max(tail-1, min(pos[0], next-1))
	for _, q := range e.q {
		if q.Seq <= e.localWM {
			q.localStarted, q.localDone = true, true
		}
	}
	for nr, l := range links {
		if nr == 0 {
			continue
		}
		e.sites[nr] = &site{nr: nr, policy: l.Policy(), applied: max(tail-1, min(pos[nr], next-1)), consistentFrom: 0}
		e.sites[nr].stop = startLink(l)
	}
	e.wg.Add(3)
	go e.runFlusher()
	go e.runCheckpointer()
	go e.runTicker()
	for _, s := range e.sites {
		e.startSite(s)
	}
	return e, nil
}

// startLink starts a SiteStarter link's state.
func startLink(l SiteLink) func() {
	if st, ok := l.(SiteStarter); ok {
		return st.StartSite()
	}
	return nil
}

func (e *engine) startSite(s *site) {
	e.wg.Add(1)
	go e.runSite(s)
}

// configure applies a (re)loaded replicator table's site links: policies
// change in place, new sites start at the head of the log with every
// region out of sync, sites no longer listed stop.
func (e *engine) configure(links map[uint32]SiteLink, ev mapper.EventRaiser) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.event = ev
	e.links = links
	for nr, l := range links {
		if nr == 0 {
			continue
		}
		if s, ok := e.sites[nr]; ok {
			s.policy = l.Policy()
			continue
		}
		s := &site{nr: nr, policy: l.Policy(), applied: e.nextSeq - 1, dirty: true, consistentFrom: e.nextSeq - 1}
		s.stop = startLink(l)
		e.sites[nr] = s
		e.startSite(s)
	}
	for nr, s := range e.sites {
		if _, ok := links[nr]; !ok {
			s.removed = true
			delete(e.sites, nr)
			if s.stop != nil {
				go s.stop() // may wait for a hub: not under mu
			}
		}
	}
	e.cond.Broadcast()
}

// close stops the engine: workers finish what they do, a last checkpoint
// records their progress.
func (e *engine) close() error {
	e.mu.Lock()
	e.closed = true
	close(e.done)
	e.cond.Broadcast()
	e.mu.Unlock()
	e.wg.Wait()
	err := e.checkpoint()
	for _, s := range e.sites {
		if s.stop != nil {
			s.stop()
		}
	}
	return errors.Join(err, e.log.Close())
}

// raise sends an event; the caller holds mu.
func (e *engine) raise(kind string, s *site, data map[string]any) {
	if data == nil {
		data = map[string]any{}
	}
	data["slink"] = s.nr
	ev := e.event
	go ev(kind, data) // never under mu: handlers may ask for status
}

// entry returns the live entry seq, or nil; the caller holds mu.
func (e *engine) entry(seq uint64) *qent {
	if len(e.q) == 0 || seq < e.q[0].Seq {
		return nil
	}
	i := seq - e.q[0].Seq
	if i >= uint64(len(e.q)) {
		return nil
	}
	return e.q[i]
}

// cumAt returns the payload bytes of every entry through seq.
func (e *engine) cumAt(seq uint64) uint64 {
	if q := e.entry(seq); q != nil {
		return q.cum
	}
	if len(e.q) == 0 || seq < e.q[0].Seq {
		return e.baseCum
	}
	return e.q[len(e.q)-1].cum
}

// submit logs one operation of dev and returns when it is durable in the
// log, applied locally and applied at every site the policy waits for.
func (e *engine) submit(d *devReg, op mapper.Op, sector, sectors uint64, data []byte) error {
	if op == mapper.OpWrite && !e.log.Fits(len(data)) {
		return fmt.Errorf("write of %d bytes does not fit the replication log: %w", len(data), mapper.ErrIO)
	}
	q := &qent{Entry: &Entry{Dev: d.nr, Op: op, Sector: sector, Sectors: sectors, Data: data}}
	e.mu.Lock()
	for {
		if e.closed || e.logErr != nil {
			err := e.logErr
			e.mu.Unlock()
			return fmt.Errorf("replication log: %w", errors.Join(err, mapper.ErrIO))
		}
		q.Seq = e.nextSeq
		if e.log.Reserve(q.Entry) {
			break
		}
		e.logFull()
		e.spaceWaiters++
		e.cond.Wait()
		e.spaceWaiters--
	}
	e.nextSeq++
	if e.testLogged != nil {
		e.testLogged(q.Entry)
	}
	q.t = time.Now()
	q.cum = e.cumAt(q.Seq-1) + q.bytes()
	e.q = append(e.q, q)
	e.cached += int64(len(data))
	d.inflight = append(d.inflight, q)
	e.fallBehind(q)
	e.mu.Unlock()

	werr := e.log.Write(q.Entry)

	e.mu.Lock()
	q.written = true
	if werr != nil && e.logErr == nil {
		e.logErr = werr
	}
	for n := e.entry(e.written + 1); n != nil && n.written; n = e.entry(e.written + 1) {
		e.written++
	}
	e.cond.Broadcast()
	for e.durable < q.Seq && e.logErr == nil && !e.closed {
		e.cond.Wait()
	}
	if e.durable < q.Seq {
		err := e.logErr
		e.mu.Unlock()
		return fmt.Errorf("replication log: %w", errors.Join(err, mapper.ErrIO))
	}
	// Local application: after every earlier overlapping entry of the
	// device and outside ranges being copied for resynchronisation.
	for e.localBlocked(d, q) {
		e.cond.Wait()
	}
	q.localStarted = true
	e.mu.Unlock()

	lerr := d.local.Apply(op, sector, sectors, data)

	e.mu.Lock()
	q.localDone = true
	d.inflight = slices.DeleteFunc(d.inflight, func(x *qent) bool { return x == q })
	for n := e.entry(e.localWM + 1); n != nil && n.localDone; n = e.entry(e.localWM + 1) {
		e.localWM++
	}
	e.cond.Broadcast()
	if lerr != nil {
		e.mu.Unlock()
		return fmt.Errorf("local device: %w", lerr)
	}
	for _, s := range q.waitSites {
		for s.applied < q.Seq && s.state == siteActive && !s.removed && !s.overflow && !e.closed {
			e.cond.Wait()
		}
	}
	e.mu.Unlock()
	return nil
}

// localBlocked reports whether q must wait before its local application.
func (e *engine) localBlocked(d *devReg, q *qent) bool {
	end := q.Sector + q.Sectors
	for _, x := range d.inflight {
		if x.Seq >= q.Seq {
			break
		}
		if x.Sector < end && q.Sector < x.Sector+x.Sectors {
			return true
		}
	}
	for _, r := range d.copying {
		if r[0] < end && q.Sector < r[1] {
			return true
		}
	}
	return false
}

// fallBehind decides which sites the writer of q waits for: sync sites,
// and async sites over their fall-behind threshold. The caller holds mu.
func (e *engine) fallBehind(q *qent) {
	now := time.Now()
	for _, s := range e.sites {
		if s.state != siteActive {
			continue
		}
		if s.policy.Sync {
			q.waitSites = append(q.waitSites, s)
			continue
		}
		if !s.behind && e.overThreshold(s, q.Seq, now, 1) {
			s.behind = true
			ios, bytes, age := e.backlog(s, now)
			e.raise("slink-fell-behind", s, map[string]any{"ios": ios, "bytes": bytes, "age-ms": age.Milliseconds()})
		}
		if s.behind {
			q.waitSites = append(q.waitSites, s)
		}
	}
}

// backlog returns what site s has not yet consumed.
func (e *engine) backlog(s *site, now time.Time) (ios, bytes uint64, age time.Duration) {
	head := e.nextSeq - 1
	if s.applied >= head {
		return 0, 0, 0
	}
	ios = head - s.applied
	bytes = e.cumAt(head) - e.cumAt(s.applied)
	if q := e.entry(s.applied + 1); q != nil {
		age = now.Sub(q.t)
	}
	return ios, bytes, age
}

// overThreshold reports whether s's backlog through head exceeds its
// fall-behind threshold divided by div (1: entering sync behaviour; 2:
// the low-water mark below which it leaves it).
func (e *engine) overThreshold(s *site, head uint64, now time.Time, div uint64) bool {
	p := s.policy
	if p.IOs == 0 && p.Bytes == 0 && p.Timeout == 0 {
		return false
	}
	ios, bytes, age := e.backlog(s, now)
	_ = head
	return (p.IOs > 0 && ios > p.IOs/div) || (p.Bytes > 0 && bytes > p.Bytes/div) ||
		(p.Timeout > 0 && age > time.Duration(p.Timeout/int64(div)))
}

// logFull handles a writer finding no room: the checkpointer is woken and,
// if an async site holds the oldest entry, it falls back to its dirty log
// so that the log does not stall behind it. The caller holds mu.
func (e *engine) logFull() {
	var slow *site
	for _, s := range e.sites {
		if s.state == siteActive && !s.policy.Sync && s.applied < e.durable && (slow == nil || s.applied < slow.applied) {
			slow = s
		}
	}
	if slow != nil && !slow.overflow && (len(e.q) == 0 || slow.applied < e.q[0].Seq+uint64(len(e.q))/2) {
		slow.overflow = true
		e.raise("slink-log-full", slow, nil)
		e.cond.Broadcast()
	}
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// markDirty records that entry q was not applied at site s: its regions
// go out of sync in the site's dirty log. The caller holds mu.
func (e *engine) markDirty(s *site, q *qent) {
	d := e.devs[q.Dev]
	if d == nil || d.dropped {
		return
	}
	sd := d.sites[s.nr]
	if sd == nil {
		return
	}
	rs := sd.log.RegionSize()
	for r := q.Sector / rs; r <= (q.Sector+q.Sectors-1)/rs && r < sd.log.Regions(); r++ {
		sd.log.MarkRegion(r)
		sd.log.SetRegionSync(r, false)
	}
	s.dirty = true
}

// runSite is the worker of one remote site: it applies entries in log
// order, marks them in the dirty logs while the site is failed or paused,
// and resynchronises out-of-sync regions.
func (e *engine) runSite(s *site) {
	defer e.wg.Done()
	e.mu.Lock()
	defer e.mu.Unlock()
	batch := 0
	for !e.closed && !s.removed {
		if e.reportConsistency(s) {
			continue // mu was released: look again
		}
		if s.state == siteFailed && time.Since(s.failedAt) >= retryInterval {
			s.state, s.dirty = siteActive, true
			e.slog.Info("retrying site", "slink", s.nr)
			e.cond.Broadcast()
		}
		next := e.entry(s.applied + 1)
		if next != nil && next.Seq > e.durable {
			next = nil
		}
		var d *devReg
		if next != nil {
			d = e.devs[next.Dev]
			s.waiting = d == nil || (d.owner == nil && !d.dropped)
			if s.waiting {
				next = nil
			}
		}
		if next != nil && (s.state != siteActive || s.overflow) {
			consistent := e.consistent(s)
			e.markDirty(s, next)
			s.applied = next.Seq
			e.cond.Broadcast()
			e.hook(s, next.Seq, false, consistent)
			continue
		}
		if s.overflow {
			s.overflow = false
		}
		if next != nil && (batch < 64 || !s.dirty) {
			batch++
			e.applyNext(s, d, next)
			continue
		}
		batch = 0
		if s.state == siteActive && s.dirty && e.localWM >= s.applied {
			if e.resyncOne(s) {
				continue
			}
		}
		if next != nil {
			continue
		}
		// resyncOne may have released mu (a copy that found its device
		// detached returns false): a close meanwhile broadcast before
		// this wait and must not be slept through.
		if e.closed || s.removed {
			break
		}
		e.cond.Wait()
	}
}

// reportConsistency tells a ConsistencyReporter link whether site s
// holds a prefix of the log, when that changed, and reports whether it
// did (releasing mu meanwhile); mu is held on entry and exit.
func (e *engine) reportConsistency(s *site) bool {
	r, ok := e.links[s.nr].(ConsistencyReporter)
	if !ok {
		return false
	}
	c := e.consistent(s) && s.state == siteActive && !s.overflow
	want := int8(1)
	if c {
		want = 2
	}
	if s.reported == want {
		return false
	}
	s.reported = want
	e.mu.Unlock()
	r.SetConsistent(c)
	e.mu.Lock()
	return true
}

func (e *engine) consistent(s *site) bool {
	return !s.dirty && s.applied >= s.consistentFrom
}

func (e *engine) hook(s *site, seq uint64, applied, consistent bool) {
	if e.testApplied != nil {
		e.mu.Unlock()
		e.testApplied(s.nr, seq, applied, consistent)
		e.mu.Lock()
	}
}

// applyNext applies entry q at site s; mu is held on entry and exit.
func (e *engine) applyNext(s *site, d *devReg, q *qent) {
	sd := d.sites[s.nr]
	if sd == nil || d.dropped { // the device is not replicated to this site
		consistent := e.consistent(s)
		s.applied = q.Seq
		e.afterApply(s)
		e.hook(s, q.Seq, true, consistent)
		return
	}
	data := q.Data
	e.mu.Unlock()
	var err error
	if q.Op == mapper.OpWrite && data == nil {
		data, err = e.log.ReadData(q.Entry)
	}
	if err == nil {
		err = sd.dev.Apply(q.Op, q.Sector, q.Sectors, data)
	}
	e.mu.Lock()
	consistent := e.consistent(s)
	if err != nil {
		e.failSite(s, err)
		e.markDirty(s, q)
	}
	s.applied = q.Seq
	e.afterApply(s)
	e.hook(s, q.Seq, err == nil, consistent)
}

// afterApply leaves sync behaviour when the site is back under its
// low-water mark. The caller holds mu.
func (e *engine) afterApply(s *site) {
	if s.behind && !e.overThreshold(s, e.nextSeq-1, time.Now(), 2) {
		s.behind = false
		e.raise("slink-caught-up", s, nil)
	}
	e.cond.Broadcast()
}

// failSite takes a site out of service. The caller holds mu.
func (e *engine) failSite(s *site, err error) {
	if s.state == siteFailed {
		return
	}
	s.state, s.failedAt, s.lastErr, s.behind = siteFailed, time.Now(), err.Error(), false
	e.slog.Warn("site failed", "slink", s.nr, "err", err)
	e.raise("slink-failed", s, map[string]any{"error": err.Error()})
	e.cond.Broadcast()
}

// resyncOne copies one out-of-sync region from the local device to site
// s and reports whether it found one. mu is held on entry and exit.
func (e *engine) resyncOne(s *site) bool {
	nrs := make([]uint32, 0, len(e.devs))
	for nr := range e.devs {
		nrs = append(nrs, nr)
	}
	slices.Sort(nrs)
	for _, nr := range nrs {
		d := e.devs[nr]
		sd := d.sites[s.nr]
		if sd == nil || d.owner == nil {
			continue
		}
		for ; sd.cursor < sd.log.Regions(); sd.cursor++ {
			if !sd.log.InSync(sd.cursor) {
				break
			}
		}
		if sd.cursor >= sd.log.Regions() {
			continue
		}
		r := sd.cursor
		rs := sd.log.RegionSize()
		start, end := r*rs, min((r+1)*rs, d.length)
		err := e.copyRange(d, sd, start, end)
		if errors.Is(err, errDetached) {
			return false // looked at again when the device is back
		}
		if err != nil {
			e.failSite(s, fmt.Errorf("resync region %d of device %d: %w", r, d.nr, err))
			return true
		}
		sd.log.SetRegionSync(r, true)
		sd.log.ClearRegion(r)
		sd.cursor++
		return true
	}
	// A pass found nothing ahead of its cursors. Regions behind them may
	// have gone out of sync meanwhile: look again from the start if so.
	// Otherwise the site is in sync once it has applied what the local
	// devices held when the last region was copied.
	again := false
	for _, d := range e.devs {
		if sd := d.sites[s.nr]; sd != nil {
			if d.owner == nil {
				return false // a detached device: look again when it is back
			}
			sd.cursor = 0
			again = again || sd.log.SyncCount() < sd.log.Regions()
		}
	}
	if again {
		return true
	}
	s.dirty = false
	s.consistentFrom = e.nextSeq - 1
	e.raise("slink-in-sync", s, nil)
	return false
}

// errDetached stops a copy whose device was unloaded meanwhile.
var errDetached = errors.New("device unloaded during resynchronisation")

// copyRange copies sectors [start, end) of d from the local device to sd
// in chunks, holding local application out of each chunk while it is
// read. mu is held on entry and exit.
func (e *engine) copyRange(d *devReg, sd *siteDev, start, end uint64) error {
	for s := start; s < end; s += copyChunk {
		local := d.local
		if d.owner == nil || local == nil {
			return errDetached
		}
		n := min(copyChunk, end-s)
		rng := [2]uint64{s, s + n}
		d.copying = append(d.copying, rng)
		for e.copyBlocked(d, rng) {
			e.cond.Wait()
		}
		e.mu.Unlock()
		buf := make([]byte, n<<mapper.SectorShift)
		err := local.ReadAt([][]byte{buf}, int64(s)<<mapper.SectorShift)
		e.mu.Lock()
		d.copying = slices.DeleteFunc(d.copying, func(x [2]uint64) bool { return x == rng })
		e.cond.Broadcast()
		if d.owner == nil {
			return errDetached
		}
		if err != nil {
			return fmt.Errorf("read local device: %w", err)
		}
		e.mu.Unlock()
		err = sd.dev.Apply(mapper.OpWrite, s, n, buf)
		e.mu.Lock()
		if d.owner == nil {
			return errDetached
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// copyBlocked reports whether a local application overlapping rng is under
// way.
func (e *engine) copyBlocked(d *devReg, rng [2]uint64) bool {
	for _, x := range d.inflight {
		if x.localStarted && !x.localDone && x.Sector < rng[1] && rng[0] < x.Sector+x.Sectors {
			return true
		}
	}
	return false
}

// runFlusher makes written entries durable in groups (group commit).
func (e *engine) runFlusher() {
	defer e.wg.Done()
	e.mu.Lock()
	defer e.mu.Unlock()
	for {
		for !e.closed && (e.written <= e.durable || e.logErr != nil) {
			e.cond.Wait()
		}
		if e.closed {
			return
		}
		target := e.written
		e.mu.Unlock()
		err := e.log.Flush()
		e.mu.Lock()
		if err != nil {
			if e.logErr == nil {
				e.logErr = err
			}
		} else if target > e.durable {
			e.durable = target
		}
		e.cond.Broadcast()
	}
}

// runTicker wakes waiters so that they look at clocks.
func (e *engine) runTicker() {
	defer e.wg.Done()
	t := time.NewTicker(tickInterval)
	defer t.Stop()
	for range t.C {
		e.mu.Lock()
		closed := e.closed
		e.cond.Broadcast()
		e.mu.Unlock()
		if closed {
			return
		}
	}
}

// runCheckpointer moves the log's tail forward: regularly, and at once
// when writers wait for room.
func (e *engine) runCheckpointer() {
	defer e.wg.Done()
	t := time.NewTicker(checkpointInterval)
	defer t.Stop()
	for {
		select {
		case <-e.done:
			return
		case <-e.kick:
		case <-t.C:
		}
		if err := e.checkpoint(); err != nil {
			e.slog.Warn("checkpoint failed", "err", err)
		}
	}
}

// checkpoint flushes every site's devices and dirty logs, records how far
// each site got and frees the log before the oldest position.
func (e *engine) checkpoint() error {
	e.mu.Lock()
	target := e.localWM
	pos := map[uint32]uint64{0: e.localWM}
	for nr, s := range e.sites {
		target = min(target, s.applied)
		pos[nr] = s.applied
	}
	first := uint64(0)
	if len(e.q) > 0 {
		first = e.q[0].Seq
	}
	if len(e.q) == 0 || target < first {
		e.mu.Unlock()
		return nil
	}
	type flushable struct {
		nr  uint32
		dev SiteDevice
		log dirtylog.Log
	}
	var fl []flushable
	for _, d := range e.devs {
		if d.owner == nil {
			continue
		}
		fl = append(fl, flushable{0, d.local, nil})
		for nr, sd := range d.sites {
			if nr != 0 {
				fl = append(fl, flushable{nr, sd.dev, sd.log})
			} else {
				fl = append(fl, flushable{0, nil, sd.log})
			}
		}
	}
	e.mu.Unlock()

	var errs []error
	for _, f := range fl {
		if f.dev != nil {
			if err := f.dev.Flush(); err != nil {
				// The site's dirty log takes over what the device may
				// have lost; only a local failure stops the checkpoint.
				e.flushFailed(f.nr, err)
				if f.nr == 0 {
					errs = append(errs, err)
				}
			}
		}
		if f.log != nil {
			if err := f.log.Flush(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	e.mu.Lock()
	if e.logErr != nil {
		e.mu.Unlock()
		return nil
	}
	tailSeq := target + 1
	var tailOff int64
	if q := e.entry(tailSeq); q != nil {
		tailOff = q.At
	} else {
		tailOff = e.log.Head()
	}
	e.mu.Unlock()
	if err := e.log.Checkpoint(tailOff, tailSeq, pos); err != nil {
		e.mu.Lock()
		if e.logErr == nil {
			e.logErr = err
		}
		e.cond.Broadcast()
		e.mu.Unlock()
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	i := 0
	for i < len(e.q) && e.q[i].Seq < tailSeq {
		e.cached -= int64(len(e.q[i].Data))
		e.baseCum = e.q[i].cum
		i++
	}
	e.q = slices.Clone(e.q[i:])
	if len(e.q) > 0 {
		e.log.Free(e.q[0].Entry)
	} else {
		e.log.Free(nil)
	}
	e.trimCache()
	e.cond.Broadcast()
	return nil
}

// trimCache drops the data of the oldest entries beyond the cache budget;
// the caller holds mu.
func (e *engine) trimCache() {
	for i := 0; e.cached > cacheBudget && i < len(e.q); i++ {
		q := e.q[i]
		if q.Data != nil && q.localDone {
			e.cached -= int64(len(q.Data))
			q.Data = nil
		}
	}
}

// flushFailed handles a site device whose flush failed: what it applied
// since the last checkpoint may be lost, so those entries' regions go out
// of sync and the site fails.
func (e *engine) flushFailed(nr uint32, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if nr == 0 {
		// The primary cannot keep data: writes fail from now on.
		e.slog.Error("local device flush failed", "err", err)
		if e.logErr == nil {
			e.logErr = fmt.Errorf("local device flush: %w", err)
		}
		e.cond.Broadcast()
		return
	}
	s := e.sites[nr]
	if s == nil {
		return
	}
	for _, q := range e.q {
		if q.Seq <= s.applied {
			e.markDirty(s, q)
		}
	}
	e.failSite(s, err)
}

// register makes dev live: its local device first catches up with entries
// still in the log (replay after a restart), then its sites.
func (e *engine) register(t *devTarget) error {
	for nr, sd := range t.sites {
		if err := sd.log.Resume(); err != nil {
			return fmt.Errorf("slink %d dirty log: %w", nr, err)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return fmt.Errorf("replicator is closed: %w", mapper.ErrIO)
	}
	for nr := range t.sites {
		if _, ok := e.links[nr]; !ok {
			return fmt.Errorf("slink %d: not defined by the replicator", nr)
		}
	}
	old := e.devs[t.nr]
	if old != nil && old.owner != nil && old.owner.device != t.device {
		return mapper.Errorf(mapper.ErrBusy, "dev_nr %d: in use by device %s", t.nr, old.owner.device)
	}
	d := &devReg{nr: t.nr, owner: t, length: t.length, local: t.local, sites: map[uint32]*siteDev{}}
	for nr, sd := range t.sites {
		d.sites[nr] = &siteDev{dev: sd.dev, log: sd.log}
	}
	if old != nil {
		d.inflight = old.inflight
	}
	e.devs[t.nr] = d
	// Replay: entries of this device not yet applied locally.
	for _, q := range e.q {
		if q.Dev != t.nr || q.localStarted || q.Seq > e.durable {
			continue
		}
		q.localStarted = true
		data := q.Data
		var err error
		e.mu.Unlock()
		if q.Op == mapper.OpWrite && data == nil {
			data, err = e.log.ReadData(q.Entry)
		}
		if err == nil {
			err = d.local.Apply(q.Op, q.Sector, q.Sectors, data)
		}
		e.mu.Lock()
		if err != nil {
			q.localStarted = false
			return fmt.Errorf("replay entry %d on the local device: %w", q.Seq, err)
		}
		q.localDone = true
	}
	for n := e.entry(e.localWM + 1); n != nil && n.localDone; n = e.entry(e.localWM + 1) {
		e.localWM++
	}
	for nr := range d.sites {
		if s := e.sites[nr]; s != nil {
			s.dirty = true
		}
	}
	e.cond.Broadcast()
	return nil
}

// unregister detaches t's registration if it is still the live one.
func (e *engine) unregister(t *devTarget) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if d := e.devs[t.nr]; d != nil && d.owner == t {
		d.owner = nil
		d.local = nil
		d.sites = map[uint32]*siteDev{}
		if len(d.inflight) == 0 && e.noEntries(t.nr) {
			delete(e.devs, t.nr)
		}
	}
	e.cond.Broadcast()
}

// noEntries reports whether no live entry belongs to dev; the caller holds mu.
func (e *engine) noEntries(dev uint32) bool {
	for _, q := range e.q {
		if q.Dev == dev {
			return false
		}
	}
	return true
}

// dropDevice makes sites skip the entries of a detached device ("device
// del"), so that the log does not wait for it.
func (e *engine) dropDevice(nr uint32) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.devs[nr]
	if d == nil {
		if e.noEntries(nr) {
			return nil
		}
		d = &devReg{nr: nr, sites: map[uint32]*siteDev{}}
		e.devs[nr] = d
	}
	if d.owner != nil {
		return mapper.Errorf(mapper.ErrBusy, "dev_nr %d: device %s is loaded", nr, d.owner.device)
	}
	d.dropped = true
	for _, q := range e.q {
		if q.Dev == nr && !q.localStarted {
			q.localStarted, q.localDone = true, true
		}
	}
	for n := e.entry(e.localWM + 1); n != nil && n.localDone; n = e.entry(e.localWM + 1) {
		e.localWM++
	}
	e.cond.Broadcast()
	return nil
}

// flush returns when every entry written so far is durable in the log
// (a guest flush: acknowledged writes are durable already).
func (e *engine) flush() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	for e.durable < e.written && e.logErr == nil && !e.closed {
		e.cond.Wait()
	}
	if e.logErr != nil {
		return fmt.Errorf("replication log: %w", errors.Join(e.logErr, mapper.ErrIO))
	}
	return nil
}
