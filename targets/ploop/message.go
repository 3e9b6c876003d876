package ploop

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// Errors of messages that callers may want to tell apart.
var (
	// ErrAgain is returned by tracking_get_next when no cluster is dirty
	// (the kernel's EAGAIN).
	ErrAgain = errors.New("resource temporarily unavailable")
	// ErrStale is returned by push backup messages after the backup was
	// abandoned because a write waited too long (the kernel's ESTALE).
	ErrStale = errors.New("push backup abandoned")
)

// defaultBackupTimeout bounds how long a guest write waits for a push
// backup to copy its cluster.
const defaultBackupTimeout = 60 * time.Second

// Message implements mapper.Messenger; see the package comment.
func (t *target) Message(args []string) (string, error) {
	s := t.s
	want := func(n int, grammar string) error {
		if len(args) != n {
			return fmt.Errorf("%s: want %s", args[0], grammar)
		}
		return nil
	}
	level := func(what string) (int, error) {
		v, err := mapper.ParseUint(what, args[1], 0, maxDeltas)
		return int(v), err
	}
	switch args[0] {
	case "add_delta":
		if err := want(2, "add_delta <path>"); err != nil {
			return "", err
		}
		return "", s.addDelta(args[1])
	case "snapshot":
		if err := want(2, "snapshot <new top path>"); err != nil {
			return "", err
		}
		return "", s.snapshot(args[1])
	case "merge":
		if err := want(1, "merge"); err != nil {
			return "", err
		}
		return "", s.merge()
	case "notify_merged_forward", "notify_merged_backward":
		if err := want(2, args[0]+" <level>"); err != nil {
			return "", err
		}
		l, err := level("level")
		if err != nil {
			return "", err
		}
		return "", s.notifyMerged(l, args[0] == "notify_merged_forward")
	case "update_delta_index":
		if err := want(3, "update_delta_index <level> <clu:dst;...>"); err != nil {
			return "", err
		}
		l, err := level("level")
		if err != nil {
			return "", err
		}
		return "", s.updateDeltaIndex(l, args[2])
	case "get_delta_name":
		if err := want(2, "get_delta_name <level>"); err != nil {
			return "", err
		}
		l, err := level("level")
		if err != nil {
			return "", err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if l >= len(s.deltas) {
			return "", nil
		}
		return s.deltas[l].name(), nil
	case "flip_upper_deltas":
		if err := want(1, "flip_upper_deltas"); err != nil {
			return "", err
		}
		return "", s.flip()
	case "tracking_start", "tracking_stop", "tracking_get_next":
		if err := want(1, args[0]); err != nil {
			return "", err
		}
		return s.trackingCmd(strings.TrimPrefix(args[0], "tracking_"))
	case "set_noresume":
		if err := want(2, "set_noresume 0|1"); err != nil {
			return "", err
		}
		v, err := mapper.ParseUint("noresume", args[1], 0, 1)
		if err != nil {
			return "", err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.noresume == (v == 1) {
			return "", mapper.Errorf(mapper.ErrBusy, "noresume %q: already set", args[1])
		}
		s.noresume = v == 1
		return "", nil
	case "resize":
		if err := want(2, "resize <new size in sectors>"); err != nil {
			return "", err
		}
		v, err := mapper.ParseUint("new size", args[1], 1, mapper.MaxSector)
		if err != nil {
			return "", err
		}
		return "", s.resize(v)
	case "push_backup_start":
		if len(args) != 3 && len(args) != 4 {
			return "", fmt.Errorf("push_backup_start: want push_backup_start <uuid> 0 [<timeout s>]")
		}
		timeout := defaultBackupTimeout
		if len(args) == 4 {
			v, err := mapper.ParseUint("timeout", args[3], 1, 1<<31-1)
			if err != nil {
				return "", err
			}
			timeout = time.Duration(v) * time.Second
		}
		if args[2] != "0" {
			return "", mapper.Errorf(mapper.ErrUnsupported, "mask %q: only 0 (full backup) is supported", args[2])
		}
		return "", s.pushBackupStart(args[1], timeout)
	case "push_backup_stop":
		if len(args) != 2 && len(args) != 3 {
			return "", fmt.Errorf("push_backup_stop: want push_backup_stop <uuid>")
		}
		return s.pushBackupStop(args[1])
	case "push_backup_get_uuid":
		if err := want(1, "push_backup_get_uuid"); err != nil {
			return "", err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.pb == nil {
			return "", nil
		}
		return s.pb.uuid, nil
	case "push_backup_read":
		if err := want(2, "push_backup_read <uuid>"); err != nil {
			return "", err
		}
		return s.pushBackupRead(args[1])
	case "push_backup_write":
		if err := want(3, "push_backup_write <uuid> <cluster>:<count>"); err != nil {
			return "", err
		}
		return "", s.pushBackupWrite(args[1], args[2])
	}
	return "", fmt.Errorf("unknown message %q", args[0])
}

// writable refuses messages that change a read-only stack, and those
// that change the stack while tracking or a backup runs (the kernel's
// "maintenance").
func (s *stack) changeable() error {
	if s.readOnly {
		return mapper.ErrReadOnly
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tracking != nil {
		return mapper.Errorf(mapper.ErrBusy, "tracking is running")
	}
	if s.pb != nil {
		return mapper.Errorf(mapper.ErrBusy, "push backup %s is running", s.pb.uuid)
	}
	if s.merging {
		return mapper.Errorf(mapper.ErrBusy, "a merge is running")
	}
	return nil
}

// openImage opens an image by name for a message; the stack owns it.
func (s *stack) openImage(name string, writable bool, fmtSectors uint64) (*delta, error) {
	s.mu.Lock()
	for _, d := range s.deltas {
		if d.name() == name {
			s.mu.Unlock()
			return nil, fmt.Errorf("image %q: already in the stack", name)
		}
	}
	s.mu.Unlock()
	b, err := s.open(name)
	if err != nil {
		return nil, err
	}
	d, err := openDelta(b, s.cluSectors, writable, fmtSectors)
	if err == nil {
		err = d.check(false)
	}
	if err != nil {
		b.Close()
		return nil, err
	}
	d.own = true
	return d, nil
}

// addDelta puts an image under the top, as the newest read-only delta.
func (s *stack) addDelta(name string) error {
	if err := s.changeable(); err != nil {
		return err
	}
	if len(s.deltas) >= maxDeltas {
		return fmt.Errorf("add_delta: already %d images", maxDeltas)
	}
	d, err := s.openImage(name, false, 0)
	if err != nil {
		return err
	}
	s.io.Lock()
	defer s.io.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.deltas)
	s.deltas = append(s.deltas[:n-1:n-1], d, s.deltas[n-1])
	return nil
}

// snapshot makes name the new top; the old top becomes read-only.
func (s *stack) snapshot(name string) error {
	if err := s.changeable(); err != nil {
		return err
	}
	d, err := s.openImage(name, true, s.size())
	if err != nil {
		return err
	}
	s.io.Lock()
	defer s.io.Unlock()
	fail := func(err error) error {
		d.b.Close()
		return err
	}
	if d.dataEnd() != (uint64(d.h.dataOff)*mapper.SectorSize+s.clu-1)/s.clu*s.clu {
		return fail(fmt.Errorf("snapshot: image %s already has data clusters", name))
	}
	if d.h.sectors < s.size() {
		return fail(fmt.Errorf("snapshot: image %s has %d sectors, fewer than %d", name, d.h.sectors, s.size()))
	}
	if err := s.flush(); err != nil {
		return fail(err)
	}
	if err := d.setInUse(true); err != nil {
		return fail(err)
	}
	old := s.top()
	if err := old.setInUse(false); err != nil {
		d.setInUse(false)
		return fail(err)
	}
	s.mu.Lock()
	old.writable = false
	s.deltas = append(s.deltas, d)
	s.dataEnd = d.dataEnd()
	s.resetFreeLocked()
	s.mu.Unlock()
	s.rekey()
	return nil
}

// merge starts merging the newest delta into the top in the background,
// as dm-ploop merges while the guest's I/O goes on: each cluster the delta
// has and the top lacks is copied into the top the way a guest write
// allocates it (a guest write to the cluster waits for the copy, or the
// copy finds the cluster already written and skips it). Once all are
// copied and durable, the delta leaves the stack and the event "merged"
// is raised; a failure raises "merge-failed" and leaves the stack as it
// was. Unlike dm-ploop, whose message returns when the merge is done, the
// message returns at once: the INFO flag m shows the merge running. A
// suspend pauses it, resume continues it.
func (s *stack) merge() error {
	if err := s.changeable(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.deltas) < 2 {
		return mapper.Errorf(mapper.ErrNotFound, "merge: no delta under the top")
	}
	s.merging = true
	if !s.suspended {
		s.startMergeLocked()
	}
	return nil
}

// startMergeLocked starts the merge goroutine if a merge is wanted and
// none runs. s.mu must be held.
func (s *stack) startMergeLocked() {
	if !s.merging || s.mergeStop != nil {
		return
	}
	stop, done := make(chan struct{}), make(chan struct{})
	s.mergeStop, s.mergeDone = stop, done
	go s.runMerge(stop, done)
}

// stopMerge stops the merge goroutine and waits for it; the merge stays
// wanted (a resume continues it) unless forget.
func (s *stack) stopMerge(forget bool) {
	s.mu.Lock()
	stop, done := s.mergeStop, s.mergeDone
	if forget {
		s.merging = false
	}
	s.mergeStop, s.mergeDone = nil, nil
	s.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

// runMerge copies the newest delta's clusters into the top, then drops the
// delta. It returns early when stop is closed.
func (s *stack) runMerge(stop, done chan struct{}) {
	defer close(done)
	defer func() {
		s.mu.Lock()
		if s.mergeStop == stop {
			s.mergeStop, s.mergeDone = nil, nil
		}
		s.mu.Unlock()
	}()
	s.mu.Lock()
	src := s.deltas[len(s.deltas)-2]
	n := uint64(len(src.bat))
	s.mu.Unlock()
	err := func() error {
		for c := range n {
			select {
			case <-stop:
				return nil
			default:
			}
			s.io.RLock()
			err := s.mergeCluster(src, c)
			s.io.RUnlock()
			if err != nil {
				return err
			}
		}
		if err := s.flush(); err != nil {
			return err
		}
		s.io.Lock()
		defer s.io.Unlock()
		select {
		case <-stop: // a suspend came first: the drop waits for the resume
			return nil
		default:
		}
		s.drop(len(s.deltas) - 2)
		s.mu.Lock()
		s.merging = false
		s.mu.Unlock()
		s.event("merged", map[string]any{"delta": src.name()})
		return nil
	}()
	if err != nil {
		s.mu.Lock()
		s.merging = false
		s.mu.Unlock()
		s.event("merge-failed", map[string]any{"delta": src.name(), "error": err.Error()})
	}
}

// mergeCluster copies virtual cluster c of src (the delta under the top)
// into a new cluster of the top, unless the top has it already.
func (s *stack) mergeCluster(src *delta, c uint64) error {
	top := s.top()
	s.mu.Lock()
	for s.pending[c] != nil {
		ch := s.pending[c]
		s.mu.Unlock()
		<-ch
		s.mu.Lock()
	}
	srcOff, ok := src.loc(c)
	if _, has := top.loc(c); has || !ok || c >= uint64(len(top.bat)) {
		s.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	s.pending[c] = ch
	dst := s.allocLocked()
	s.mu.Unlock()

	buf := make([]byte, s.clu)
	err := src.b.ReadAt([][]byte{buf}, int64(srcOff))
	if err == nil {
		err = top.b.WriteAt([][]byte{buf}, int64(dst))
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pending, c)
	close(ch)
	if err != nil {
		s.releaseLocked(dst)
		return err
	}
	top.bat[c] = uint32(dst / top.unit)
	s.dirty[c] = struct{}{}
	s.track(dst / s.clu)
	return nil
}

// drop removes delta i from the stack, closing it if the stack opened it;
// s.io must be held exclusively.
func (s *stack) drop(i int) {
	s.mu.Lock()
	d := s.deltas[i]
	s.deltas = append(s.deltas[:i:i], s.deltas[i+1:]...)
	s.mu.Unlock()
	if d.own {
		d.b.Close()
	}
}

// notifyMerged takes note that userspace copied delta level into its
// neighbour (the newer one if forward): the neighbour's BAT is read again
// and level leaves the stack. The checks are the kernel's.
func (s *stack) notifyMerged(level int, forward bool) error {
	if err := s.changeable(); err != nil {
		return err
	}
	s.io.Lock()
	defer s.io.Unlock()
	topLevel := len(s.deltas) - 1
	switch {
	case level >= topLevel:
		return mapper.Errorf(mapper.ErrNotFound, "level %d: not a delta under the top (%d)", level, topLevel)
	case level == 0 && !forward:
		return fmt.Errorf("level 0: nothing to merge backward into")
	case level == topLevel-1 && forward:
		return fmt.Errorf("level %d: merging forward into the top is the merge message", level)
	case len(s.deltas) < 3:
		return fmt.Errorf("notify_merged: needs 3 images, have %d", len(s.deltas))
	}
	changed := level + 1
	if !forward {
		changed = level - 1
	}
	old := s.deltas[changed]
	d, err := openDelta(old.b, s.cluSectors, false, 0)
	if err == nil {
		err = d.check(false)
	}
	if err != nil {
		return err
	}
	d.own = old.own
	s.mu.Lock()
	s.deltas[changed] = d
	s.mu.Unlock()
	s.drop(level)
	return nil
}

// updateDeltaIndex sets BAT entries of a read-only delta in memory, as
// userspace rewrote them on disk: "clu:dst;clu:dst;".
func (s *stack) updateDeltaIndex(level int, m string) error {
	s.io.Lock()
	defer s.io.Unlock()
	s.mu.Lock()
	merging := s.merging
	s.mu.Unlock()
	if merging {
		return mapper.Errorf(mapper.ErrBusy, "a merge is running")
	}
	if level >= len(s.deltas)-1 {
		return mapper.Errorf(mapper.ErrNotFound, "level %d: not a delta under the top", level)
	}
	d := s.deltas[level]
	type pair struct{ c, dst uint64 }
	var set []pair
	for _, p := range strings.Split(strings.TrimSuffix(m, ";"), ";") {
		cs, ds, ok := strings.Cut(p, ":")
		if !ok {
			return fmt.Errorf("map entry %q: want <cluster>:<dst cluster>", p)
		}
		c, err := mapper.ParseUint("cluster", cs, 0, uint64(len(d.bat))-1)
		if err != nil {
			return err
		}
		dst, err := mapper.ParseUint("dst cluster", ds, 1, batNone-1)
		if err != nil {
			return err
		}
		set = append(set, pair{c, dst})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range set {
		d.bat[p.c] = uint32(p.dst * s.clu / d.unit)
	}
	return nil
}

// flip swaps the top and the newest delta: the delta, read again from
// disk, becomes the writable top.
func (s *stack) flip() error {
	if err := s.changeable(); err != nil {
		return err
	}
	s.io.Lock()
	defer s.io.Unlock()
	if len(s.deltas) < 2 {
		return mapper.Errorf(mapper.ErrNotFound, "flip_upper_deltas: no delta under the top")
	}
	if err := s.flush(); err != nil {
		return err
	}
	n := len(s.deltas)
	old, lower := s.deltas[n-1], s.deltas[n-2]
	d, err := openDelta(lower.b, s.cluSectors, true, 0)
	if err == nil {
		err = d.check(false)
	}
	if err != nil {
		return err
	}
	d.own = lower.own
	if err := d.setInUse(true); err != nil {
		return err
	}
	if err := old.setInUse(false); err != nil {
		return err
	}
	s.mu.Lock()
	old.writable = false
	s.deltas[n-2], s.deltas[n-1] = old, d
	s.dataEnd = d.dataEnd()
	s.resetFreeLocked()
	s.mu.Unlock()
	s.rekey()
	return nil
}

// trackingCmd runs tracking_start, tracking_stop and tracking_get_next.
// Tracking covers the physical clusters of the top image: at the start
// every used one is dirty, then every one written (data, BAT) becomes so.
func (s *stack) trackingCmd(sub string) (string, error) {
	if s.readOnly {
		return "", mapper.ErrReadOnly
	}
	switch sub {
	case "start":
		s.io.Lock()
		defer s.io.Unlock()
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.tracking != nil {
			return "", mapper.Errorf(mapper.ErrExists, "tracking is already running")
		}
		if s.pb != nil {
			return "", mapper.Errorf(mapper.ErrBusy, "push backup %s is running", s.pb.uuid)
		}
		if s.merging {
			return "", mapper.Errorf(mapper.ErrBusy, "a merge is running")
		}
		b := &bitmap{}
		top := s.top()
		for p := uint64(0); p < (uint64(top.h.dataOff)*mapper.SectorSize+s.clu-1)/s.clu; p++ {
			b.set(p)
		}
		last := uint64(0)
		for c := range top.bat {
			if off, ok := top.loc(uint64(c)); ok {
				b.set(off / s.clu)
				last = max(last, off/s.clu)
			}
		}
		s.tracking, s.trackCur = b, last
		return "", nil
	case "stop":
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.tracking == nil {
			return "", mapper.Errorf(mapper.ErrNotFound, "tracking is not running")
		}
		s.tracking = nil
		return "", nil
	default: // get_next
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.tracking == nil {
			return "", mapper.Errorf(mapper.ErrNotFound, "tracking is not running")
		}
		p, ok := s.tracking.next(s.trackCur + 1)
		if !ok {
			return "", fmt.Errorf("no dirty cluster: %w", ErrAgain)
		}
		s.tracking.clear(p)
		s.trackCur = p
		return strconv.FormatUint(p, 10), nil
	}
}

// resize grows the top image to sectors: clusters in the way of the larger
// BAT move to the end first, then the new BAT area is zeroed and the
// header, written last, switches to the new size.
func (s *stack) resize(sectors uint64) error {
	if err := s.changeable(); err != nil {
		return err
	}
	s.io.Lock()
	defer s.io.Unlock()
	top := s.top()
	if sectors < top.h.sectors {
		return fmt.Errorf("new size %d: smaller than %d sectors; ploop only grows", sectors, top.h.sectors)
	}
	if sectors == top.h.sectors {
		return nil
	}
	nh := newHeader(sectors, s.cluSectors)
	if nh.batEntries < top.h.batEntries || uint64(nh.batEntries) > batNone-1 {
		return fmt.Errorf("new size %d: bad number of clusters %d", sectors, nh.batEntries)
	}
	newFirst := uint64(max(nh.dataOff, top.h.dataOff)) * mapper.SectorSize
	if err := s.flush(); err != nil {
		return err
	}
	buf := make([]byte, s.clu)
	moved := false
	for c := range top.bat {
		off, ok := top.loc(uint64(c))
		if !ok || off >= newFirst {
			continue
		}
		if off < uint64(top.h.dataOff)*mapper.SectorSize {
			continue
		}
		if err := top.b.ReadAt([][]byte{buf}, int64(off)); err != nil {
			return err
		}
		if err := top.b.WriteAt([][]byte{buf}, int64(s.dataEnd)); err != nil {
			return err
		}
		s.mu.Lock()
		top.bat[c] = uint32(s.dataEnd / top.unit)
		s.dirty[uint64(c)] = struct{}{}
		s.dataEnd += s.clu
		s.mu.Unlock()
		moved = true
	}
	if moved {
		if err := s.flush(); err != nil {
			return err
		}
	}
	// Zero the new BAT area (it held only moved or unused clusters), then
	// write the header that makes it the BAT.
	oldEnd := headerSize + 4*uint64(top.h.batEntries)
	newEnd := uint64(nh.dataOff) * mapper.SectorSize
	if newEnd > oldEnd {
		if err := top.b.WriteAt([][]byte{make([]byte, newEnd-oldEnd)}, int64(oldEnd)); err != nil {
			return err
		}
		if err := top.b.Flush(); err != nil {
			return err
		}
	}
	s.mu.Lock()
	top.h.sectors, top.h.batEntries = nh.sectors, nh.batEntries
	top.h.cylinders = nh.cylinders
	top.h.dataOff = max(nh.dataOff, top.h.dataOff)
	top.bat = append(top.bat, make([]uint32, int(nh.batEntries)-len(top.bat))...)
	s.dataEnd = max(s.dataEnd, uint64(top.h.dataOff)*mapper.SectorSize)
	s.resetFreeLocked()
	s.mu.Unlock()
	if err := top.writeBATSectors([]uint64{0}); err != nil {
		return err
	}
	if err := top.b.Flush(); err != nil {
		return err
	}
	s.event("resized", map[string]any{"sectors": sectors})
	return nil
}

// pushBackup is a running push backup; guarded by stack.mu.
type pushBackup struct {
	uuid    string
	timeout time.Duration
	mask    *bitmap                  // virtual clusters not yet backed up
	held    map[uint64]chan struct{} // clusters writes wait for
	queue   []uint64                 // held clusters not yet reported
	alive   bool
}

// release lets the writes waiting for cluster c go on.
func (pb *pushBackup) release(c uint64) {
	if ch := pb.held[c]; ch != nil {
		close(ch)
		delete(pb.held, c)
	}
}

// abandon ends the backup's hold on writes; its messages fail with ErrStale.
func (pb *pushBackup) abandon() {
	pb.alive = false
	pb.mask = &bitmap{}
	for c := range pb.held {
		pb.release(c)
	}
	pb.queue = nil
}

// holdForBackup waits until no cluster of the range waits for the push
// backup, then returns with s.io held shared.
func (s *stack) holdForBackup(sector, sectors uint64) error {
	first, last := sector/s.cluSectors, (sector+sectors-1)/s.cluSectors
	for {
		s.io.RLock()
		s.mu.Lock()
		pb := s.pb
		if pb == nil || !pb.alive {
			s.mu.Unlock()
			return nil
		}
		var ch chan struct{}
		for c := first; c <= last && ch == nil; c++ {
			if c/64 < uint64(len(pb.mask.w)) && pb.mask.w[c/64]&(1<<(c%64)) != 0 {
				if ch = pb.held[c]; ch == nil {
					ch = make(chan struct{})
					pb.held[c] = ch
					pb.queue = append(pb.queue, c)
				}
			}
		}
		s.mu.Unlock()
		if ch == nil {
			return nil
		}
		s.io.RUnlock()
		timer := time.NewTimer(pb.timeout)
		select {
		case <-ch:
			timer.Stop()
		case <-timer.C:
			s.mu.Lock()
			if pb.alive {
				pb.abandon()
				s.event("push-backup-timeout", map[string]any{"uuid": pb.uuid})
			}
			s.mu.Unlock()
		}
	}
}

// pushBackupStart starts a full backup of the device as it is now.
func (s *stack) pushBackupStart(uuid string, timeout time.Duration) error {
	if len(uuid) != 32 || strings.Trim(strings.ToLower(uuid), "0123456789abcdef") != "" {
		return fmt.Errorf("uuid %q: want 32 hex digits", uuid)
	}
	s.io.Lock() // writes before the start are complete, later ones see the mask
	defer s.io.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pb != nil {
		return mapper.Errorf(mapper.ErrExists, "push backup %s is already running", s.pb.uuid)
	}
	if s.tracking != nil {
		return mapper.Errorf(mapper.ErrBusy, "tracking is running")
	}
	if s.merging {
		return mapper.Errorf(mapper.ErrBusy, "a merge is running")
	}
	pb := &pushBackup{uuid: uuid, timeout: timeout, mask: &bitmap{}, held: map[uint64]chan struct{}{}, alive: true}
	for c := range uint64(len(s.top().bat)) {
		pb.mask.set(c)
	}
	s.pb = pb
	return nil
}

// backup returns the running backup called uuid.
func (s *stack) backup(uuid string) (*pushBackup, error) {
	if s.pb == nil {
		return nil, mapper.Errorf(mapper.ErrNotFound, "no push backup is running")
	}
	if s.pb.uuid != uuid {
		return nil, fmt.Errorf("uuid %q: the running push backup is %s", uuid, s.pb.uuid)
	}
	return s.pb, nil
}

func (s *stack) pushBackupStop(uuid string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pb, err := s.backup(uuid)
	if err != nil {
		return "", err
	}
	pb.abandon()
	s.pb = nil
	return "0", nil
}

// stopBackup ends any backup, releasing its held writes.
func (s *stack) stopBackup() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pb != nil {
		s.pb.abandon()
		s.pb = nil
	}
}

// pushBackupRead replies the next run of clusters that writes wait for,
// "<cluster>:<count>", or "" if none waits.
func (s *stack) pushBackupRead(uuid string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pb, err := s.backup(uuid)
	if err != nil {
		return "", err
	}
	if !pb.alive {
		return "", ErrStale
	}
	queued := map[uint64]bool{}
	for _, c := range pb.queue {
		if pb.held[c] != nil {
			queued[c] = true
		}
	}
	for len(pb.queue) > 0 && !queued[pb.queue[0]] {
		pb.queue = pb.queue[1:]
	}
	if len(pb.queue) == 0 {
		return "", nil
	}
	left, right := pb.queue[0], pb.queue[0]
	for left > 0 && queued[left-1] {
		left--
	}
	for queued[right+1] {
		right++
	}
	rest := pb.queue[:0]
	for _, c := range pb.queue {
		if queued[c] && (c < left || c > right) {
			rest = append(rest, c)
		}
	}
	pb.queue = rest
	return fmt.Sprintf("%d:%d", left, right-left+1), nil
}

// pushBackupWrite records clusters as backed up and lets their writes go.
func (s *stack) pushBackupWrite(uuid, run string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	pb, err := s.backup(uuid)
	if err != nil {
		return err
	}
	cs, ns, ok := strings.Cut(run, ":")
	if !ok {
		return fmt.Errorf("clusters %q: want <cluster>:<count>", run)
	}
	n := uint64(len(s.top().bat))
	c, err := mapper.ParseUint("cluster", cs, 0, n-1)
	if err != nil {
		return err
	}
	cnt, err := mapper.ParseUint("count", ns, 1, n-c)
	if err != nil {
		return err
	}
	if !pb.alive {
		return ErrStale
	}
	for i := c; i < c+cnt; i++ {
		pb.mask.clear(i)
		pb.release(i)
	}
	return nil
}
