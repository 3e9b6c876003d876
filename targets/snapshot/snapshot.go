package snapshot

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/copier"
	"github.com/vhostdm/vhostdm/internal/bgtask"
	"github.com/vhostdm/vhostdm/mapper"
)

// snapshot presents the origin as it was when the snapshot was created:
// chunks written since (through snapshot-origin, or to the snapshot
// itself) come from the COW device, the rest from the origin.
//
//	snapshot <origin> <COW device> <P|PO|N> <chunk_size> [<#features> [discard_zeroes_cow] [discard_passdown_origin]]
//
// P keeps the exceptions on the COW device in the kernel's format (the
// device survives restarts and moves to and from Linux); PO is P where a
// full COW device fails the writes that need space instead of invalidating
// the snapshot; N keeps them in memory. chunk_size is in sectors, a power
// of two; 0 takes the size in the COW header, or 32 for a new one.
//
// INFO:  "40/16384 16" (<sectors allocated>/<COW sectors> <metadata
// sectors>; the metadata is 0 for N), "Invalid" once the snapshot has been
// invalidated (COW full, or an I/O error), "Overflow" for a full PO store,
// "Merge failed". TABLE: "/dev/mapper/base-real /dev/mapper/snap-cow P 8".
//
// Events: "invalidated" and "overflow" (data: reason).
//
// Discards to a snapshot are refused unless discard_zeroes_cow is given;
// then, as kernel 6.1 does, each chunk a discard touches is handled alone:
// a chunk with an exception has its exception zeroed when the discard
// covers the whole chunk, or the covered part discarded on the COW device
// otherwise; a chunk without one is left as it is (the discard does not
// copy out). discard_passdown_origin (which needs discard_zeroes_cow) also
// discards the origin device beneath, bypassing snapshot-origin: nothing
// is copied out, so every snapshot of the origin sees the discard where it
// has no exception. TABLE echoes the features. A persistent store needs a
// COW device of at least two chunks at load time.
//
// snapshot-merge merges a persistent snapshot back into its origin in the
// background; it is loaded in place of the origin's snapshot-origin and
// presents the snapshot's content from the start.
//
//	snapshot-merge <origin> <COW device> P <chunk_size>
//
// INFO and TABLE as snapshot; the allocated sectors fall as chunks are
// merged, to the metadata alone ("16/16384 16"). Writes to a chunk being
// merged wait for it; other writes go on. Events: "merge-finished",
// "merge-failed". A suspend pauses the merge; resume restarts it.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "snapshot", Version: [3]int{1, 16, 0}, New: newSnapshot})
	mapper.RegisterTarget(&mapper.TargetType{Name: "snapshot-merge", Version: [3]int{1, 5, 0}, New: newMerge})
}

// mergeBatch bounds the chunks one merge step copies, so that writes to
// the merging range wait for one step only.
const mergeBatch = 64

// cowState is one COW device's snapshot: the exception store and table,
// shared by the targets loaded over it (at most one of which, the owner,
// serves I/O).
type cowState struct {
	// Immutable.
	key        any
	o          *origin
	st         store
	chunk      uint64 // sectors
	shift      uint64
	originDev  *handle // the owner's backends
	cowDev     *handle
	persistent bool

	// Guarded by mu.
	mu          sync.Mutex
	exc         map[uint64]uint64 // old chunk -> new chunk
	pending     map[uint64]*pendingEx
	valid       bool
	overflowed  bool
	merging     bool
	mergeFailed bool
	length      uint64 // owner's length in sectors
	event       mapper.EventRaiser
	owner       *snapTarget

	// Guarded by o.reg.mu.
	users []*snapTarget
}

// pendingEx is an exception whose chunk is being copied; writers to the
// chunk wait on done.
type pendingEx struct {
	done chan struct{}
}

// live reports whether origin writes must copy out to the snapshot.
func (cs *cowState) live() bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.valid && !cs.merging
}

// lookup returns the COW chunk of chunk, if it has an exception.
func (cs *cowState) lookup(chunk uint64) (uint64, bool, error) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if !cs.valid {
		return 0, false, mapper.ErrIO
	}
	nc, ok := cs.exc[chunk]
	return nc, ok, nil
}

// begin returns the COW chunk of chunk with p nil when the exception
// exists, or starts a new one: p is then its pending entry, to be passed
// to end once the data is in place.
func (cs *cowState) begin(chunk uint64) (p *pendingEx, nc uint64, err error) {
	for {
		cs.mu.Lock()
		if !cs.valid {
			cs.mu.Unlock()
			return nil, 0, mapper.ErrIO
		}
		if nc, ok := cs.exc[chunk]; ok {
			cs.mu.Unlock()
			return nil, nc, nil
		}
		if w := cs.pending[chunk]; w != nil {
			cs.mu.Unlock()
			<-w.done
			continue
		}
		nc, err := cs.st.prepare()
		if err != nil {
			cs.mu.Unlock()
			return nil, 0, err
		}
		p := &pendingEx{done: make(chan struct{})}
		cs.pending[chunk] = p
		cs.mu.Unlock()
		return p, nc, nil
	}
}

// end completes a pending exception; on error the snapshot is invalidated.
func (cs *cowState) end(p *pendingEx, chunk, nc uint64, err error) {
	cs.mu.Lock()
	delete(cs.pending, chunk)
	if err == nil {
		cs.exc[chunk] = nc
	}
	close(p.done)
	cs.mu.Unlock()
	if err != nil {
		cs.invalidate(err)
	}
}

// invalidate marks the snapshot invalid, on disk too, and raises an event.
func (cs *cowState) invalidate(err error) {
	cs.mu.Lock()
	if !cs.valid {
		cs.mu.Unlock()
		return
	}
	cs.valid = false
	ev := cs.event
	cs.mu.Unlock()
	cs.st.drop()
	if ev != nil {
		ev("invalidated", map[string]any{"reason": err.Error()})
	}
}

// copyChunk copies origin chunk to COW chunk nc.
func (cs *cowState) copyChunk(chunk, nc uint64) error {
	size, err := cs.originDev.Size()
	if err != nil {
		return err
	}
	start := chunk << cs.shift
	n := min(cs.chunk, uint64(size)>>mapper.SectorShift-min(start, uint64(size)>>mapper.SectorShift))
	if n == 0 {
		return nil
	}
	res := cs.o.reg.kcopyd.CopySync(copier.Region{Dev: cs.originDev, Sector: start, Sectors: n},
		[]copier.Region{{Dev: cs.cowDev, Sector: nc << cs.shift, Sectors: n}})
	return res.Err()
}

// snapTarget is one snapshot or snapshot-merge line.
type snapTarget struct {
	// Immutable.
	cs        *cowState
	o         *origin
	originDev mapper.Backend
	cowDev    mapper.Backend
	merge     bool
	length    uint64
	event     mapper.EventRaiser
	log       *slog.Logger
	// The kernel's discard features: discardZeroes zeroes the exception
	// of a chunk a discard covers; discardPassdown also discards the
	// origin device beneath, without copying out.
	discardZeroes, discardPassdown bool

	merger bgtask.Task // runs mergeLoop
}

func newSnapshot(c *mapper.Ctx, args []string) (mapper.Target, error) {
	return build(c, args, false)
}

func newMerge(c *mapper.Ctx, args []string) (mapper.Target, error) {
	return build(c, args, true)
}

func build(c *mapper.Ctx, args []string, merge bool) (mapper.Target, error) {
	if len(args) < 4 {
		return nil, fmt.Errorf("want at least 4 arguments <origin> <COW device> <P|PO|N> <chunk_size>, got %d", len(args))
	}
	zeroes, passdown, err := parseFeatures(args[4:])
	if err != nil {
		return nil, err
	}
	kind := strings.ToUpper(args[2])
	var persistentStore, overflowOK bool
	switch {
	case kind == "P":
		persistentStore = true
	case kind == "PO":
		persistentStore, overflowOK = true, true
	case strings.HasPrefix(kind, "P"):
		return nil, fmt.Errorf("persistent store option %q: unsupported", args[2][1:])
	case kind == "N":
	default:
		return nil, fmt.Errorf("exception store type %q: not P, PO or N", args[2])
	}
	if merge && !persistentStore {
		return nil, fmt.Errorf("exception store type %q: snapshot-merge needs a persistent store", args[2])
	}
	chunk, err := mapper.ParseUint("chunk size", args[3], 0, maxChunk)
	if err != nil {
		return nil, err
	}
	if chunk&(chunk-1) != 0 {
		return nil, fmt.Errorf("chunk size %d: not a power of 2", chunk)
	}
	if chunk == 0 && !persistentStore {
		return nil, fmt.Errorf("chunk size 0: a transient store needs a chunk size")
	}
	originDev, err := c.Open(args[0])
	if err != nil {
		return nil, fmt.Errorf("origin device: %w", err)
	}
	cowDev, err := c.Open(args[1])
	if err != nil {
		return nil, fmt.Errorf("COW device: %w", err)
	}
	if identity(originDev) == identity(cowDev) {
		return nil, fmt.Errorf("COW device %s: same as the origin device", args[1])
	}
	t := &snapTarget{originDev: originDev, cowDev: cowDev, merge: merge, length: c.Length, event: c.Event(),
		log: slog.Default().With("device", c.Device), discardZeroes: zeroes, discardPassdown: passdown}
	t.o = getOrigin(sharedRegistry(c), originDev)
	cs, err := t.attach(chunk, persistentStore, overflowOK)
	if err != nil {
		t.o.put()
		return nil, err
	}
	t.cs = cs
	return t, nil
}

// attach joins the snapshot already using the COW device (a handover: its
// store is taken over at resume) or reads the COW device's metadata.
func (t *snapTarget) attach(chunk uint64, persistentStore, overflowOK bool) (*cowState, error) {
	key := identity(t.cowDev)
	t.o.reg.mu.Lock()
	if cs := t.o.reg.cows[key]; cs != nil {
		defer t.o.reg.mu.Unlock()
		if cs.o != t.o {
			return nil, fmt.Errorf("COW device %s: in use by a snapshot of another origin", t.cowDev.Name())
		}
		if cs.persistent != persistentStore {
			return nil, fmt.Errorf("COW device %s: in use with a different store type", t.cowDev.Name())
		}
		// The kernel's __validate_exception_handover: a snapshot-merge
		// handover is refused while another snapshot of the origin
		// merges. (The kernel refuses a reload of the merging table
		// itself too; vhostdm takes that one, a handover of the merge
		// to its own COW, so that the live TABLE reloads.)
		if t.merge && t.o.merging(cs) {
			//lint:ignore ST1005 the kernel's message, verbatim (dmsetup users match it)
			return nil, errors.New("A snapshot is already merging.")
		}
		cs.users = append(cs.users, t)
		return cs, nil
	}
	t.o.reg.mu.Unlock()

	cs := &cowState{key: key, o: t.o, persistent: persistentStore, exc: map[uint64]uint64{}, pending: map[uint64]*pendingEx{},
		originDev: newHandle(t.originDev), cowDev: newHandle(t.cowDev), length: t.length, event: t.event, owner: t}
	if persistentStore {
		cs.st = newPersistent(cs.cowDev, chunk, overflowOK, t.log)
	} else {
		cs.st = &transient{cow: cs.cowDev, chunk: chunk}
	}
	valid, err := cs.st.read(func(old, nw uint64) { cs.exc[old] = nw })
	if err != nil {
		return nil, err
	}
	if !valid {
		t.log.Warn("snapshot is marked invalid", "cow", t.cowDev.Name())
	}
	cs.valid = valid
	cs.chunk = cs.st.chunkSize()
	for cs.chunk>>cs.shift > 1 {
		cs.shift++
	}

	t.o.reg.mu.Lock()
	defer t.o.reg.mu.Unlock()
	if t.o.reg.cows[key] != nil {
		return nil, mapper.Errorf(mapper.ErrBusy, "COW device %s: being loaded by another table", t.cowDev.Name())
	}
	t.o.reg.cows[key] = cs
	cs.users = []*snapTarget{t}
	t.o.register(cs)
	return cs, nil
}

// active reports whether t serves I/O for its COW device (false for a
// snapshot whose store was handed over to another table).
func (t *snapTarget) active() bool {
	t.cs.mu.Lock()
	defer t.cs.mu.Unlock()
	return t.cs.owner == t
}

// Discards implements mapper.Discarder: a snapshot serves discards only
// with discard_zeroes_cow (as the kernel's num_discard_bios), and a
// merging snapshot never.
func (t *snapTarget) Discards() bool { return t.discardZeroes && !t.merge }

// WritesZeroes implements mapper.Discarder.
func (*snapTarget) WritesZeroes() bool { return true }

// Map serves I/O chunk by chunk.
func (t *snapTarget) Map(r *mapper.Request) error {
	if !t.active() {
		return mapper.ErrIO
	}
	cs := t.cs
	switch r.Op {
	case mapper.OpFlush:
		if t.merge {
			return errors.Join(t.originDev.Flush(), t.cowDev.Flush())
		}
		return t.cowDev.Flush()
	case mapper.OpDiscard:
		if !t.discardZeroes || t.merge {
			return mapper.ErrUnsupported
		}
		// The kernel splits discards at chunk boundaries.
		for s := r.Sector; s < r.Sector+r.Sectors; {
			e := min((s>>cs.shift+1)<<cs.shift, r.Sector+r.Sectors)
			if err := t.discard(s>>cs.shift, s, e-s); err != nil {
				return err
			}
			s = e
		}
		return nil
	}
	bufOff := 0
	end := r.Sector + r.Sectors
	for s := r.Sector; s < end; {
		chunk := s >> cs.shift
		e := min((chunk+1)<<cs.shift, end)
		n := e - s
		var data [][]byte
		if r.Data != nil {
			data = mapper.SliceBufs(nil, r.Data, bufOff, int(n<<mapper.SectorShift))
		}
		var err error
		switch {
		case r.Op == mapper.OpRead:
			err = t.read(chunk, s, n, data)
		case t.merge:
			err = t.mergeWrite(r.Op, chunk, s, n, data)
		default:
			err = t.write(r.Op, chunk, s, n, data)
		}
		if err != nil {
			return err
		}
		bufOff += int(n << mapper.SectorShift)
		s = e
	}
	if r.FUA && r.Op != mapper.OpRead {
		if err := t.cowDev.Flush(); err != nil {
			return err
		}
		if t.merge {
			return t.originDev.Flush()
		}
	}
	return nil
}

// parseFeatures reads the kernel's optional feature group:
// [<#features> [discard_zeroes_cow] [discard_passdown_origin]].
func parseFeatures(args []string) (zeroes, passdown bool, err error) {
	if len(args) == 0 {
		return false, false, nil
	}
	n, perr := strconv.ParseUint(args[0], 10, 32)
	if perr != nil || n > 2 || int(n) > len(args)-1 {
		//lint:ignore ST1005 the kernel's message, verbatim
		return false, false, errors.New("Invalid number of feature arguments")
	}
	if int(n) < len(args)-1 {
		return false, false, fmt.Errorf("too many arguments: unexpected %q", args[1+n])
	}
	for _, f := range args[1 : 1+n] {
		switch strings.ToLower(f) {
		case "discard_zeroes_cow":
			zeroes = true
		case "discard_passdown_origin":
			passdown = true
		default:
			//lint:ignore ST1005 the kernel's message, verbatim
			return false, false, errors.New("Unrecognised feature requested")
		}
	}
	if passdown && !zeroes {
		return false, false, errors.New("discard_passdown_origin feature depends on discard_zeroes_cow")
	}
	return zeroes, passdown, nil
}

// discard is the kernel's snapshot_map for a discard of [s, s+n) within
// one chunk: with discard_passdown_origin the origin device is discarded
// (bypassing the origin target: no copy-out, other snapshots of the origin
// see it too, as the kernel documents); then a chunk with an exception has
// it zeroed when the discard covers the chunk, or the covered part of it
// discarded on the COW device otherwise; a chunk without one is left alone.
func (t *snapTarget) discard(chunk, s, n uint64) error {
	cs := t.cs
	if t.discardPassdown {
		unlock := t.o.locks.lock(chunk<<cs.shift, (chunk+1)<<cs.shift, true)
		err := t.originDev.Discard(int64(s)<<mapper.SectorShift, int64(n)<<mapper.SectorShift)
		unlock()
		if err != nil && !errors.Is(err, mapper.ErrUnsupported) {
			return err
		}
	}
	for {
		cs.mu.Lock()
		if !cs.valid {
			cs.mu.Unlock()
			return mapper.ErrIO
		}
		nc, ok := cs.exc[chunk]
		p := cs.pending[chunk]
		cs.mu.Unlock()
		if p != nil && !ok {
			<-p.done // the exception being made; then decide
			continue
		}
		if !ok {
			return nil
		}
		off := int64(nc<<cs.shift+s&(cs.chunk-1)) << mapper.SectorShift
		if n == cs.chunk {
			return t.cowDev.WriteZeroes(off, int64(n)<<mapper.SectorShift, false)
		}
		if err := t.cowDev.Discard(off, int64(n)<<mapper.SectorShift); err != nil && !errors.Is(err, mapper.ErrUnsupported) {
			return err
		}
		return nil
	}
}

// cowIO reads or writes sectors [s, s+n) of chunk at COW chunk nc.
func (t *snapTarget) cowIO(op mapper.Op, nc, s, n uint64, data [][]byte) error {
	off := int64(nc<<t.cs.shift+s&(t.cs.chunk-1)) << mapper.SectorShift
	switch op {
	case mapper.OpRead:
		return t.cowDev.ReadAt(data, off)
	case mapper.OpWriteZeroes:
		return t.cowDev.WriteZeroes(off, int64(n)<<mapper.SectorShift, false)
	}
	return t.cowDev.WriteAt(data, off)
}

// read reads [s, s+n) of one chunk: from the COW device if the chunk has an
// exception, else from the origin while no write can change it.
func (t *snapTarget) read(chunk, s, n uint64, data [][]byte) error {
	cs := t.cs
	nc, ok, err := cs.lookup(chunk)
	if err != nil {
		return err
	}
	if ok && !t.merge {
		return t.cowIO(mapper.OpRead, nc, s, n, data)
	}
	unlock := t.o.locks.lock(chunk<<cs.shift, (chunk+1)<<cs.shift, false)
	defer unlock()
	if nc, ok, err = cs.lookup(chunk); err != nil {
		return err
	} else if ok {
		return t.cowIO(mapper.OpRead, nc, s, n, data)
	}
	return t.originDev.ReadAt(data, int64(s)<<mapper.SectorShift)
}

// write writes [s, s+n) of one chunk of a snapshot, making the chunk's
// exception first if it has none.
func (t *snapTarget) write(op mapper.Op, chunk, s, n uint64, data [][]byte) error {
	cs := t.cs
	cs.mu.Lock()
	nc, ok := cs.exc[chunk]
	bad := !cs.valid || cs.overflowed
	cs.mu.Unlock()
	if bad {
		return mapper.ErrIO
	}
	if ok {
		return t.cowIO(op, nc, s, n, data)
	}
	unlock := t.o.locks.lock(chunk<<cs.shift, (chunk+1)<<cs.shift, false)
	defer unlock()
	p, nc, err := cs.begin(chunk)
	if errors.Is(err, errNoSpace) {
		t.overflow()
		return mapper.ErrIO
	}
	if err != nil {
		return err
	}
	if p == nil {
		return t.cowIO(op, nc, s, n, data)
	}
	if n != cs.chunk {
		err = cs.copyChunk(chunk, nc)
	}
	if err == nil {
		err = t.cowIO(op, nc, s, n, data)
	}
	if err == nil {
		err = cs.st.commit(chunk, nc)
	}
	cs.end(p, chunk, nc, err)
	return err
}

// overflow handles a full COW device on a write to the snapshot: PO marks
// the snapshot overflowed (writes fail, reads go on), P invalidates it.
func (t *snapTarget) overflow() {
	cs := t.cs
	if p, ok := cs.st.(*persistent); ok && p.overflowOK {
		cs.mu.Lock()
		first := cs.valid && !cs.overflowed
		cs.overflowed = true
		ev := cs.event
		cs.mu.Unlock()
		if first && ev != nil {
			ev("overflow", map[string]any{"reason": errNoSpace.Error()})
		}
		return
	}
	cs.invalidate(errNoSpace)
}

// mergeWrite writes [s, s+n) of one chunk of a merging snapshot: into the
// chunk's exception while it has one, else to the origin, copying out to
// the origin's other snapshots.
func (t *snapTarget) mergeWrite(op mapper.Op, chunk, s, n uint64, data [][]byte) error {
	cs := t.cs
	snaps, unlock := t.o.lockWrite(s, n, cs)
	defer unlock()
	nc, ok, err := cs.lookup(chunk)
	if err != nil {
		return err
	}
	if ok {
		return t.cowIO(op, nc, s, n, data)
	}
	copyOut(snaps, s, n)
	return mapper.MapBackend(t.originDev, s, &mapper.Request{Op: op, Sector: s, Sectors: n, Data: data})
}

// Status returns the usage or state (INFO) or the arguments (TABLE).
func (t *snapTarget) Status(kind mapper.StatusKind) string {
	cs := t.cs
	if kind == mapper.StatusTable {
		var feats []string
		if t.discardZeroes {
			feats = append(feats, "discard_zeroes_cow")
		}
		if t.discardPassdown {
			feats = append(feats, "discard_passdown_origin")
		}
		if len(feats) > 0 {
			return fmt.Sprintf("%s %s %s %d %s", t.originDev.Name(), t.cowDev.Name(), cs.st.table(), len(feats), strings.Join(feats, " "))
		}
		return fmt.Sprintf("%s %s %s", t.originDev.Name(), t.cowDev.Name(), cs.st.table())
	}
	cs.mu.Lock()
	valid, failed, over := cs.valid, cs.mergeFailed, cs.overflowed
	cs.mu.Unlock()
	switch {
	case !valid:
		return "Invalid"
	case failed:
		return "Merge failed"
	case over:
		return "Overflow"
	}
	alloc, total, meta := cs.st.usage()
	return fmt.Sprintf("%d/%d %d", alloc, total, meta)
}

// Presuspend pauses a merge.
func (t *snapTarget) Presuspend(noflush bool) error {
	t.stopMerge()
	return nil
}

// Resume takes the COW device's store over if another table had it, and
// starts or restarts a merge.
func (t *snapTarget) Resume() error {
	cs := t.cs
	t.o.reg.mu.Lock()
	cs.mu.Lock()
	if cs.owner != t {
		cs.owner = t
		cs.originDev.set(t.originDev)
		cs.cowDev.set(t.cowDev)
		cs.length = t.length
		cs.event = t.event
	}
	if t.merge {
		// A merge allocates nothing: a full store does not matter.
		cs.merging, cs.overflowed = true, false
	}
	cs.mu.Unlock()
	t.o.reg.mu.Unlock()
	t.o.register(cs)
	if t.merge {
		t.startMerge()
	}
	return nil
}

// Close stops a merge and leaves the COW device; the last table to leave
// it unregisters the snapshot from its origin.
func (t *snapTarget) Close() error {
	t.merger.Close()
	cs := t.cs
	// No origin write may be copying out to us while we leave.
	unlock := t.o.locks.lock(0, ^uint64(0), true)
	defer unlock()
	t.o.reg.mu.Lock()
	for i, u := range cs.users {
		if u == t {
			cs.users = append(cs.users[:i], cs.users[i+1:]...)
			break
		}
	}
	cs.mu.Lock()
	if cs.owner == t {
		cs.owner = nil
		if len(cs.users) > 0 {
			// Until the table waiting for a handover resumes, its
			// backends serve copy-outs.
			u := cs.users[0]
			cs.originDev.set(u.originDev)
			cs.cowDev.set(u.cowDev)
			cs.length, cs.event = u.length, u.event
		}
		if t.merge {
			cs.merging = false
		}
	}
	cs.mu.Unlock()
	if len(cs.users) == 0 {
		delete(t.o.reg.cows, cs.key)
		t.o.unregister(cs)
	}
	t.o.reg.mu.Unlock()
	t.o.put()
	return nil
}

// Areas lists the origin area the snapshot presents and the COW device.
func (t *snapTarget) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	if err := fn(t.originDev, 0, t.length); err != nil {
		return err
	}
	size, err := t.cowDev.Size()
	if err != nil {
		return err
	}
	return fn(t.cowDev, 0, uint64(size)>>mapper.SectorShift)
}

// Message takes no messages; it exists so that dmsetup message gets the
// kernel's refusal rather than "does not take messages".
func (t *snapTarget) Message(args []string) (string, error) {
	return "", fmt.Errorf("unrecognised message %q", strings.Join(args, " "))
}

func (t *snapTarget) startMerge() { t.merger.Start(t.mergeLoop) }

func (t *snapTarget) stopMerge() { t.merger.Stop() }

// mergeLoop copies exceptions back to the origin, newest first, a run of
// consecutive chunks at a time, until none is left or it is stopped.
func (t *snapTarget) mergeLoop(stop <-chan struct{}) {
	cs := t.cs
	fail := func(err error) {
		cs.mu.Lock()
		cs.mergeFailed = true
		ev := cs.event
		cs.mu.Unlock()
		t.log.Error("merge failed", "err", err)
		ev("merge-failed", map[string]any{"reason": err.Error()})
	}
	for {
		select {
		case <-stop:
			return
		default:
		}
		cs.mu.Lock()
		ok := cs.valid && !cs.mergeFailed
		cs.mu.Unlock()
		if !ok {
			return
		}
		lastOld, lastNew, n, err := cs.st.prepareMerge()
		if err != nil {
			fail(err)
			return
		}
		if n == 0 {
			t.event("merge-finished", nil)
			return
		}
		m := uint64(min(n, mergeBatch))
		old, nw := lastOld-(m-1), lastNew-(m-1)
		if err := t.mergeStep(old, nw, m); err != nil {
			fail(err)
			return
		}
	}
}

// mergeStep copies m chunks from COW chunk nw to origin chunk old.
func (t *snapTarget) mergeStep(old, nw, m uint64) error {
	cs := t.cs
	start, count := old<<cs.shift, m<<cs.shift
	snaps, unlock := t.o.lockWrite(start, count, cs)
	defer unlock()
	copyOut(snaps, start, count)
	size, err := t.originDev.Size()
	if err != nil {
		return err
	}
	osz := uint64(size) >> mapper.SectorShift
	if start < osz {
		n := min(count, osz-start)
		res := t.o.reg.kcopyd.CopySync(copier.Region{Dev: t.cowDev, Sector: nw << cs.shift, Sectors: n},
			[]copier.Region{{Dev: t.originDev, Sector: start, Sectors: n}})
		if err := res.Err(); err != nil {
			return err
		}
	}
	if err := t.originDev.Flush(); err != nil {
		return fmt.Errorf("flush after merge: %w", err)
	}
	if err := cs.st.commitMerge(int(m)); err != nil {
		return err
	}
	cs.mu.Lock()
	for i := uint64(0); i < m; i++ {
		delete(cs.exc, old+i)
	}
	cs.mu.Unlock()
	return nil
}

// handle is a Backend that forwards to another, replaceable one: the
// shared store keeps using whichever table owns the COW device.
type handle struct{ b atomic.Value }

func newHandle(b mapper.Backend) *handle {
	h := &handle{}
	h.set(b)
	return h
}

func (h *handle) set(b mapper.Backend)              { h.b.Store(&b) }
func (h *handle) get() mapper.Backend               { return *h.b.Load().(*mapper.Backend) }
func (h *handle) Name() string                      { return h.get().Name() }
func (h *handle) Size() (int64, error)              { return h.get().Size() }
func (h *handle) Flush() error                      { return h.get().Flush() }
func (h *handle) Close() error                      { return nil }
func (h *handle) Discard(o, n int64) error          { return h.get().Discard(o, n) }
func (h *handle) ReadAt(b [][]byte, o int64) error  { return h.get().ReadAt(b, o) }
func (h *handle) WriteAt(b [][]byte, o int64) error { return h.get().WriteAt(b, o) }
func (h *handle) WriteZeroes(o, n int64, u bool) error {
	return h.get().WriteZeroes(o, n, u)
}
