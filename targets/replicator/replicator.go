package replicator

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// replicator defines a replication log and its site links.
//
//	replicator <replog_type> <#replog_params> <replog_params>... {<slink_type> <#slink_params> <slink_params>...}{1..N}
//	replog ringbuffer: <dev_path> <dev_start> [auto|create|open <size>]
//	slink blockdev:    <slink_nr> [sync|async [ios <N> | size <N><unit> | timeout <N><unit>]]
//
// Site link 0, the local site, comes first and is sync. The device takes
// no I/O itself (flushes excepted): replicator-dev devices name it as
// /dev/mapper/NAME and send their writes through its log.
//
// INFO: the log's words, the log's tail and head sequence numbers, the
// space used, then one group per site link:
//
//	ringbuffer /dev/vg/rlog A 1041 1057 312/8184 2 0 sync active 0 0 0 16/16 1 async behind 16 65536 120 16/16
//
// (<type> <log_dev> <A|D> <tail_seq> <head_seq> <used>/<size> <#slinks>
// {<slink_nr> <sync|async> <state> <backlog_ios> <backlog_bytes>
// <backlog_age_ms> <regions_in_sync>/<regions>}; state is active, behind
// (async over its fall-behind threshold: writes wait for it), resync,
// failed, paused or waiting (for a replicator-dev that is not loaded)).
//
// TABLE: "ringbuffer 4 /dev/vg/rlog 0 auto 8192 blockdev 1 0 blockdev 4 1
// async ios 1000" (create is printed as auto: the log exists by then).
//
// Messages: "pause|stop|suspend <slink_nr>|all", "resume|start
// <slink_nr>|all", "resync <slink_nr>", "device del <dev_nr>".
// Events: slink-fell-behind, slink-caught-up, slink-failed,
// slink-log-full, slink-in-sync (data: slink, and the reason).
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "replicator", Version: [3]int{1, 0, 0}, New: newReplicator})
	mapper.RegisterTarget(&mapper.TargetType{Name: "replicator-dev", Version: [3]int{1, 0, 0}, New: newDev})
}

// directory maps logs and replicator devices to their engines, per Manager.
type directory struct {
	mu     sync.Mutex
	byKey  map[any]*engine
	byName map[string]*engine
}

type directoryKey struct{}

func dirOf(c *mapper.Ctx) *directory {
	return c.Shared(directoryKey{}, func() any {
		return &directory{byKey: map[any]*engine{}, byName: map[string]*engine{}}
	}).(*directory)
}

// replTarget is one loaded replicator table line.
type replTarget struct {
	// Immutable.
	device string
	dir    *directory
	eng    *engine
	links  map[uint32]SiteLink
	order  []SiteLink // as the table gave them
	event  mapper.EventRaiser
	closed sync.Once
}

// creator is a Log that was asked to create a new log.
type creator interface{ Creates() bool }

func newReplicator(c *mapper.Ctx, args []string) (mapper.Target, error) {
	a := mapper.NewArgs(args)
	typ, err := a.Next("replog type")
	if err != nil {
		return nil, err
	}
	lt, err := LogTypes.Lookup(typ)
	if err != nil {
		return nil, err
	}
	n, err := a.Uint("#replog_params", 0, uint64(max(a.Len()-1, 0)))
	if err != nil {
		return nil, err
	}
	logArgs := make([]string, n)
	for i := range logArgs {
		logArgs[i], _ = a.Next("replog parameter")
	}
	links := map[uint32]SiteLink{}
	var order []SiteLink
	for a.Len() > 0 {
		st, _ := a.Next("slink type")
		slt, err := SiteLinkTypes.Lookup(st)
		if err != nil {
			return nil, err
		}
		k, err := a.Uint("#slink_params", 1, uint64(max(a.Len()-1, 1)))
		if err != nil {
			return nil, err
		}
		params := make([]string, k)
		for i := range params {
			params[i], _ = a.Next("slink parameter")
		}
		l, err := slt.New(c, params)
		if err != nil {
			return nil, err
		}
		if _, dup := links[l.Nr()]; dup {
			return nil, fmt.Errorf("slink %d: given twice", l.Nr())
		}
		if len(order) == 0 && l.Nr() != 0 {
			return nil, fmt.Errorf("slink %d: the first site link must be slink 0, the local site", l.Nr())
		}
		links[l.Nr()] = l
		order = append(order, l)
	}
	if len(order) == 0 {
		return nil, errors.New("missing site links: want at least slink 0")
	}
	if len(order) > maxSites {
		return nil, fmt.Errorf("%d site links: at most %d", len(order), maxSites)
	}
	lg, err := lt.New(c, logArgs)
	if err != nil {
		return nil, err
	}
	dir := dirOf(c)
	dir.mu.Lock()
	defer dir.mu.Unlock()
	eng := dir.byKey[lg.Key()]
	if eng != nil {
		if cr, ok := lg.(creator); ok && cr.Creates() {
			return nil, mapper.Errorf(mapper.ErrBusy, "create: the replication log is active")
		}
		if err := eng.checkLinks(links); err != nil {
			return nil, err
		}
		eng.refs++
	} else {
		eng, err = newEngine(lg.Key(), lg, links, c.Logger())
		if err != nil {
			return nil, err
		}
		eng.refs = 1
		dir.byKey[eng.key] = eng
		eng.configure(links, c.Event())
	}
	if dir.byName[c.Device] == nil {
		dir.byName[c.Device] = eng
	}
	return &replTarget{device: c.Device, dir: dir, eng: eng, links: links, order: order, event: c.Event()}, nil
}

// checkLinks refuses a reload that drops a site link devices still use.
func (e *engine) checkLinks(links map[uint32]SiteLink) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, d := range e.devs {
		if d.owner == nil {
			continue
		}
		for nr := range d.sites {
			if _, ok := links[nr]; !ok {
				return mapper.Errorf(mapper.ErrBusy, "slink %d: still used by device %s", nr, d.owner.device)
			}
		}
	}
	return nil
}

// Areas lists the log's area.
func (t *replTarget) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	if al, ok := t.eng.log.(mapper.AreaLister); ok {
		return al.Areas(fn)
	}
	return nil
}

// Map takes flushes (the log's group commit); the device has no data.
func (t *replTarget) Map(r *mapper.Request) error {
	if r.Op == mapper.OpFlush {
		return t.eng.flush()
	}
	return mapper.Errorf(mapper.ErrUnsupported, "%s: the replicator device takes no I/O", r.Op)
}

// Presuspend implements mapper.Suspender: the log goes on serving the
// replicator-dev devices while the replicator device is suspended.
func (t *replTarget) Presuspend(noflush bool) error { return nil }

// Resume implements mapper.Suspender: the table's site links take effect.
func (t *replTarget) Resume() error {
	t.eng.configure(t.links, t.event)
	t.dir.mu.Lock()
	t.dir.byName[t.device] = t.eng
	t.dir.mu.Unlock()
	return nil
}

// Close implements mapper.Target: the last table using the log stops it.
func (t *replTarget) Close() error {
	var err error
	t.closed.Do(func() {
		t.dir.mu.Lock()
		t.eng.refs--
		last := t.eng.refs == 0
		if last {
			delete(t.dir.byKey, t.eng.key)
			for n, e := range t.dir.byName {
				if e == t.eng {
					delete(t.dir.byName, n)
				}
			}
		}
		t.dir.mu.Unlock()
		if last {
			err = t.eng.close()
		}
	})
	return err
}

// Status implements mapper.Target.
func (t *replTarget) Status(kind mapper.StatusKind) string {
	if kind != mapper.StatusInfo {
		words := []string{t.eng.log.Status(mapper.StatusTable)}
		for _, l := range t.order {
			words = append(words, l.Table())
		}
		return strings.Join(words, " ")
	}
	return t.eng.status(t.order)
}

func (e *engine) status(order []SiteLink) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := time.Now()
	tail := e.nextSeq
	if len(e.q) > 0 {
		tail = e.q[0].Seq
	}
	used, size := e.log.Used()
	var b strings.Builder
	fmt.Fprintf(&b, "%s %d %d %d/%d %d", e.log.Status(mapper.StatusInfo), tail, e.nextSeq-1, used, size, len(order))
	for _, l := range order {
		nr := l.Nr()
		inSync, regions := e.syncCounts(nr)
		if nr == 0 {
			ios := e.nextSeq - 1 - e.localWM
			bytes := e.cumAt(e.nextSeq-1) - e.cumAt(e.localWM)
			var age time.Duration
			if q := e.entry(e.localWM + 1); q != nil {
				age = now.Sub(q.t)
			}
			fmt.Fprintf(&b, " 0 sync active %d %d %d %d/%d", ios, bytes, age.Milliseconds(), regions, regions)
			continue
		}
		s := e.sites[nr]
		if s == nil {
			fmt.Fprintf(&b, " %d %s waiting 0 0 0 %d/%d", nr, policyWord(l.Policy()), inSync, regions)
			continue
		}
		ios, bytes, age := e.backlog(s, now)
		fmt.Fprintf(&b, " %d %s %s %d %d %d %d/%d", nr, policyWord(s.policy), e.stateWord(s, inSync < regions), ios, bytes, age.Milliseconds(), inSync, regions)
	}
	return b.String()
}

func policyWord(p Policy) string {
	if p.Sync {
		return "sync"
	}
	return "async"
}

func (e *engine) stateWord(s *site, outOfSync bool) string {
	switch {
	case s.state == siteFailed:
		return "failed"
	case s.state == sitePaused:
		return "paused"
	case s.waiting:
		return "waiting"
	case s.behind:
		return "behind"
	case s.dirty && outOfSync:
		return "resync"
	}
	return "active"
}

// syncCounts returns the regions in sync and all regions of site nr over
// every loaded device; the caller holds mu.
func (e *engine) syncCounts(nr uint32) (inSync, regions uint64) {
	for _, d := range e.devs {
		if sd := d.sites[nr]; sd != nil {
			inSync += sd.log.SyncCount()
			regions += sd.log.Regions()
		}
	}
	return inSync, regions
}

// Message implements mapper.Messenger.
func (t *replTarget) Message(args []string) (string, error) {
	if len(args) == 0 {
		return "", errors.New("empty message")
	}
	e := t.eng
	switch args[0] {
	case "pause", "stop", "suspend", "resume", "start", "resync":
		if len(args) != 2 {
			return "", fmt.Errorf("message %s: want %s <slink_nr>|all", args[0], args[0])
		}
		sites, err := e.siteArg(args[1], args[0] != "resync")
		if err != nil {
			return "", err
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, s := range sites {
			switch args[0] {
			case "pause", "stop", "suspend":
				s.state, s.behind = sitePaused, false
			case "resume", "start":
				if s.state != siteActive {
					s.state, s.dirty = siteActive, true
				}
			case "resync":
				e.resyncAll(s)
			}
		}
		e.cond.Broadcast()
		return "", nil
	case "device":
		if len(args) != 3 || args[1] != "del" {
			return "", errors.New("message device: want device del <dev_nr>")
		}
		nr, err := mapper.ParseUint("dev_nr", args[2], 0, 1<<32-1)
		if err != nil {
			return "", err
		}
		return "", e.dropDevice(uint32(nr))
	}
	return "", fmt.Errorf("message %q: unknown, want pause, resume, resync or device del", args[0])
}

// siteArg resolves "all" or a remote site number.
func (e *engine) siteArg(s string, allowAll bool) ([]*site, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if s == "all" && allowAll {
		var out []*site
		for _, x := range e.sites {
			out = append(out, x)
		}
		slices.SortFunc(out, func(a, b *site) int { return int(a.nr) - int(b.nr) })
		return out, nil
	}
	nr, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("slink %q: not a number", s)
	}
	if nr == 0 {
		return nil, errors.New("slink 0: the local site cannot be paused or resynchronised")
	}
	x := e.sites[uint32(nr)]
	if x == nil {
		return nil, mapper.Errorf(mapper.ErrNotFound, "slink %d: no such site link", nr)
	}
	return []*site{x}, nil
}

// resyncAll puts every region of site s out of sync; the caller holds mu.
func (e *engine) resyncAll(s *site) {
	for _, d := range e.devs {
		sd := d.sites[s.nr]
		if sd == nil {
			continue
		}
		for r := uint64(0); r < sd.log.Regions(); r++ {
			sd.log.MarkRegion(r)
			sd.log.SetRegionSync(r, false)
		}
		sd.cursor = 0
	}
	s.dirty = true
}
