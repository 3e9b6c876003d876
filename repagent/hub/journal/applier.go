package journal

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// stateFile is the applied state, replaced atomically.
const (
	stateFile    = "state.json"
	stateVersion = 1
	maxExpired   = 256
	imageSuffix  = ".img"
	maxRun       = 1 << 20 // largest merged write
	// maxPassBytes bounds one apply pass (unless a resync set is larger), so
	// that Materialize does not wait long for the base images.
	maxPassBytes = 256 << 20
)

// state is the applier's durable state. Base: the base images hold exactly
// the records before Base.Pos. Target > Base: an apply pass toward Target was
// started (the images may hold part of it); it is redone at open, and no
// point before Target is recoverable.
type state struct {
	Version int      `json:"version"`
	Base    Point    `json:"base"`
	Target  Point    `json:"target"`
	Volumes []Volume `json:"volumes"`
	// Checkpoints at Base.Pos exactly (their records are applied).
	Checkpoints []Checkpoint `json:"checkpoints,omitempty"`
	// Expired: names of recent checkpoints that left the window.
	Expired []string `json:"expired,omitempty"`
}

func loadState(store Store) (state, error) {
	path := store.StateName()
	b, err := store.GetState()
	if err != nil {
		return state{}, err
	}
	if b == nil {
		return state{Version: stateVersion}, nil
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return state{}, fmt.Errorf("%w: %s: %w", ErrCorrupt, path, err)
	}
	if st.Version != stateVersion {
		return state{}, fmt.Errorf("%w: %s: version %d, want %d", ErrCorrupt, path, st.Version, stateVersion)
	}
	if st.Base.Pos < 0 || st.Target.Pos < st.Base.Pos {
		return state{}, fmt.Errorf("%w: %s: base %d, target %d", ErrCorrupt, path, st.Base.Pos, st.Target.Pos)
	}
	for _, v := range st.Volumes {
		if !ValidName(v.Name) || v.Size <= 0 || v.Size > MaxVolumeSize {
			return state{}, fmt.Errorf("%w: %s: bad volume %q size %d", ErrCorrupt, path, v.Name, v.Size)
		}
	}
	return st, nil
}

// saveState replaces the state durably (Store.PutState).
func (a *applier) saveState(st state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := a.j.inject("state-write", a.j.store.StateName()); err != nil {
		return err
	}
	return a.j.store.PutState(append(b, '\n'))
}

// applier advances the base images from the journal.
type applier struct {
	j *Journal

	mu           sync.Mutex // guards the fields below
	st           state
	err          error // sticky
	pins         map[int]int64
	holds        map[int]int64 // HoldApply: apply nothing ending past these
	nextPin      int
	appliedBytes int64
	applyWrites  int64
	passBytes    int64 // immutable: maxPassBytes or Options.passBytes
	passes       uint64

	// run is held for writing by an apply pass and for reading while the
	// base images are copied.
	run sync.RWMutex
	// owned by the holder of run for writing
	cursor struct {
		pos   int64
		depth int
		seq   uint64
		last  Point
		// waitPos, waitTime: the record at waitPos (the cursor), of
		// waitTime, was too young to apply at the last pass: until
		// the cutoff passes it (or MaxBytes forces it), passes need
		// not read the journal (waitPos -1: no such record).
		waitPos  int64
		waitTime time.Time
	}
	imgs *imageSet
}

func (a *applier) init(j *Journal, st state) {
	a.j = j
	a.st = st
	a.pins = map[int]int64{}
	a.passBytes = maxPassBytes
	if j.opts.passBytes > 0 {
		a.passBytes = j.opts.passBytes
	}
	a.cursor.pos = st.Target.Pos
	a.cursor.seq = st.Target.Seq
	a.cursor.last = st.Target
	a.cursor.waitPos = -1
	vols := map[string]int64{}
	for _, v := range st.Volumes {
		vols[v.Name] = v.Size
	}
	a.imgs = &imageSet{open: j.store.OpenImage, syncDir: j.store.SyncImages, inject: j.inject, sizes: vols}
}

func (a *applier) closeImages() {
	if a.imgs != nil {
		a.imgs.close()
	}
}

// ApplyErr returns the applier's sticky store error, or nil. Once set the
// applied position never advances again in this process, and Materialize
// refuses when the base images may be mid-pass.
func (j *Journal) ApplyErr() error {
	a := &j.applier
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.err
}

func (a *applier) fail(err error) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.err == nil {
		if !errors.Is(err, ErrStore) {
			err = fmt.Errorf("%w: apply: %w", ErrStore, err)
		}
		a.err = err
		a.j.log.Error("journal: applier failed; applied position frozen", "err", err)
	}
	return a.err
}

func (a *applier) pin(pos int64) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.nextPin++
	a.pins[a.nextPin] = pos
	return a.nextPin
}

func (a *applier) unpin(id int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.pins, id)
}

func (j *Journal) applyLoop() {
	defer j.applyWG.Done()
	t := time.NewTicker(j.opts.ApplyInterval)
	defer t.Stop()
	for {
		select {
		case <-j.stop:
			return
		case now := <-t.C:
			j.trimSpares(now)
		}
		for {
			more, err := j.applier.once()
			if err != nil || !more {
				break
			}
			select {
			case <-j.stop:
				return
			default:
			}
		}
	}
}

// ApplyNow applies now, in passes of at most 256 MiB (a larger resync set
// is one pass), the records that left the retention window (or exceed
// MaxBytes), up to the newest consistent point among them, and deletes the
// segments wholly behind the applied position. It returns the applier's
// sticky error, if any.
func (j *Journal) ApplyNow() error {
	j.mu.Lock()
	closed := j.closed
	j.mu.Unlock()
	if closed {
		return ErrClosed
	}
	for {
		more, err := j.applier.once()
		if err != nil || !more {
			return err
		}
	}
}

// once runs one apply pass; more reports that it stopped at the pass size
// limit with more to apply.
func (a *applier) once() (more bool, err error) {
	a.run.Lock()
	defer a.run.Unlock()
	if a.imgs.closed {
		return false, ErrClosed
	}
	a.mu.Lock()
	err, base, hold := a.err, a.st.Base, a.holdLimit()
	a.mu.Unlock()
	if err != nil {
		return false, err
	}
	j := a.j
	cutoff := time.Now().Add(-j.opts.Retain)
	j.mu.Lock()
	durable := j.durable
	j.mu.Unlock()
	need := int64(-1)
	if j.opts.MaxBytes > 0 {
		need = durable - j.opts.MaxBytes
	}
	c := &a.cursor
	idle := c.waitPos == c.pos && c.waitTime.After(cutoff) && c.pos >= need
	if c.pos < durable && !idle {
		r, err := newReader(j.segments(), c.pos, durable, &j.readers)
		if err != nil {
			return false, a.fail(err)
		}
		r.headersOnly = true // the pass reads and checks them
		for {
			rec, _, end, err := r.next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				r.close()
				return false, a.fail(err)
			}
			if rec.Time.After(cutoff) && c.pos >= need || hold >= 0 && end > hold {
				c.waitPos, c.waitTime = c.pos, rec.Time
				break
			}
			if c.last.Pos > base.Pos && c.pos-base.Pos >= a.passBytes {
				more = true
				break
			}
			switch rec.Kind {
			case KindResyncBegin:
				c.depth = 1
			case KindResyncEnd:
				c.depth = 0
			}
			if rec.HasSeq {
				c.seq = rec.Seq
			}
			c.pos = end
			if c.depth == 0 {
				c.last = Point{Pos: end, Seq: c.seq, Time: rec.Time}
			}
		}
		r.close()
	}
	if c.last.Pos <= base.Pos {
		return false, nil
	}
	if err := a.pass(c.last); err != nil {
		return false, a.fail(err)
	}
	return more, nil
}

// pass moves the base images from the applied position to target, a
// consistent point: record the intent, apply, fsync the images, record the
// new applied position, delete segments behind it.
func (a *applier) pass(target Point) error {
	j := a.j
	a.mu.Lock()
	st := a.st
	a.mu.Unlock()
	if st.Target != target {
		st.Target = target
		if err := a.saveState(st); err != nil {
			return fmt.Errorf("%w: save state: %w", ErrStore, err)
		}
		a.mu.Lock()
		a.st.Target = target
		a.mu.Unlock()
	}
	r, err := newReader(j.segments(), st.Base.Pos, target.Pos, &j.readers)
	if err != nil {
		return err
	}
	imgs := a.imgs
	before, beforeW := imgs.bytes, imgs.writes
	for {
		rec, _, _, err := r.next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			r.close()
			return err
		}
		if err := imgs.apply(&rec); err != nil {
			r.close()
			return err
		}
	}
	r.close()
	if err := imgs.sync(); err != nil {
		return err
	}

	// Checkpoints before the new base leave the window.
	var atBase []Checkpoint
	j.mu.Lock()
	expired := j.expired
	for n, p := range j.checkpoints {
		switch {
		case p.Pos < target.Pos:
			delete(j.checkpoints, n)
			delete(j.pCPNames, n)
			expired = append(expired, n)
		case p.Pos == target.Pos:
			atBase = append(atBase, Checkpoint{Name: n, Point: p})
		}
	}
	if len(expired) > maxExpired {
		expired = expired[len(expired)-maxExpired:]
	}
	j.expired = expired
	j.mu.Unlock()
	sortCheckpoints(atBase)

	nst := state{Version: stateVersion, Base: target, Target: target, Volumes: sortedVolumes(imgs.sizes),
		Checkpoints: atBase, Expired: append([]string(nil), expired...)}
	if err := a.saveState(nst); err != nil {
		return fmt.Errorf("%w: save state: %w", ErrStore, err)
	}
	a.mu.Lock()
	a.st = nst
	a.passes++
	a.appliedBytes += imgs.bytes - before
	a.applyWrites += imgs.writes - beforeW
	keep := target.Pos
	for _, p := range a.pins {
		keep = min(keep, p)
	}
	a.mu.Unlock()
	return j.dropSegments(keep)
}

// segments returns a snapshot of the segment list.
func (j *Journal) segments() []segment {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	return append([]segment(nil), j.segs...)
}

// dropSegments deletes the segments wholly before pos (never the last).
func (j *Journal) dropSegments(pos int64) error {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	n := 0
	for len(j.segs) > 1 && j.segs[1].start <= pos {
		if err := j.store.RemoveSegment(j.segs[0].start); err != nil {
			return fmt.Errorf("remove segment: %w", err)
		}
		j.segs = j.segs[1:]
		n++
	}
	if n > 0 {
		return j.store.SyncSegments()
	}
	return nil
}

// imageSet applies records to one image per volume, merging adjacent
// writes: the base images of a Store, or the images Materialize writes.
type imageSet struct {
	// open opens a volume's image (creating it when create is set).
	open func(vol string, create bool) (Image, error)
	// syncDir makes the images' creation durable.
	syncDir func() error
	inject  func(op, path string) error
	sizes   map[string]int64
	files   map[string]Image
	created bool
	closed  bool
	writes  int64 // write calls made (after merging)
	bytes   int64
	run     struct {
		vol string
		off int64
		buf []byte
	}
}

func (s *imageSet) file(vol string) (Image, error) {
	if f := s.files[vol]; f != nil {
		return f, nil
	}
	if s.files == nil {
		s.files = map[string]Image{}
	}
	f, err := s.open(vol, false)
	if err != nil {
		return nil, err
	}
	s.files[vol] = f
	return f, nil
}

func (s *imageSet) do(op, path string) error {
	if s.inject != nil {
		return s.inject(op, path)
	}
	return nil
}

func (s *imageSet) apply(r *Record) error {
	if r.Kind == KindWrite {
		if s.run.vol == r.Volume && s.run.off+int64(len(s.run.buf)) == r.Offset && len(s.run.buf)+len(r.Data) <= maxRun {
			s.run.buf = append(s.run.buf, r.Data...)
			return nil
		}
		if err := s.flush(); err != nil {
			return err
		}
		if len(r.Data) >= maxRun/2 {
			// Large: written from where it is, not copied.
			return s.write(r.Volume, r.Offset, r.Data)
		}
		s.run.vol, s.run.off = r.Volume, r.Offset
		s.run.buf = append(s.run.buf[:0], r.Data...)
		return nil
	}
	if err := s.flush(); err != nil {
		return err
	}
	switch r.Kind {
	case KindZero, KindDiscard:
		f, err := s.file(r.Volume)
		if err != nil {
			return err
		}
		if err := s.do("image-write", f.Name()); err != nil {
			return fmt.Errorf("%w: zero %s: %w", ErrStore, f.Name(), err)
		}
		if err := f.Zero(r.Offset, r.Length); err != nil {
			return fmt.Errorf("%w: zero %s: %w", ErrStore, f.Name(), err)
		}
		s.bytes += r.Length
	case KindVolume:
		return s.resize(r.Volume, r.Size)
	}
	return nil
}

// resize creates a volume's image or changes its size.
func (s *imageSet) resize(vol string, size int64) error {
	f := s.files[vol]
	if f == nil {
		var err error
		f, err = s.open(vol, true)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrStore, err)
		}
		if s.files == nil {
			s.files = map[string]Image{}
		}
		s.files[vol] = f
		s.created = true
	}
	if err := s.do("image-write", f.Name()); err != nil {
		return fmt.Errorf("%w: size %s: %w", ErrStore, f.Name(), err)
	}
	if err := f.Resize(size); err != nil {
		return fmt.Errorf("%w: size %s to %d: %w", ErrStore, f.Name(), size, err)
	}
	s.sizes[vol] = size
	return nil
}

// flush writes the merged run of writes.
func (s *imageSet) flush() error {
	if len(s.run.buf) == 0 {
		return nil
	}
	if err := s.write(s.run.vol, s.run.off, s.run.buf); err != nil {
		return err
	}
	s.run.buf = s.run.buf[:0]
	s.run.vol = ""
	return nil
}

// write writes data at off of vol's image.
func (s *imageSet) write(vol string, off int64, data []byte) error {
	f, err := s.file(vol)
	if err != nil {
		return err
	}
	err = s.do("image-write", f.Name())
	if err == nil {
		_, err = f.WriteAt(data, off)
	}
	if err != nil {
		return fmt.Errorf("%w: write %s: %w", ErrStore, f.Name(), err)
	}
	s.bytes += int64(len(data))
	s.writes++
	return nil
}

// sync flushes the run and syncs every image (and their creation). A
// failed sync is never retried.
func (s *imageSet) sync() error {
	if err := s.flush(); err != nil {
		return err
	}
	for _, f := range s.files {
		err := s.do("image-sync", f.Name())
		if err == nil {
			err = f.Sync()
		}
		if err != nil {
			return fmt.Errorf("%w: fsync %s: %w", ErrStore, f.Name(), err)
		}
	}
	if s.created {
		if err := s.syncDir(); err != nil {
			return fmt.Errorf("%w: sync image creation: %w", ErrStore, err)
		}
		s.created = false
	}
	return nil
}

func (s *imageSet) close() {
	for _, f := range s.files {
		f.Close()
	}
	s.files = nil
	s.closed = true
}

var zeroes = make([]byte, 1<<20)

// zeroRange makes n bytes at off read as zeroes: fallocate ZERO_RANGE
// (keeps the allocation), else (when keeping the allocation does not
// matter) PUNCH_HOLE, else writing zeroes.
func zeroRange(f *os.File, off, n int64, keepAlloc bool) error {
	fd := int(f.Fd())
	err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	if !keepAlloc {
		if err = unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err == nil {
			return nil
		}
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) {
		return err
	}
	for n > 0 {
		c := min(n, int64(len(zeroes)))
		if _, err := f.WriteAt(zeroes[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

func sortedVolumes(m map[string]int64) []Volume {
	vs := make([]Volume, 0, len(m))
	for n, s := range m {
		vs = append(vs, Volume{Name: n, Size: s})
	}
	sort.Slice(vs, func(a, b int) bool { return vs[a].Name < vs[b].Name })
	return vs
}

func sortCheckpoints(cps []Checkpoint) {
	sort.Slice(cps, func(a, b int) bool {
		if cps[a].Point.Pos != cps[b].Point.Pos {
			return cps[a].Point.Pos < cps[b].Point.Pos
		}
		return cps[a].Name < cps[b].Name
	})
}
