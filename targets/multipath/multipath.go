// Package multipath is the multipath target: several paths to the same
// storage, grouped in priority groups, each group with a path selector
// from the [Selectors] registry (round-robin, queue-length, service-time).
// A failed I/O fails its path and is retried on another; with no valid
// path left, I/O waits (queue_if_no_path) or fails. It follows the kernel
// 6.1 dm-multipath 1.14 grammar, messages and status lines.
//
// The package registers the target type and its selectors in init; the
// daemon imports it for that effect:
//
//	import _ "github.com/vhostdm/vhostdm/targets/multipath"
package multipath

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// multipath maps the device onto whichever path its priority groups'
// selectors choose; every path is a whole device holding the same data.
//
//	multipath <#features> [<features>] <#hw_handler_args> [<hw_handler> <args>...]
//	    <#priority_groups> <initial_group>
//	    (<selector> <#selector_args> [<args>...] <#paths> <#path_args> (<dev> [<path_args>...]){#paths}){#priority_groups}
//
// Features: queue_if_no_path, retain_attached_hw_handler,
// pg_init_retries <1..50>, pg_init_delay_msecs <0..60000> and
// queue_mode bio|rq|mq, accepted and echoed as the kernel does (vhostdm
// has no SCSI device handlers, so the pg_init ones change nothing).
// A hardware handler is refused, except with queue_mode bio where the
// kernel ignores it too. Groups are numbered from 1; I/O uses the initial
// group (or the one switch_group named) while it has a valid path, then
// the first group in table order that has one, skipping disabled groups
// until only they are left.
//
// INFO:  "2 0 0 0 1 1 E 0 2 1 254:16 A 0 0 254:32 A 0 0": features (2,
// queue_io, pg_init_count; queue_io is 1 from the load until I/O first
// picks a group, as in kernel 6.1), hardware handler (0), #groups, next group, then
// per group its state (A active, E enabled, D disabled), 0 selector words,
// #paths and the selector's per-path word count, and per path its device,
// A or F, its failure count and the selector's words.
// TABLE: "0 0 1 1 queue-length 0 2 1 254:16 1 254:32 1" (the constructor's
// form, with the current group as the initial group).
//
// Messages: fail_path <dev>, reinstate_path <dev>, switch_group <n>,
// disable_group <n>, enable_group <n>, queue_if_no_path, fail_if_no_path;
// refused while suspended. Path failure and reinstatement raise the events
// PATH_FAILED and PATH_REINSTATED with the kernel's uevent fields DM_ACTION,
// DM_PATH and DM_NR_VALID_PATHS.
//
// Where we follow kernel 6.1 over the seed documents: repeat_count values
// above 1 are stored as 1, so the seed's queue-length and service-time
// examples print "8:0 1" where the seed shows "8:0 128" in TABLE (their
// status lines print exactly as the seed shows). vhostdm is bio-based: a
// noflush suspend fails I/O queued for want of a path, where the kernel
// pushes it back to be retried after resume; and the no_path_retry
// feature of multipath-tools is refused as the kernel refuses it.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "multipath", Version: [3]int{1, 14, 0},
		Features: mapper.Singleton | mapper.Immutable, New: newMultipath})
}

const (
	maxGroups   = 1024
	maxPaths    = 1024
	maxArgs     = 1024
	noInitDelay = 1<<32 - 1 // DM_PG_INIT_DELAY_DEFAULT: no pg_init_delay_msecs given
)

type pgpath struct {
	path   Path
	dev    mapper.Backend
	pg     *group
	active bool // guarded by multipath.mu
	fails  int  // guarded by multipath.mu
}

type group struct {
	num      int // from 1
	typ      *SelectorType
	sel      Selector
	paths    []*pgpath
	bypassed bool // guarded by multipath.mu
}

type multipathTarget struct {
	// Immutable after construction.
	length        uint64
	groups        []*group
	byPath        map[*Path]*pgpath
	retainHW      bool
	pgInitRetries uint64
	pgInitDelay   uint64
	queueMode     string // "rq" (default), "bio" or "mq" as given
	event         mapper.EventRaiser

	mu          sync.Mutex
	cond        sync.Cond // signalled when queued I/O may proceed
	queueIO     bool      // MPATHF_QUEUE_IO: set until the first group switch
	queueIfNone bool
	savedQueue  bool
	nextPG      *group
	currentPG   *group
	nrValid     int
	suspended   bool
	closed      bool
}

func newMultipath(c *mapper.Ctx, args []string) (mapper.Target, error) {
	t := &multipathTarget{length: c.Length, pgInitDelay: noInitDelay, queueMode: "rq", byPath: map[*Path]*pgpath{}, event: c.Event(), queueIO: true}
	t.cond.L = &t.mu
	a := mapper.NewArgs(args)
	if err := t.parseFeatures(a); err != nil {
		return nil, err
	}
	if t.queueMode == "bio" {
		t.retainHW = true // kernel 6.1 sets it for bio-based tables
	}
	if err := t.parseHWHandler(a); err != nil {
		return nil, err
	}
	nGroups, err := a.Uint("priority group count", 0, maxGroups)
	if err != nil {
		return nil, err
	}
	initial, err := a.Uint("initial priority group", 0, maxGroups)
	if err != nil {
		return nil, err
	}
	if (nGroups == 0) != (initial == 0) {
		return nil, fmt.Errorf("initial priority group %d: must be 0 exactly when there are no groups (%d)", initial, nGroups)
	}
	// Parse every group before opening any device.
	type pathSpec struct {
		name string
		args []string
	}
	var specs [][]pathSpec
	for a.Len() > 0 {
		g := &group{num: len(t.groups) + 1}
		if a.Len() < 2 {
			return nil, fmt.Errorf("priority group %d: not enough arguments", g.num)
		}
		name, _ := a.Next("path selector")
		if g.typ, err = Selectors.Lookup(name); err != nil {
			return nil, fmt.Errorf("priority group %d: %w", g.num, err)
		}
		selArgs, err := readGroup(a, "path selector argument count", maxArgs)
		if err != nil {
			return nil, fmt.Errorf("priority group %d: %w", g.num, err)
		}
		if g.sel, err = g.typ.New(selArgs); err != nil {
			return nil, fmt.Errorf("priority group %d: %w", g.num, err)
		}
		nPaths, err := a.Uint("path count", 1, maxPaths)
		if err != nil {
			return nil, fmt.Errorf("priority group %d: %w", g.num, err)
		}
		nArgs, err := a.Uint("path argument count", 0, maxArgs)
		if err != nil {
			return nil, fmt.Errorf("priority group %d: %w", g.num, err)
		}
		var ps []pathSpec
		for i := uint64(0); i < nPaths; i++ {
			if uint64(a.Len()) < 1+nArgs {
				return nil, fmt.Errorf("priority group %d: path %d: want a device and %d path arguments, %d arguments left", g.num, i+1, nArgs, a.Len())
			}
			dev, _ := a.Next("device")
			p := pathSpec{name: dev}
			for j := uint64(0); j < nArgs; j++ {
				s, _ := a.Next("path argument")
				p.args = append(p.args, s)
			}
			ps = append(ps, p)
		}
		t.groups = append(t.groups, g)
		specs = append(specs, ps)
		if uint64(g.num) == initial {
			t.nextPG = g
		}
	}
	if uint64(len(t.groups)) != nGroups {
		return nil, fmt.Errorf("priority group count %d: the table has %d groups", nGroups, len(t.groups))
	}
	for i, g := range t.groups {
		for j, ps := range specs[i] {
			p := &pgpath{path: Path{Name: ps.name}, pg: g, active: true}
			if err := g.sel.AddPath(&p.path, ps.args); err != nil {
				return nil, fmt.Errorf("priority group %d: path %s: %w", g.num, ps.name, err)
			}
			if p.dev, err = c.Open(ps.name); err != nil {
				return nil, fmt.Errorf("priority group %d: path %d: %w", g.num, j+1, err)
			}
			g.paths = append(g.paths, p)
			t.byPath[&p.path] = p
			t.nrValid++
		}
	}
	return t, nil
}

// readGroup reads a counted group of arguments (dm_read_arg_group): a count
// up to max that must not exceed what is left.
func readGroup(a *mapper.Args, what string, max uint64) ([]string, error) {
	n, err := a.Uint(what, 0, max)
	if err != nil {
		return nil, err
	}
	if n > uint64(a.Len()) {
		return nil, fmt.Errorf("%s %d: only %d arguments follow", what, n, a.Len())
	}
	out := make([]string, n)
	for i := range out {
		out[i], _ = a.Next(what)
	}
	return out, nil
}

// parseFeatures reads the feature group as the kernel's parse_features.
func (t *multipathTarget) parseFeatures(a *mapper.Args) error {
	f, err := readGroup(a, "feature count", 8)
	if err != nil {
		return err
	}
	for i := 0; i < len(f); i++ {
		name := strings.ToLower(f[i])
		hasArg := i+1 < len(f)
		switch {
		case name == "queue_if_no_path":
			t.queueIfNone, t.savedQueue = true, true
		case name == "retain_attached_hw_handler":
			t.retainHW = true
		case name == "pg_init_retries" && hasArg:
			i++
			if t.pgInitRetries, err = mapper.ParseUint("pg_init_retries", f[i], 1, 50); err != nil {
				return err
			}
		case name == "pg_init_delay_msecs" && hasArg:
			i++
			if t.pgInitDelay, err = mapper.ParseUint("pg_init_delay_msecs", f[i], 0, 60000); err != nil {
				return err
			}
		case name == "queue_mode" && hasArg:
			i++
			switch m := strings.ToLower(f[i]); m {
			case "bio", "rq":
				t.queueMode = m
			case "mq":
				t.queueMode = "rq" // kernel 6.1 treats mq as rq
			default:
				return fmt.Errorf("queue_mode %q: must be bio, rq or mq", f[i])
			}
		default:
			return fmt.Errorf("feature %q: unknown or missing its value", f[i])
		}
	}
	return nil
}

// parseHWHandler reads the hardware handler group. vhostdm has no SCSI
// device handlers; like the kernel's bio-based mode it drops them there.
func (t *multipathTarget) parseHWHandler(a *mapper.Args) error {
	hw, err := readGroup(a, "hardware handler argument count", maxArgs)
	if err != nil || len(hw) == 0 {
		return err
	}
	if t.queueMode == "bio" {
		return nil
	}
	return fmt.Errorf("hardware handler %q: not supported (SCSI device handlers)", hw[0])
}

// choose returns the path for an I/O of n bytes, or nil when no path is
// valid: choose_pgpath. The caller holds mu.
func (t *multipathTarget) choose(n uint64) *pgpath {
	if t.nrValid == 0 {
		t.queueIO = false
		t.currentPG = nil
		return nil
	}
	if g := t.nextPG; g != nil {
		t.nextPG = nil
		if p := t.chooseIn(g, n); p != nil {
			return p
		}
	}
	// Don't change groups until the current one has no valid path.
	if g := t.currentPG; g != nil {
		if p := t.chooseIn(g, n); p != nil {
			return p
		}
	}
	// First the groups not disabled, then the disabled ones.
	for _, bypassed := range []bool{false, true} {
		for _, g := range t.groups {
			if g.bypassed != bypassed {
				continue
			}
			if p := t.chooseIn(g, n); p != nil {
				return p
			}
		}
	}
	t.currentPG = nil
	return nil
}

func (t *multipathTarget) chooseIn(g *group, n uint64) *pgpath {
	p := g.sel.Select(n)
	if p == nil {
		return nil
	}
	if t.currentPG != g { // __switch_pg: no pg_init without a hardware handler
		t.currentPG = g
		t.queueIO = false
	}
	return t.byPath[p]
}

// noRetry reports errors that another path would give as well (the
// kernel's noretry_error: not supported, no space, target errors).
func noRetry(err error) bool {
	return errors.Is(err, mapper.ErrUnsupported) || errors.Is(err, mapper.ErrReadOnly) || errors.Is(err, mapper.ErrInvalid)
}

func (t *multipathTarget) Map(r *mapper.Request) error {
	n := r.Bytes()
	for {
		t.mu.Lock()
		p := t.choose(n)
		for p == nil && t.queueIfNone && !t.closed {
			t.cond.Wait()
			p = t.choose(n)
		}
		t.mu.Unlock()
		if p == nil {
			return mapper.Errorf(mapper.ErrIO, "no valid path")
		}
		sel := p.pg.sel
		sel.StartIO(&p.path, n)
		err := mapper.MapBackend(p.dev, r.Sector, r) // a path is the same sectors of another whole device
		sel.EndIO(&p.path, n)
		if err == nil || noRetry(err) {
			return err
		}
		t.failPath(p)
	}
}

// failPath takes p out of use and raises PATH_FAILED; failing a failed
// path does nothing.
func (t *multipathTarget) failPath(p *pgpath) {
	t.mu.Lock()
	if !p.active {
		t.mu.Unlock()
		return
	}
	p.pg.sel.FailPath(&p.path)
	p.active = false
	p.fails++
	t.nrValid--
	n := t.nrValid
	t.mu.Unlock()
	t.pathEvent("PATH_FAILED", p, n)
}

// reinstatePath brings p back and wakes queued I/O.
func (t *multipathTarget) reinstatePath(p *pgpath) {
	t.mu.Lock()
	if p.active {
		t.mu.Unlock()
		return
	}
	p.pg.sel.ReinstatePath(&p.path)
	p.active = true
	t.nrValid++
	n := t.nrValid
	t.cond.Broadcast()
	t.mu.Unlock()
	t.pathEvent("PATH_REINSTATED", p, n)
}

// pathEvent raises a path event with the kernel's uevent fields.
func (t *multipathTarget) pathEvent(action string, p *pgpath, valid int) {
	t.event(action, map[string]any{"target": "multipath", "DM_ACTION": action, "DM_PATH": p.path.Name, "DM_NR_VALID_PATHS": valid})
}

// setQueue sets queue_if_no_path; save also remembers the old value for
// Resume (presuspend), else the new one. Turning queueing off lets queued
// I/O fail.
func (t *multipathTarget) setQueue(queue, save bool) {
	if save {
		t.savedQueue = t.queueIfNone
	} else {
		t.savedQueue = queue
	}
	t.queueIfNone = queue
	t.cond.Broadcast()
}

// Message handles the kernel's multipath messages.
func (t *multipathTarget) Message(args []string) (string, error) {
	t.mu.Lock()
	suspended := t.suspended
	t.mu.Unlock()
	if suspended {
		return "", mapper.Errorf(mapper.ErrBusy, "message %q: device suspended", strings.Join(args, " "))
	}
	cmd := strings.ToLower(args[0])
	if len(args) == 1 && (cmd == "queue_if_no_path" || cmd == "fail_if_no_path") {
		t.mu.Lock()
		t.setQueue(cmd == "queue_if_no_path", false)
		t.mu.Unlock()
		return "", nil
	}
	if len(args) != 2 {
		return "", fmt.Errorf("message %q: want 2 words, got %d", strings.Join(args, " "), len(args))
	}
	switch cmd {
	case "disable_group", "enable_group", "switch_group":
		num, err := mapper.ParseUint("group number", args[1], 1, uint64(max(len(t.groups), 1)))
		if err != nil || len(t.groups) == 0 {
			return "", fmt.Errorf("%s: group %q: must be 1 to %d", cmd, args[1], len(t.groups))
		}
		g := t.groups[num-1]
		t.mu.Lock()
		switch cmd {
		case "switch_group":
			for _, o := range t.groups {
				o.bypassed = false
			}
			t.currentPG, t.nextPG = nil, g
		default:
			g.bypassed = cmd == "disable_group"
			t.currentPG = nil
		}
		t.mu.Unlock()
		t.event("PG_CHANGED", map[string]any{"target": "multipath", "message": cmd, "group": num})
		return "", nil
	case "fail_path", "reinstate_path":
		found := false
		for _, g := range t.groups {
			for _, p := range g.paths {
				if p.path.Name != args[1] {
					continue
				}
				found = true
				if cmd == "fail_path" {
					t.failPath(p)
				} else {
					t.reinstatePath(p)
				}
			}
		}
		if !found {
			return "", fmt.Errorf("%s: device %q: not a path of this table", cmd, args[1])
		}
		return "", nil
	}
	return "", fmt.Errorf("message %q: unknown", args[0])
}

// Presuspend stops queueing so that I/O waiting for a path fails and the
// suspend can complete; Resume restores the setting.
func (t *multipathTarget) Presuspend(noflush bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.setQueue(false, true)
	t.suspended = true
	return nil
}

// Resume restores queue_if_no_path as it was before the suspend.
func (t *multipathTarget) Resume() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.queueIfNone = t.savedQueue
	t.suspended = false
	return nil
}

// Close fails any I/O still waiting for a path.
func (t *multipathTarget) Close() error {
	t.mu.Lock()
	t.closed = true
	t.cond.Broadcast()
	t.mu.Unlock()
	return nil
}

func (t *multipathTarget) Status(kind mapper.StatusKind) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var w []string
	add := func(f string, a ...any) { w = append(w, fmt.Sprintf(f, a...)) }
	if kind == mapper.StatusInfo {
		queueIO := 0
		if t.queueIO {
			queueIO = 1
		}
		add("2 %d 0 0", queueIO) // queue_io, pg_init_count; no hardware handler status
	} else {
		var f []string
		if t.queueIfNone {
			f = append(f, "queue_if_no_path")
		}
		if t.pgInitRetries > 0 {
			f = append(f, fmt.Sprintf("pg_init_retries %d", t.pgInitRetries))
		}
		if t.pgInitDelay != noInitDelay {
			f = append(f, fmt.Sprintf("pg_init_delay_msecs %d", t.pgInitDelay))
		}
		if t.retainHW {
			f = append(f, "retain_attached_hw_handler")
		}
		if t.queueMode != "rq" {
			f = append(f, "queue_mode "+t.queueMode)
		}
		words := len(strings.Fields(strings.Join(f, " ")))
		add("%d", words)
		w = append(w, f...)
		add("0")
	}
	pgNum := 0
	switch {
	case t.nextPG != nil:
		pgNum = t.nextPG.num
	case t.currentPG != nil:
		pgNum = t.currentPG.num
	case len(t.groups) > 0:
		pgNum = 1
	}
	add("%d %d", len(t.groups), pgNum)
	for _, g := range t.groups {
		if kind == mapper.StatusInfo {
			state := "E"
			if g.bypassed {
				state = "D"
			} else if g == t.currentPG {
				state = "A"
			}
			add("%s 0 %d %d", state, len(g.paths), g.typ.InfoArgs)
		} else {
			add("%s 0 %d %d", g.typ.Name, len(g.paths), g.typ.TableArgs)
		}
		for _, p := range g.paths {
			if kind == mapper.StatusInfo {
				st := "F"
				if p.active {
					st = "A"
				}
				add("%s %s %d", p.path.Name, st, p.fails)
			} else {
				add("%s", p.path.Name)
			}
			if s := g.sel.PathStatus(&p.path, kind); s != "" {
				w = append(w, s)
			}
		}
	}
	return strings.Join(w, " ")
}

// Areas lists every path's device, whole.
func (t *multipathTarget) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	for _, g := range t.groups {
		for _, p := range g.paths {
			if err := fn(p.dev, 0, t.length); err != nil {
				return err
			}
		}
	}
	return nil
}
