// Package ploop is the ploop target: a disk mapped through the Block
// Allocation Table of a stack of ploop1 images (Virtuozzo/Parallels
// "expanded" images, QEMU's parallels format), read-only snapshots under
// one writable top image, after Virtuozzo's dm-ploop.
//
//	ploop <cluster_log> <top delta image> [<delta image>...]
//
// cluster_log is log2 of the cluster size in sectors (11 for ploop's and
// QEMU's 1 MiB default), 3 to 14; every image must have that cluster
// size. The top image is written; the other deltas, listed oldest first,
// are only read. Unlike dm-ploop, which takes open file descriptors, the
// images are named by path (or any backend name a table may use). A top
// image whose first cluster is all zeros (an empty file) is formatted as a
// new version 2 image of the target's length, so `touch top.hds` is
// enough; `qemu-img create -f parallels` images are taken as they are.
// The top image's in-use flag is set while it is served read-write and
// cleared on a clean close; an image found in use was not closed cleanly
// and is repaired on load (entries beyond its end cleared, holes filled,
// the tail cut) so that qemu-img check and ploop check pass.
//
// A read of a cluster comes from the newest image that has it, else reads
// zeros. The first write to a cluster not in the top image appends a
// cluster to the top image, with the old data copied in from a lower image
// when the write is partial. The data is written before its BAT entry: new
// entries go to disk on the next flush, after the data is durable, and the
// flush is acknowledged only when they are durable too. Write-zeroes
// writes zeros to clusters some image has.
//
// Discard acts, as dm-ploop's, on whole clusters the top image has and
// ignores the rest. With the top image alone the cluster's BAT entry is
// cleared and the cluster is reused for new data once the cleared entry
// is durable (a flush); a reopened image reuses clusters no entry points
// to. Over lower images the entry stays (it hides their data) and the
// cluster is zeroed. dm-ploop punches a hole in the file instead, which
// ploop check refuses as a sparse image; so the file does not shrink.
// Discards are ignored while tracking or a push backup runs.
//
// INFO: "<deltas> v2 <cluster sectors> <flags> <allocated>/<clusters>",
// e.g. "3 v2 2048 t 12/1024": the number of images, the cluster size,
// dm-ploop's flags (t tracking, n noresume, b push backup running, o none;
// and m, a vhostdm addition, a merge running or paused by a suspend)
// and, a vhostdm addition, the clusters allocated in the top image out of
// its BAT entries. TABLE: "11 /var/lib/vm/top.hds /var/lib/vm/base.hds",
// the current stack, which messages change.
//
// Messages (dm-ploop's, with paths for descriptors):
//
//	add_delta <path>                 put an image under the top, above the other deltas
//	snapshot <path>                  make <path> (empty, or an image with no clusters) the new top; the old top becomes read-only
//	merge                            start copying the newest delta's clusters the top lacks into the top, then drop that delta
//	notify_merged_forward <level>    delta <level> was copied into <level>+1: reread that, drop <level>
//	notify_merged_backward <level>   delta <level> was copied into <level>-1: reread that, drop <level>
//	update_delta_index <level> <map> set BAT entries of delta <level>; map is "clu:dst;clu:dst;"
//	get_delta_name <level>           reply the name of delta <level> (0 the oldest)
//	flip_upper_deltas                swap the top and the newest delta (the lower becomes writable)
//	tracking_start|tracking_stop     track the top image's clusters written (all used ones start dirty)
//	tracking_get_next                reply a dirty cluster of the top image, or fail with EAGAIN
//	set_noresume 0|1                 refuse (1) or allow resume
//	resize <sectors>                 grow the top image; reload the table with the new length to use it
//	push_backup_start <uuid> 0 [<timeout s>]  start a full push backup (uuid: 32 hex digits)
//	push_backup_read <uuid>          reply "<cluster>:<count>" of clusters guest writes wait for, or ""
//	push_backup_write <uuid> <cluster>:<count>  those clusters are backed up; their writes go on
//	push_backup_get_uuid             reply the running backup's uuid, or ""
//	push_backup_stop <uuid>          end the backup, releasing waiting writes
//
// A push backup delays guest writes to clusters not yet backed up, so that
// the backup reads the device as it was at push_backup_start. Unlike the
// kernel, push_backup_read does not block: it replies "" when no write
// waits (messages hold the device's control lock). A write waits at most
// the timeout (60 s by default); then the backup is abandoned and its
// messages fail with ESTALE. A suspend waits for writes held by a backup
// too. Messages that change the stack wait for I/O
// in flight and are refused while tracking, a backup or a merge runs.
//
// A merge runs in the background while the guest's I/O goes on, as
// dm-ploop's does: each cluster is copied the way a guest write allocates
// it, and a guest write to a cluster being copied waits for that cluster
// only. Unlike dm-ploop, whose message returns when the merge is done, the
// message returns at once; the event "merged" (data: delta) ends the merge
// and "merge-failed" (delta, error) reports a failure that leaves the
// stack as it was. A suspend pauses the merge; resume continues it.
package ploop

import (
	"errors"
	"fmt"
	"math/bits"
	"strings"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "ploop", Version: [3]int{1, 0, 0}, New: newPloop})
}

// Limits of the table.
const (
	minClusterLog = 3  // 4 KiB clusters
	maxClusterLog = 14 // 8 MiB clusters
	maxDeltas     = 255
)

// stackRegistry holds the stack of every top image one Manager's tables
// serve, by the top's identity, so that a table loaded over a live one (a
// reload) shares its state: the in-memory BAT is ahead of the disk until a
// flush. There is one per Manager, reached through Ctx.Shared.
type stackRegistry struct {
	mu sync.Mutex
	m  map[any]*stack
}

// stacksKey is the Ctx.Shared key of a Manager's stackRegistry.
type stacksKey struct{}

func newStackRegistry() any { return &stackRegistry{m: map[any]*stack{}} }

// stack is the state of one stack of images.
type stack struct {
	// Immutable.
	cluSectors uint64
	clu        uint64 // bytes
	readOnly   bool
	open       func(name string) (mapper.Backend, error) // for messages
	event      mapper.EventRaiser

	stacks *stackRegistry // the registry s is in
	key    any            // guarded by stacks.mu
	refs   int            // guarded by stacks.mu

	// io is held shared by I/O and exclusively by messages that change
	// the stack, so that they see no I/O in flight.
	io sync.RWMutex

	// flushMu serialises flushes: one writes the BAT at a time.
	flushMu sync.Mutex

	// Guarded by mu.
	mu       sync.Mutex
	deltas   []*delta                 // oldest first; the last is the top
	pending  map[uint64]chan struct{} // virtual clusters being allocated
	dataEnd  uint64                   // byte offset of the next cluster of the top
	free     bitmap                   // clusters of the top below dataEnd no BAT entry uses
	nfree    int                      // bits set in free
	freeing  []uint64                 // clusters discarded, reusable once their cleared entries are durable
	dirty    map[uint64]struct{}      // BAT entries of the top not yet on disk
	tracking *bitmap                  // physical clusters of the top written
	trackCur uint64
	noresume bool
	pb       *pushBackup
	merging  bool // a merge is wanted: running, or paused by a suspend
	// The merge goroutine's stop and done channels while it runs.
	mergeStop, mergeDone chan struct{}
	suspended            bool // between Presuspend and Resume
}

// target is one table line over a stack.
type target struct {
	s      *stack
	length uint64           // sectors
	backs  []mapper.Backend // as this table opened them, oldest first
	clog   uint64
	once   sync.Once
}

func newPloop(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) < 2 {
		return nil, fmt.Errorf("want <cluster_log> <top delta image> [<delta image>...], got %d arguments", len(args))
	}
	if len(args)-1 > maxDeltas {
		return nil, fmt.Errorf("%d images: at most %d", len(args)-1, maxDeltas)
	}
	clog, err := mapper.ParseUint("cluster_log", args[0], minClusterLog, maxClusterLog)
	if err != nil {
		return nil, err
	}
	cluSectors := uint64(1) << clog
	names := append(append([]string(nil), args[2:]...), args[1])
	for i, n := range names {
		if n == "" {
			return nil, fmt.Errorf("delta image %d: empty name", i)
		}
		for _, m := range names[:i] {
			if m == n {
				return nil, fmt.Errorf("delta image %q listed twice", n)
			}
		}
	}
	backs := make([]mapper.Backend, len(names))
	for i, n := range names {
		open := c.OpenReadOnly // lower deltas are only read
		if i == len(names)-1 {
			open = c.Open
		}
		if backs[i], err = open(n); err != nil {
			return nil, err
		}
	}
	t := &target{length: c.Length, backs: backs, clog: clog}
	top := backs[len(backs)-1]
	key := mapper.Identity(top)
	stacks := c.Shared(stacksKey{}, newStackRegistry).(*stackRegistry)

	stacks.mu.Lock()
	defer stacks.mu.Unlock()
	if s := stacks.m[key]; s != nil {
		if err := s.matches(backs, cluSectors, c.ReadOnly); err != nil {
			return nil, err
		}
		if size := s.size(); c.Length > size {
			return nil, fmt.Errorf("target length %d: more than the image size %d sectors", c.Length, size)
		}
		s.refs++
		t.s = s
		return t, nil
	}
	s := &stack{stacks: stacks, cluSectors: cluSectors, clu: cluSectors * mapper.SectorSize, readOnly: c.ReadOnly,
		event: c.Event(), pending: map[uint64]chan struct{}{}, dirty: map[uint64]struct{}{}}
	s.open = func(name string) (mapper.Backend, error) { return c.Open(name) }
	for i, b := range backs {
		writable := i == len(backs)-1 && !c.ReadOnly
		fmtSectors := uint64(0)
		if writable {
			fmtSectors = c.Length
		}
		d, err := openDelta(b, cluSectors, writable, fmtSectors)
		if err != nil {
			return nil, err
		}
		if writable && d.h.inUse == inUseMagic {
			c.Logger().Warn("ploop image was not closed cleanly, repairing", "image", b.Name())
			if err := d.repair(); err != nil {
				return nil, fmt.Errorf("repair %s: %w", b.Name(), err)
			}
		} else if err := d.check(false); err != nil {
			return nil, err
		}
		s.deltas = append(s.deltas, d)
	}
	if size := s.size(); c.Length > size {
		return nil, fmt.Errorf("target length %d: more than the image size %d sectors", c.Length, size)
	}
	if topD := s.top(); topD.writable {
		s.dataEnd = topD.dataEnd()
		s.resetFreeLocked()
		if err := topD.densify(); err != nil {
			return nil, err
		}
		if err := topD.setInUse(true); err != nil {
			return nil, err
		}
	}
	s.key, s.refs = key, 1
	stacks.m[key] = s
	t.s = s
	return t, nil
}

// matches checks that a table names the images of the live stack s.
func (s *stack) matches(backs []mapper.Backend, cluSectors uint64, readOnly bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cluSectors != s.cluSectors {
		return fmt.Errorf("cluster_log: image %s is served with clusters of %d sectors", backs[len(backs)-1].Name(), s.cluSectors)
	}
	if readOnly != s.readOnly {
		return mapper.Errorf(mapper.ErrBusy, "image %s is served with another access mode", backs[len(backs)-1].Name())
	}
	same := len(backs) == len(s.deltas)
	for i := 0; same && i < len(backs); i++ {
		same = mapper.Identity(backs[i]) == mapper.Identity(s.deltas[i].b)
	}
	if !same {
		return mapper.Errorf(mapper.ErrBusy, "image %s is served with the delta stack %s", backs[len(backs)-1].Name(), s.tableLocked())
	}
	return nil
}

func (s *stack) top() *delta { return s.deltas[len(s.deltas)-1] }

// size returns the virtual size in sectors: the top image's.
func (s *stack) size() uint64 { return s.top().h.sectors }

// Discards implements mapper.Discarder.
func (*target) Discards() bool { return true }

// WritesZeroes implements mapper.Discarder.
func (*target) WritesZeroes() bool { return true }

// Map serves reads and writes cluster by cluster.
func (t *target) Map(r *mapper.Request) error {
	s := t.s
	switch r.Op {
	case mapper.OpFlush:
		return s.flush()
	case mapper.OpDiscard:
		return s.discard(r.Sector, r.Sectors)
	case mapper.OpRead, mapper.OpWrite, mapper.OpWriteZeroes:
	default:
		return mapper.Errorf(mapper.ErrUnsupported, "%s: not supported", r.Op)
	}
	if r.Op != mapper.OpRead {
		if err := s.holdForBackup(r.Sector, r.Sectors); err != nil {
			return err
		}
	} else {
		s.io.RLock()
	}
	defer s.io.RUnlock()
	off := 0
	var parts [][]byte
	for sec, left := r.Sector, r.Sectors; left > 0; {
		c := sec / s.cluSectors
		in := sec % s.cluSectors
		n := min(left, s.cluSectors-in)
		nb := int(n * mapper.SectorSize)
		if r.Data != nil {
			parts = mapper.SliceBufs(parts[:0], r.Data, off, nb)
		}
		var err error
		switch r.Op {
		case mapper.OpRead:
			err = s.read(c, in*mapper.SectorSize, parts)
		case mapper.OpWrite:
			err = s.write(c, in*mapper.SectorSize, parts, nb)
		case mapper.OpWriteZeroes:
			err = s.writeZeroes(c, in*mapper.SectorSize, nb)
		}
		if err != nil {
			return err
		}
		sec += n
		left -= n
		off += nb
	}
	if r.FUA && r.Op != mapper.OpRead {
		return s.flush()
	}
	return nil
}

// find returns the image holding virtual cluster c and its offset there.
// s.mu must be held.
func (s *stack) find(c uint64) (*delta, uint64, bool) {
	for i := len(s.deltas) - 1; i >= 0; i-- {
		if off, ok := s.deltas[i].loc(c); ok {
			return s.deltas[i], off, true
		}
	}
	return nil, 0, false
}

// read reads len(bufs) bytes of virtual cluster c from byte in.
func (s *stack) read(c, in uint64, bufs [][]byte) error {
	s.mu.Lock()
	d, off, ok := s.find(c)
	s.mu.Unlock()
	if !ok {
		mapper.ZeroBufs(bufs)
		return nil
	}
	return d.b.ReadAt(bufs, int64(off+in))
}

// write writes n bytes of bufs (nil: zeros) into virtual cluster c from
// byte in, allocating the cluster in the top image first if needed.
func (s *stack) write(c, in uint64, bufs [][]byte, n int) error {
	if s.readOnly {
		return mapper.ErrReadOnly
	}
	top := s.top()
	s.mu.Lock()
	for s.pending[c] != nil {
		ch := s.pending[c]
		s.mu.Unlock()
		<-ch
		s.mu.Lock()
	}
	if off, ok := top.loc(c); ok {
		s.track(off / s.clu)
		s.mu.Unlock()
		if bufs == nil { // real zeros: ploop check refuses unwritten extents
			bufs = [][]byte{make([]byte, n)}
		}
		return top.b.WriteAt(bufs, int64(off+in))
	}
	if c >= uint64(len(top.bat)) {
		s.mu.Unlock()
		return mapper.Errorf(mapper.ErrIO, "cluster %d: beyond the image's %d clusters", c, len(top.bat))
	}
	ch := make(chan struct{})
	s.pending[c] = ch
	dst := s.allocLocked()
	src, srcOff, hasOld := s.find(c)
	s.mu.Unlock()

	err := s.fill(dst, c, in, bufs, n, src, srcOff, hasOld)

	s.mu.Lock()
	delete(s.pending, c)
	close(ch)
	if err == nil {
		top.bat[c] = uint32(dst / top.unit)
		s.dirty[c] = struct{}{}
		s.track(dst / s.clu)
	} else {
		s.releaseLocked(dst)
	}
	s.mu.Unlock()
	return err
}

// allocLocked returns the byte offset of a cluster of the top image for
// new data: the lowest free one, else one at the end. s.mu must be held.
func (s *stack) allocLocked() uint64 {
	if s.nfree > 0 {
		if p, ok := s.free.next(0); ok {
			s.free.clear(p)
			s.nfree--
			return p * s.clu
		}
	}
	dst := s.dataEnd
	s.dataEnd += s.clu
	return dst
}

// releaseLocked gives back a cluster allocLocked returned that no BAT
// entry points to. s.mu must be held.
func (s *stack) releaseLocked(off uint64) {
	if off+s.clu == s.dataEnd {
		s.dataEnd = off
		return
	}
	s.free.set(off / s.clu)
	s.nfree++
}

// resetFreeLocked finds the free clusters of the top image: those between
// its header area and dataEnd that no BAT entry uses (holes qemu-img left,
// clusters discarded before a clean close). An image whose entries are
// not cluster-aligned (version 1) gets none. Nothing may be in s.freeing
// (a flush moved it), and s.mu must be held.
func (s *stack) resetFreeLocked() {
	s.free, s.nfree, s.freeing = bitmap{}, 0, nil
	top := s.top()
	if !top.writable {
		return
	}
	used := &bitmap{}
	for c := range top.bat {
		off, ok := top.loc(uint64(c))
		if !ok {
			continue
		}
		if off%s.clu != 0 {
			return
		}
		used.set(off / s.clu)
	}
	first := (uint64(top.h.dataOff)*mapper.SectorSize + s.clu - 1) / s.clu
	for p := first; p < s.dataEnd/s.clu; p++ {
		if !used.has(p) {
			s.free.set(p)
			s.nfree++
		}
	}
}

// fill writes the whole new cluster at byte dst of the top image: the
// request's data, around it the old data of the cluster or zeros.
func (s *stack) fill(dst, c, in uint64, bufs [][]byte, n int, src *delta, srcOff uint64, hasOld bool) error {
	top := s.top()
	if in == 0 && uint64(n) == s.clu && bufs != nil {
		return top.b.WriteAt(bufs, int64(dst))
	}
	buf := make([]byte, s.clu)
	if hasOld {
		if err := src.b.ReadAt([][]byte{buf}, int64(srcOff)); err != nil {
			return err
		}
	}
	if bufs == nil {
		clear(buf[in : in+uint64(n)])
	} else {
		at := in
		for _, b := range bufs {
			at += uint64(copy(buf[at:], b))
		}
	}
	return top.b.WriteAt([][]byte{buf}, int64(dst))
}

// writeZeroes zeroes n bytes of virtual cluster c from byte in; a cluster
// no image has reads zeros already.
func (s *stack) writeZeroes(c, in uint64, n int) error {
	s.mu.Lock()
	_, _, ok := s.find(c)
	s.mu.Unlock()
	if !ok {
		return nil
	}
	return s.write(c, in, nil, n)
}

// discard serves a discard as dm-ploop does: it acts on whole clusters
// the top image has and ignores the rest (parts of clusters, clusters only
// lower images have). With the top image alone, the cluster's BAT entry
// is cleared (the range reads zeros) and, once that is durable, the
// cluster is reused for new data; with lower images the entry must stay
// (it hides the older data), so the cluster is zeroed. dm-ploop punches a
// hole instead, which ploop check refuses as a sparse image. While
// tracking or a push backup runs, whose copies follow the top image's
// clusters, discards are ignored.
func (s *stack) discard(sector, sectors uint64) error {
	if s.readOnly {
		return mapper.ErrReadOnly
	}
	first := (sector + s.cluSectors - 1) / s.cluSectors
	end := (sector + sectors) / s.cluSectors
	for c := first; c < end; c++ {
		if err := s.discardCluster(c); err != nil {
			return err
		}
	}
	return nil
}

func (s *stack) discardCluster(c uint64) error {
	s.mu.Lock()
	busy := s.tracking != nil || s.pb != nil
	_, has := s.top().loc(c)
	s.mu.Unlock()
	if busy || !has {
		return nil
	}
	// No I/O may be in flight to the cluster when its entry is cleared:
	// a late write would land in the cluster after its reuse.
	s.io.Lock()
	s.mu.Lock()
	top := s.top()
	off, has := top.loc(c)
	if !has || s.tracking != nil || s.pb != nil {
		s.mu.Unlock()
		s.io.Unlock()
		return nil
	}
	if len(s.deltas) == 1 && off%s.clu == 0 {
		top.bat[c] = 0
		s.dirty[c] = struct{}{}
		s.freeing = append(s.freeing, off)
		s.mu.Unlock()
		s.io.Unlock()
		return nil
	}
	s.mu.Unlock()
	s.io.Unlock()
	s.io.RLock()
	defer s.io.RUnlock()
	return s.write(c, 0, nil, int(s.clu))
}

// flush makes every completed write durable: the data first, then the
// BAT entries that point at new data, then those.
func (s *stack) flush() error {
	if s.readOnly {
		return nil
	}
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	s.mu.Lock()
	top := s.top()
	var entries []uint64
	for c := range s.dirty {
		entries = append(entries, c)
	}
	clear(s.dirty)
	freed := s.freeing
	s.freeing = nil
	s.mu.Unlock()
	if err := top.b.Flush(); err != nil {
		s.redirty(entries, freed)
		return err
	}
	if len(entries) == 0 {
		return nil
	}
	secs := make([]uint64, len(entries))
	for i, c := range entries {
		secs[i] = entrySector(c)
	}
	s.mu.Lock()
	for _, sec := range secs {
		s.track(sec * mapper.SectorSize / s.clu)
	}
	s.mu.Unlock()
	err := top.writeBATSectors(secs)
	if err == nil {
		err = top.b.Flush()
	}
	if err != nil {
		s.redirty(entries, freed)
		return err
	}
	// The entries that pointed at discarded clusters are durably clear:
	// the clusters can hold new data.
	s.mu.Lock()
	if s.top() == top {
		for _, off := range freed {
			s.releaseLocked(off)
		}
	}
	s.mu.Unlock()
	return nil
}

// redirty puts back what a failed flush took: the BAT entries still to
// write and the discarded clusters waiting for them.
func (s *stack) redirty(entries, freed []uint64) {
	s.mu.Lock()
	for _, c := range entries {
		s.dirty[c] = struct{}{}
	}
	s.freeing = append(s.freeing, freed...)
	s.mu.Unlock()
}

// Flush implements mapper.Flusher.
func (t *target) Flush() error { return t.s.flush() }

// Status returns the INFO or TABLE line.
func (t *target) Status(kind mapper.StatusKind) string {
	s := t.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if kind == mapper.StatusTable {
		return s.tableLocked()
	}
	flags := ""
	if s.tracking != nil {
		flags += "t"
	}
	if s.noresume {
		flags += "n"
	}
	if s.pb != nil {
		flags += "b"
	}
	if s.merging {
		flags += "m"
	}
	if flags == "" {
		flags = "o"
	}
	top := s.top()
	used := 0
	for _, e := range top.bat {
		if e != 0 {
			used++
		}
	}
	return fmt.Sprintf("%d v2 %d %s %d/%d", len(s.deltas), s.cluSectors, flags, used, len(top.bat))
}

// tableLocked returns the TABLE form of the stack; s.mu must be held.
func (s *stack) tableLocked() string {
	clog := 0
	for uint64(1)<<clog < s.cluSectors {
		clog++
	}
	w := []string{fmt.Sprint(clog), s.top().name()}
	for _, d := range s.deltas[:len(s.deltas)-1] {
		w = append(w, d.name())
	}
	return strings.Join(w, " ")
}

// Presuspend implements mapper.Suspender: it pauses a running merge; the
// device flushes after it.
func (t *target) Presuspend(noflush bool) error {
	s := t.s
	s.mu.Lock()
	s.suspended = true
	s.mu.Unlock()
	s.stopMerge(false)
	return nil
}

// Resume implements mapper.Suspender: it refuses while set_noresume is on,
// and makes this table's backends the ones the stack uses.
func (t *target) Resume() error {
	s := t.s
	s.io.Lock()
	defer s.io.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.noresume {
		return mapper.Errorf(mapper.ErrBusy, "resume refused: set_noresume is on")
	}
	s.suspended = false
	defer s.startMergeLocked()
	if len(t.backs) == len(s.deltas) {
		for i, b := range t.backs {
			if mapper.Identity(b) == mapper.Identity(s.deltas[i].b) && !s.deltas[i].own {
				s.deltas[i].b = b
			}
		}
	}
	return nil
}

// Close releases the table's use of the stack; the last one flushes and
// clears the in-use flag.
func (t *target) Close() error {
	var err error
	t.once.Do(func() {
		s := t.s
		s.stacks.mu.Lock()
		s.refs--
		last := s.refs == 0
		if last && s.stacks.m[s.key] == s {
			delete(s.stacks.m, s.key)
		}
		s.stacks.mu.Unlock()
		if !last {
			return
		}
		s.stopBackup()
		s.stopMerge(true)
		var errs []error
		if !s.readOnly {
			errs = append(errs, s.flush())
			if errs[0] == nil {
				errs = append(errs, s.top().setInUse(false))
			}
		}
		for _, d := range s.deltas {
			if d.own {
				errs = append(errs, d.b.Close())
			}
		}
		err = errors.Join(errs...)
	})
	return err
}

// rekey registers s under its current top's identity after a message
// changed the top. s.mu must not be held.
func (s *stack) rekey() {
	s.mu.Lock()
	key := mapper.Identity(s.top().b)
	s.mu.Unlock()
	s.stacks.mu.Lock()
	defer s.stacks.mu.Unlock()
	if s.stacks.m[s.key] == s {
		delete(s.stacks.m, s.key)
	}
	s.key = key
	s.stacks.m[key] = s
}

// track marks physical cluster p of the top image written; s.mu held.
func (s *stack) track(p uint64) {
	if s.tracking != nil {
		s.tracking.set(p)
	}
}

// bitmap is a growable set of cluster numbers.
type bitmap struct{ w []uint64 }

func (b *bitmap) set(i uint64) {
	for uint64(len(b.w)) <= i/64 {
		b.w = append(b.w, 0)
	}
	b.w[i/64] |= 1 << (i % 64)
}

func (b *bitmap) has(i uint64) bool {
	return i/64 < uint64(len(b.w)) && b.w[i/64]&(1<<(i%64)) != 0
}

func (b *bitmap) clear(i uint64) {
	if i/64 < uint64(len(b.w)) {
		b.w[i/64] &^= 1 << (i % 64)
	}
}

// next returns the first set bit at or after i, wrapping around.
func (b *bitmap) next(i uint64) (uint64, bool) {
	n := uint64(len(b.w)) * 64
	if n == 0 {
		return 0, false
	}
	i %= n
	for k := uint64(0); k <= n; {
		j := (i + k) % n
		w := b.w[j/64] >> (j % 64)
		if w != 0 {
			return j + uint64(bits.TrailingZeros64(w)), true
		}
		k += 64 - j%64
	}
	return 0, false
}

// Allocation reports clusters allocated in no delta of the stack as holes
// that read as zeros; a run extends over clusters of the same state.
func (t *target) Allocation(sector, sectors uint64) (uint64, mapper.AllocState, error) {
	s := t.s
	cs := s.cluSectors
	s.mu.Lock()
	defer s.mu.Unlock()
	state := func(c uint64) mapper.AllocState {
		if _, _, ok := s.find(c); ok {
			return 0
		}
		return mapper.AllocHole | mapper.AllocZero
	}
	first := state(sector / cs)
	n := min(sectors, cs-sector%cs)
	for k := 0; n < sectors && k < 1024 && state((sector+n)/cs) == first; k++ {
		n = min(sectors, n+cs)
	}
	return n, first, nil
}
