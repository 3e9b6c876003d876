package journal

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Errors returned by the journal. Errors are wrapped with context; test
// them with errors.Is.
var (
	// ErrClosed: the journal was closed.
	ErrClosed = errors.New("journal: closed")
	// ErrInvalid: a submitted record is malformed or does not fit the
	// journal's state (unknown volume, range beyond the volume, sequence
	// number not increasing, resync-end without a resync set, checkpoint
	// inside a resync set or under a name already used). Nothing of that
	// submission was journaled.
	ErrInvalid = errors.New("journal: invalid record")
	// ErrStore: writing or syncing the journal, a base image or the applied
	// state failed. The error is sticky: see Journal.Err and ApplyErr.
	ErrStore = errors.New("journal: store error")
	// ErrCorrupt: the journal or its state cannot be read back (a bad
	// record before the tail, a missing segment, a bad state file).
	ErrCorrupt = errors.New("journal: corrupt")
	// ErrBeforeWindow: the requested point is older than the retention
	// window: its records were applied to the base images.
	ErrBeforeWindow = errors.New("journal: point is older than the retention window")
	// ErrNoPoint: no consistent point matches the selector (in the future,
	// not yet covered by a consistent point, or not a consistent position).
	ErrNoPoint = errors.New("journal: no such consistent point")
	// ErrInUse: another Journal (in this or another process) has the
	// directory open.
	ErrInUse = errors.New("journal: directory in use")
	// ErrUnknownCheckpoint: no checkpoint of that name was ever journaled
	// (within what the journal remembers).
	ErrUnknownCheckpoint = errors.New("journal: unknown checkpoint")
)

// Options configure a journal. The zero value is usable.
type Options struct {
	// Retain keeps records in the journal for this long after their time;
	// older records are applied to the base images (up to a consistent
	// point). 0 applies every record at the applier's next pass.
	Retain time.Duration
	// MaxBytes caps the journal's unapplied bytes: the applier applies the
	// oldest records, even younger than Retain, until the journal holds no
	// more (as far as consistent points allow: an open resync set is never
	// applied). 0: no cap.
	MaxBytes int64
	// SegmentBytes is the size at which a segment file is closed and a new
	// one started. Default 64 MiB.
	SegmentBytes int64
	// ApplyInterval is the period of the background applier. Default 100ms.
	ApplyInterval time.Duration
	// NoApplier disables the background applier; ApplyNow still applies.
	NoApplier bool
	// Logger receives warnings (truncated tails, store errors). Default
	// slog.Default().
	Logger *slog.Logger
	// Store keeps the segments, the applied state and the base images.
	// Default DirStore(dir).
	Store Store

	// FaultHook, when set (tests of the journal's users), is called
	// before each store operation as inject is; its error is returned
	// instead of doing the operation. ops: "segment-write",
	// "segment-sync", "image-write", "image-sync", "state-write".
	FaultHook func(op, path string) error

	// inject, when set (tests), is called before each store operation and
	// its error is returned instead of doing it. ops: "segment-write",
	// "segment-sync", "image-write", "image-sync", "state-write".
	inject func(op, path string) error
	// passBytes, when set (tests), replaces maxPassBytes.
	passBytes int64
}

// Point is a position in a VM's journal: the state of all its volumes after
// every record before Pos. Consistent points are record ends outside any
// resync set.
type Point struct {
	// Pos is the journal's logical byte position (segment headers not
	// counted), 0 at the start of the journal.
	Pos int64 `json:"pos"`
	// Seq is the sequence number of the last record before Pos that had
	// one (0 if none).
	Seq uint64 `json:"seq"`
	// Time is the time of the record ending at Pos (zero at position 0).
	Time time.Time `json:"time"`
}

// Volume is a volume of the VM and its size in bytes.
type Volume struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// Checkpoint is a named consistent point.
type Checkpoint struct {
	Name  string `json:"name"`
	Point Point  `json:"point"`
}

// Journal is the write journal of one VM: its volumes share one write order,
// one set of consistent points and one applier. All methods are safe for
// concurrent use.
type Journal struct {
	dir    string
	segDir string
	store  Store
	opts   Options
	log    *slog.Logger

	mu   sync.Mutex // guards the fields below
	work *sync.Cond // the writer waits for a batch (on mu)
	// closed: Close was called; Submit refuses.
	closed bool
	// err is the sticky journal error.
	err error
	cur *batch
	// pending state: after every submitted record, durable or not.
	pEnd     int64
	pDepth   int
	pSeq     uint64
	pHasSeq  bool
	pTime    time.Time
	pVols    map[string]int64
	pCPNames map[string]bool
	// durable state: after every record whose batch was synced.
	durable     int64
	dSeq        uint64
	dTime       time.Time
	dDepth      int
	newest      Point
	checkpoints map[string]Point
	expired     []string
	appends     uint64
	batches     uint64
	fsyncs      uint64
	full        []*batch   // closed batches waiting for the writer, oldest first
	spare       []batchMem // written batches' memory, for reuse
	spareBytes  int        // the capacity of spare's buffers
	lastSubmit  time.Time

	// readers lends the applier's readers their buffers.
	readers sync.Pool

	segMu sync.Mutex // guards segs
	segs  []segment

	// owned by the writer goroutine
	wf     Segment
	wfName string
	wfSize int64
	wfDrop int64 // synced and dropped from the page cache up to here
	iov    [][]byte
	gather []byte // a batch for a store without vectored writes

	// The overlapping writer's hand-off to its syncer (see writer), under
	// mu: the written batches to sync, whether a sync is pending, the
	// writer's end. syncDrop is the syncer's: dropped from the page cache
	// up to here in the current segment.
	syncWake *sync.Cond
	syncQ    []syncJob
	syncBusy bool
	syncStop bool
	syncDrop int64

	applier applier

	lock     io.Closer // the store's lock
	stop     chan struct{}
	writerWG sync.WaitGroup
	applyWG  sync.WaitGroup
}

// batch is a group of submissions written with one write and one fsync.
type batch struct {
	// buf holds the records, but for the data of writes submitted by
	// reference (ext), which belongs at its offsets.
	buf      []byte
	ext      []extData
	extBytes int
	refs     []Releaser // released once the batch was written
	recs     int
	start    int64
	end      int64
	// state to publish once durable
	seq       uint64
	time      time.Time
	depth     int
	newest    Point
	hasNewest bool
	cps       []Checkpoint
	done      chan struct{}
	err       error
}

// extData is a write's data that follows buf[:at] (SubmitRef).
type extData struct {
	at   int
	data []byte
}

// size returns the batch's length in the journal.
func (b *batch) size() int { return len(b.buf) + b.extBytes }

// pieces appends the batch's bytes, in order, as slices.
func (b *batch) pieces(out [][]byte) [][]byte {
	at := 0
	for _, e := range b.ext {
		if e.at > at {
			out = append(out, b.buf[at:e.at])
		}
		out = append(out, e.data)
		at = e.at
	}
	if at < len(b.buf) {
		out = append(out, b.buf[at:])
	}
	return out
}

// release gives back the memory the batch references (its slices stay,
// empty, for reuse).
func (b *batch) release() {
	for _, r := range b.refs {
		r.Release()
	}
	clear(b.refs)
	b.refs = b.refs[:0]
	clear(b.ext)
	b.ext = b.ext[:0]
}

// batchMem is the reusable memory of a batch: its buffer and the slices
// of its writes by reference (grown once, not per group commit).
type batchMem struct {
	buf  []byte
	ext  []extData
	refs []Releaser
}

func newBatch(start int64, m batchMem) *batch {
	return &batch{buf: m.buf[:0], ext: m.ext[:0], refs: m.refs[:0], start: start, end: start, done: make(chan struct{})}
}

// Open opens (creating if needed) the journal of one VM in dir: segment
// files under dir/journal, base images dir/VOLUME.img, applied state
// dir/state.json. A torn or corrupt tail of the last segment is truncated
// (logged); an interrupted apply pass is redone before Open returns. Other
// damage fails with ErrCorrupt. One process at a time may open a directory.
func Open(dir string, opts Options) (*Journal, error) {
	if opts.SegmentBytes <= 0 {
		opts.SegmentBytes = 64 << 20
	}
	if opts.ApplyInterval <= 0 {
		opts.ApplyInterval = 100 * time.Millisecond
	}
	if opts.inject == nil {
		opts.inject = opts.FaultHook
	}
	if opts.Retain < 0 || opts.MaxBytes < 0 {
		return nil, fmt.Errorf("journal options: negative retain %v or max bytes %d", opts.Retain, opts.MaxBytes)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.Store == nil {
		opts.Store = DirStore(dir)
	}
	j := &Journal{
		dir:         dir,
		segDir:      filepath.Join(dir, segDirName),
		store:       opts.Store,
		opts:        opts,
		log:         log.With("journal", opts.Store.String()),
		pVols:       map[string]int64{},
		pCPNames:    map[string]bool{},
		checkpoints: map[string]Point{},
		stop:        make(chan struct{}),
	}
	j.work = sync.NewCond(&j.mu)
	lock, err := j.store.Lock()
	if err != nil {
		return nil, fmt.Errorf("open journal %s: %w", j.store, err)
	}
	j.lock = lock
	if err := j.recover(); err != nil {
		lock.Close()
		j.applier.closeImages()
		if j.wf != nil {
			j.wf.Close()
		}
		return nil, fmt.Errorf("open journal %s: %w", j.store, err)
	}
	j.writerWG.Add(1)
	go j.writer()
	if !opts.NoApplier {
		j.applyWG.Add(1)
		go j.applyLoop()
	}
	return j, nil
}

// recover loads the state, scans and repairs the journal, and redoes an
// interrupted apply pass.
func (j *Journal) recover() error {
	st, err := loadState(j.store)
	if err != nil {
		return err
	}
	j.applier.init(j, st)
	segs, err := j.listSegments()
	if err != nil {
		return err
	}
	base := st.Base.Pos
	// Segments wholly behind the base may remain from a crash.
	for len(segs) > 1 && segs[1].start <= base {
		if err := j.store.RemoveSegment(segs[0].start); err != nil {
			return err
		}
		segs = segs[1:]
	}
	if len(segs) == 0 && base > 0 {
		return fmt.Errorf("%w: no segment files, applied state is at %d", ErrCorrupt, base)
	}
	if len(segs) > 0 && segs[0].start > base {
		return fmt.Errorf("%w: journal starts at %d, applied state is at %d", ErrCorrupt, segs[0].start, base)
	}
	for _, v := range st.Volumes {
		j.pVols[v.Name] = v.Size
	}
	for _, c := range st.Checkpoints {
		j.checkpoints[c.Name] = c.Point
		j.pCPNames[c.Name] = true
	}
	j.expired = append(j.expired, st.Expired...)
	end := base
	j.pSeq, j.pHasSeq, j.pTime = st.Base.Seq, st.Base.Seq != 0, st.Base.Time
	j.newest = st.Base
	if len(segs) > 0 {
		end, segs, err = j.scan(segs, base)
		if err != nil {
			return err
		}
	}
	if st.Target.Pos > end {
		return fmt.Errorf("%w: applied state target %d beyond journal end %d", ErrCorrupt, st.Target.Pos, end)
	}
	j.pEnd, j.durable = end, end
	j.dSeq, j.dTime, j.dDepth = j.pSeq, j.pTime, j.pDepth
	j.segs = segs
	if len(segs) == 0 {
		if err := j.rotate(base); err != nil {
			return err
		}
	} else {
		last := segs[len(segs)-1]
		f, err := j.store.OpenSegment(last.start)
		if err != nil {
			return err
		}
		size, err := f.Size()
		if err != nil {
			f.Close()
			return err
		}
		j.wf, j.wfName, j.wfSize, j.wfDrop = f, last.path, size, size
	}
	j.cur = newBatch(end, j.takeSpare())
	if st.Target.Pos > st.Base.Pos {
		j.log.Warn("journal: redoing an interrupted apply pass", "from", st.Base.Pos, "to", st.Target.Pos)
		if err := j.applier.pass(st.Target); err != nil {
			return err
		}
	}
	return nil
}

// scan reads the journal from base to its end, rebuilding the in-memory
// state, and truncates a torn tail of the last segment. It returns the end
// position and the (possibly shortened) segment list.
func (j *Journal) scan(segs []segment, base int64) (int64, []segment, error) {
	r, err := newReader(segs, base, -1, nil)
	end := base
	for err == nil {
		var rec Record
		var e int64
		rec, _, e, err = r.next()
		if err != nil {
			break
		}
		j.track(&rec)
		if j.pDepth == 0 {
			p := Point{Pos: e, Seq: j.pSeq, Time: rec.Time}
			j.newest = p
			if rec.Kind == KindCheckpoint {
				j.checkpoints[rec.Checkpoint] = p
			}
		}
		end = e
	}
	if r != nil {
		r.close()
	}
	if errors.Is(err, io.EOF) {
		return end, segs, nil
	}
	var te *tornError
	if !errors.As(err, &te) {
		return 0, nil, err
	}
	last := len(segs) - 1
	if te.seg != last {
		return 0, nil, err
	}
	s := segs[last]
	if te.header {
		// A header is synced before any record is written behind it: a bad
		// one is torn only when nothing but zeroes follows (the segment's
		// creation was cut short), and then nothing in it was acknowledged.
		b, rerr := readSegment(j.store, s.start)
		if rerr != nil {
			return 0, nil, rerr
		}
		if len(b) > segHeaderLen && !allZero(b[segHeaderLen:]) || base > s.start {
			return 0, nil, err
		}
		j.log.Warn("journal: removing a last segment whose creation was cut short", "segment", s.path, "reason", te.reason)
		if err := j.store.RemoveSegment(s.start); err != nil {
			return 0, nil, err
		}
		if err := j.store.SyncSegments(); err != nil {
			return 0, nil, err
		}
		return end, segs[:last], nil
	}
	f, err := j.store.OpenSegment(s.start)
	if err != nil {
		return 0, nil, err
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return 0, nil, err
	}
	keep := segHeaderLen + te.pos - s.start
	if pad := size - keep; pad > 0 && pad < directAlign && zeroFrom(f, keep, pad) {
		// The padding of an O_DIRECT append's last block (the
		// journal stopped without closing the segment): no record.
		j.log.Info("journal: cutting the zero padding after the last record", "segment", s.path, "position", te.pos, "bytes", pad)
	} else {
		j.log.Warn("journal: truncating a torn or corrupt tail", "segment", s.path, "position", te.pos,
			"dropped-bytes", size-keep, "reason", te.reason)
	}
	if err := f.Truncate(keep); err != nil {
		return 0, nil, err
	}
	return end, segs, nil
}

// track advances the pending state over one valid record.
func (j *Journal) track(r *Record) {
	switch r.Kind {
	case KindVolume:
		j.pVols[r.Volume] = r.Size
	case KindResyncBegin:
		j.pDepth = 1
	case KindResyncEnd:
		j.pDepth = 0
	case KindCheckpoint:
		j.pCPNames[r.Checkpoint] = true
	}
	if r.HasSeq {
		j.pSeq, j.pHasSeq = r.Seq, true
	}
	j.pTime = r.Time
}

// rotate starts a new segment at logical position start; writer only (or
// recover).
func (j *Journal) rotate(start int64) error {
	path := j.store.SegmentName(start)
	f, err := j.store.CreateSegment(start)
	if err != nil {
		return fmt.Errorf("%w: create segment: %w", ErrStore, err)
	}
	if err := j.inject("segment-write", path); err == nil {
		err = f.Append(encodeSegHeader(start))
		if err == nil {
			err = j.inject("segment-sync", path)
		}
		if err == nil {
			err = f.Sync()
		}
		if err == nil {
			err = j.store.SyncSegments()
		}
		if err != nil {
			f.Close()
			return fmt.Errorf("%w: new segment %s: %w", ErrStore, path, err)
		}
	} else {
		f.Close()
		return fmt.Errorf("%w: new segment %s: %w", ErrStore, path, err)
	}
	if j.wf != nil {
		j.dropTail()
		j.wf.Close()
	}
	j.wf, j.wfName, j.wfSize, j.wfDrop = f, path, segHeaderLen, segHeaderLen
	j.syncDrop = segHeaderLen // the syncer is idle (writeOverlapped)
	j.segMu.Lock()
	j.segs = append(j.segs, segment{start: start, path: path, st: j.store})
	j.segMu.Unlock()
	return nil
}

func (j *Journal) inject(op, path string) error {
	if j.opts.inject != nil {
		return j.opts.inject(op, path)
	}
	return nil
}

// Pending is a submission on its way to disk.
type Pending struct {
	b     *batch
	point Point
}

// Done is closed when the submission is durable or failed.
func (p *Pending) Done() <-chan struct{} { return p.b.done }

// Wait waits until the submission is durable (fsynced) and returns the
// position after its last record (a consistent point only if it is not in
// a resync set). When ctx ends first it returns ctx.Err(); the records may
// still become durable.
func (p *Pending) Wait(ctx context.Context) (Point, error) {
	select {
	case <-p.b.done:
	case <-ctx.Done():
		return Point{}, ctx.Err()
	}
	if p.b.err != nil {
		return Point{}, p.b.err
	}
	return p.point, nil
}

// Submit validates recs and queues them, in call order, for the next group
// commit, and returns without waiting for the disk. Either all of recs are
// journaled, in order and contiguous, or (on error) none. Use Wait on the
// result before acknowledging the records to anyone.
func (j *Journal) Submit(recs ...Record) (*Pending, error) {
	return j.submit(nil, recs)
}

// Releaser is a reference on memory lent to the journal (SubmitRef).
type Releaser interface {
	// Release gives the memory back.
	Release()
}

// SubmitRef is Submit without copying the data of write records: the
// journal writes it to the store from where it is (one vectored write per
// group commit, where the store can), so the caller leaves recs' Data
// untouched until the journal calls ref.Release, once, when the records
// were written to the store or failed (before they are durable: wait for
// that with the Pending). When SubmitRef returns an error, the journal did
// not take ref.
func (j *Journal) SubmitRef(ref Releaser, recs ...Record) (*Pending, error) {
	return j.submit(ref, recs)
}

// minRefData is the smallest write SubmitRef journals by reference; a
// smaller one is copied, cheaper than an iovec of its own.
const minRefData = 2 << 10

func (j *Journal) submit(ref Releaser, recs []Record) (*Pending, error) {
	now := time.Now()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return nil, ErrClosed
	}
	if j.err != nil {
		return nil, j.err
	}
	if err := j.validate(recs); err != nil {
		return nil, err
	}
	j.lastSubmit = now
	if len(recs) == 0 {
		b := &batch{done: make(chan struct{})}
		close(b.done)
		return &Pending{b: b, point: Point{Pos: j.pEnd, Seq: j.pSeq, Time: j.pTime}}, nil
	}
	if j.cur.size() >= maxBatchBytes {
		// Close the batch: one write stays bounded, its buffer reusable.
		j.full = append(j.full, j.cur)
		j.cur = newBatch(j.cur.end, j.takeSpare())
	}
	b := j.cur
	took := false // ref is the batch's
	for i := range recs {
		r := recs[i] // a copy: the stamped time stays ours
		if r.Time.IsZero() {
			r.Time = now
		}
		r.Time = r.Time.Round(0).UTC() // as it reads back: no monotonic clock, UTC
		if r.Time.Before(j.pTime) {
			r.Time = j.pTime
		}
		if !r.HasSeq {
			r.Seq = 0
		}
		if ref != nil && r.Kind == KindWrite && len(r.Data) >= minRefData {
			b.buf = appendRecordHead(b.buf, &r, false)
			b.ext = append(b.ext, extData{at: len(b.buf), data: r.Data})
			b.extBytes += len(r.Data)
			if !took {
				// One reference for all of recs' data.
				b.refs = append(b.refs, ref)
				took = true
			}
		} else {
			b.buf = appendRecord(b.buf, &r)
		}
		j.track(&r)
		j.pEnd += int64(r.encodedLen())
		b.recs++
		if j.pDepth == 0 {
			b.newest = Point{Pos: j.pEnd, Seq: j.pSeq, Time: r.Time}
			b.hasNewest = true
			if r.Kind == KindCheckpoint {
				b.cps = append(b.cps, Checkpoint{Name: r.Checkpoint, Point: b.newest})
			}
		}
	}
	b.end, b.seq, b.time, b.depth = j.pEnd, j.pSeq, j.pTime, j.pDepth
	if ref != nil && !took {
		ref.Release() // nothing of it was referenced
	}
	if len(j.full) > 0 || !j.syncBusy || b.size() >= overlapWriteBytes {
		// Only when the writer can go on (see overlapWriter's wait): a
		// wake-up per submission that finds an fdatasync running and
		// the open batch small is a goroutine switch per write for
		// nothing.
		j.work.Signal()
	}
	return &Pending{b: b, point: Point{Pos: j.pEnd, Seq: j.pSeq, Time: j.pTime}}, nil
}

// validate checks recs against the pending state, without changing it.
func (j *Journal) validate(recs []Record) error {
	depth, seq, hasSeq := j.pDepth, j.pSeq, j.pHasSeq
	var vols map[string]int64 // changes made by recs
	var names map[string]bool
	size := func(v string) (int64, bool) {
		if s, ok := vols[v]; ok {
			return s, true
		}
		s, ok := j.pVols[v]
		return s, ok
	}
	for i := range recs {
		r := &recs[i]
		bad := func(format string, a ...any) error {
			return fmt.Errorf("%w: record %d (%s): %s", ErrInvalid, i, r.Kind, fmt.Sprintf(format, a...))
		}
		if r.HasSeq {
			if hasSeq && r.Seq <= seq {
				return bad("sequence number %d not above %d", r.Seq, seq)
			}
			seq, hasSeq = r.Seq, true
		}
		switch r.Kind {
		case KindWrite, KindZero, KindDiscard:
			sz, ok := size(r.Volume)
			if !ok {
				return bad("unknown volume %q", r.Volume)
			}
			n := r.Length
			if r.Kind == KindWrite {
				n = int64(len(r.Data))
				if n > MaxWriteBytes {
					return bad("%d bytes of data, at most %d", n, MaxWriteBytes)
				}
			}
			if r.Offset < 0 || n <= 0 || n > sz || r.Offset > sz-n {
				return bad("range %d+%d outside volume %q of %d bytes", r.Offset, n, r.Volume, sz)
			}
		case KindVolume:
			if !ValidName(r.Volume) {
				return bad("bad volume name %q", r.Volume)
			}
			if r.Size <= 0 || r.Size > MaxVolumeSize {
				return bad("volume size %d out of range", r.Size)
			}
			if vols == nil {
				vols = map[string]int64{}
			}
			vols[r.Volume] = r.Size
		case KindResyncBegin:
			depth = 1
		case KindResyncEnd:
			if depth == 0 {
				return bad("no resync set is open")
			}
			depth = 0
		case KindCheckpoint:
			if !ValidName(r.Checkpoint) {
				return bad("bad checkpoint name %q", r.Checkpoint)
			}
			if depth != 0 {
				return bad("checkpoint %q inside an open resync set is not a consistent point", r.Checkpoint)
			}
			if j.pCPNames[r.Checkpoint] || names[r.Checkpoint] {
				return bad("checkpoint name %q already used", r.Checkpoint)
			}
			if names == nil {
				names = map[string]bool{}
			}
			names[r.Checkpoint] = true
		default:
			return bad("unknown kind")
		}
	}
	return nil
}

// Append submits recs and waits until they are durable; see Submit and
// Pending.Wait.
func (j *Journal) Append(ctx context.Context, recs ...Record) (Point, error) {
	p, err := j.Submit(recs...)
	if err != nil {
		return Point{}, err
	}
	return p.Wait(ctx)
}

// maxBatchBytes closes a batch: a group commit writes about this much at
// most (plus one record).
const maxBatchBytes = 2 << 20

// batchCap is the largest batch buffer kept for reuse: twice what a
// closing batch and one more copied write of up to 1 MiB need.
const batchCap = 2 * (maxBatchBytes + 1<<20 + 4<<10)

// newBatchBuf is the capacity of a new batch buffer, which appends grow
// as copied records need. A batch of writes journaled by reference holds
// only their record heads (about 50 bytes for 4 KiB of data), and while
// an fdatasync runs the overlapping writer starts a batch every 256 KiB
// of data: with buffers sized for 2 MiB of copied records, a slow
// fdatasync made the hub fault in and zero megabytes of fresh memory per
// 256 KiB of writes.
const newBatchBuf = 64 << 10

// maxSpares and maxSpareBytes bound the batch buffers kept for reuse: a
// group commit that waited for a slow fdatasync holds many; idleSpares
// are kept when the journal is idle.
const (
	maxSpares     = 64
	maxSpareBytes = 48 << 20
	idleSpares    = 2
)

// takeSpare returns an empty batch buffer, a written batch's when there
// is one; under mu. Buffers are reused, not grown from nothing each
// time: fresh memory costs a page fault per page, more than the copy
// into it.
func (j *Journal) takeSpare() batchMem {
	if n := len(j.spare); n > 0 {
		m := j.spare[n-1]
		j.spare[n-1] = batchMem{}
		j.spare = j.spare[:n-1]
		j.spareBytes -= cap(m.buf)
		return m
	}
	return batchMem{buf: make([]byte, 0, newBatchBuf)}
}

// putSpare keeps a written batch's memory for reuse, within the bounds;
// under mu.
func (j *Journal) putSpare(m batchMem) {
	c := cap(m.buf)
	if c > batchCap || len(j.spare) >= maxSpares || j.spareBytes+c > maxSpareBytes {
		return
	}
	j.spare = append(j.spare, batchMem{buf: m.buf[:0], ext: m.ext[:0], refs: m.refs[:0]})
	j.spareBytes += c
}

// trimSpares lets the batch buffers beyond idleSpares go once nothing
// was submitted for idleAfter: the memory of a burst goes back.
func (j *Journal) trimSpares(now time.Time) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if len(j.spare) > idleSpares && now.Sub(j.lastSubmit) > idleAfter {
		clear(j.spare[idleSpares:])
		j.spare = j.spare[:idleSpares]
		j.spareBytes = 0
		for _, m := range j.spare {
			j.spareBytes += cap(m.buf)
		}
	}
}

// idleAfter: see trimSpares.
const idleAfter = 2 * time.Second

// writer is the group-commit goroutine: it takes every closed batch and
// the open one, writes them in order (one write each) and makes them
// durable with one fdatasync, then publishes them. While one fdatasync
// runs, the next commit gathers everything that arrives.
//
// On a store whose segments can be synced while more is appended
// (overlapSyncer: the directory store's files), the fdatasync runs in its
// own goroutine (syncer) and the writer goes on writing the batches that
// fill meanwhile: a commit then costs the fdatasync plus the write of at
// most the open batch, not of everything that arrived during the last
// one.
func (j *Journal) writer() {
	defer j.writerWG.Done()
	if _, ok := j.wf.(overlapSyncer); ok {
		j.overlapWriter()
		return
	}
	var bs []*batch
	for {
		var err error
		bs, err = j.takeBatches(bs[:0], false)
		if len(bs) == 0 { // closed, nothing left
			return
		}
		if err == nil {
			err = j.writeBatches(bs)
		}

		j.mu.Lock()
		for _, b := range bs {
			j.publish(b, err)
		}
		j.mu.Unlock()
		clear(bs)
	}
}

// takeBatches waits until there is something to write (or the journal
// is closed) and appends to bs the closed batches and the open one, which
// a fresh batch replaces, with the journal's sticky error; none when
// closed with nothing left. overlap: for the overlapping writer, which
// leaves the open batch to grow while an fdatasync runs unless it goes
// with closed ones (in order, one write after the other) or holds
// overlapWriteBytes: written while the fdatasync runs, it is not written
// after it.
func (j *Journal) takeBatches(bs []*batch, overlap bool) ([]*batch, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	grow := func() bool { // the open batch may wait
		return overlap && j.syncBusy && j.cur.size() < overlapWriteBytes
	}
	for len(j.full) == 0 && (j.cur.recs == 0 || grow()) && !j.closed {
		j.work.Wait()
	}
	bs = append(bs, j.full...)
	clear(j.full)
	j.full = j.full[:0]
	if j.cur.recs > 0 && (j.closed || len(bs) > 0 || !grow()) {
		bs = append(bs, j.cur)
		j.cur = newBatch(j.cur.end, j.takeSpare())
	}
	return bs, j.err
}

// syncJob is batches the overlapping writer wrote (or failed to write:
// err) to seg, up to size bytes, for the syncer to make durable and
// publish.
type syncJob struct {
	bs   []*batch
	err  error
	seg  Segment
	name string
	size int64
}

// overlapWriteBytes is how much the open batch holds before the
// overlapping writer writes it while an fdatasync runs.
const overlapWriteBytes = 256 << 10

// overlapSyncer is a Segment whose Sync may run while Append or AppendV
// add more (see writer).
type overlapSyncer interface {
	overlapSync()
}

// overlapWriter is the writer of a store that syncs while appending: it
// writes a closed batch at once, the open one when no fdatasync is
// pending, and hands what it wrote to syncer in order.
func (j *Journal) overlapWriter() {
	j.syncWake = sync.NewCond(&j.mu)
	j.syncDrop = j.wfDrop
	syncDone := make(chan struct{})
	go j.syncer(syncDone)
	defer func() {
		j.mu.Lock()
		j.syncStop = true
		j.syncWake.Signal()
		j.mu.Unlock()
		<-syncDone
	}()
	for {
		bs, err := j.takeBatches(nil, true) // the syncer keeps bs
		if len(bs) == 0 {                   // closed, nothing left
			return
		}
		if err == nil {
			err = j.writeOverlapped(bs)
		}
		j.mu.Lock()
		j.syncQ = append(j.syncQ, syncJob{bs: bs, err: err, seg: j.wf, name: j.wfName, size: j.wfSize})
		j.syncBusy = true
		j.syncWake.Signal()
		j.mu.Unlock()
	}
}

// writeOverlapped writes batches in order without syncing them, but for
// a segment that fills: that one is synced (after everything the syncer
// holds) before the next is started, as a new segment must not hold
// records while its predecessor's tail may be lost.
func (j *Journal) writeOverlapped(bs []*batch) error {
	return j.writeInOrder(bs, func() error {
		j.mu.Lock()
		for j.syncBusy && j.err == nil {
			j.work.Wait()
		}
		err := j.err
		j.mu.Unlock()
		// The syncer is idle: its page-cache mark is the writer's.
		j.wfDrop = max(j.wfDrop, j.syncDrop)
		return err
	})
}

// writeInOrder writes batches in order, as few writes as it can (the
// batches bound for one segment together, up to maxWriteBytes), starting
// the next segment where one is full: settle (may be nil) is called
// first, then the full segment is synced if it was written to. The
// batches written to the last segment are not synced.
func (j *Journal) writeInOrder(bs []*batch, settle func() error) error {
	unsynced := false
	for len(bs) > 0 {
		if j.wfSize-segHeaderLen >= j.opts.SegmentBytes {
			if settle != nil {
				if err := settle(); err != nil {
					return err
				}
			}
			if unsynced {
				if err := j.syncSegment(); err != nil {
					return err
				}
				unsynced = false
			}
			if err := j.rotate(bs[0].start); err != nil {
				return err
			}
		}
		// A batch goes to this segment if the segment is not full
		// before it.
		n, group := 0, 0
		for n < len(bs) && j.wfSize-segHeaderLen+int64(group) < j.opts.SegmentBytes && (n == 0 || group+bs[n].size() <= maxWriteBytes) {
			group += bs[n].size()
			n++
		}
		if err := j.writeGroup(bs[:n]); err != nil {
			return err
		}
		unsynced = true
		bs = bs[n:]
	}
	return nil
}

// maxWriteBytes bounds what one write of the writer gathers from several
// batches. One O_DIRECT write of many megabytes keeps the device busy with
// all of them at once; a write per 2 MiB batch, each waited for, left it
// idle between them (1 MiB protected writes went from 0.19x to 0.14x of
// unprotected).
const maxWriteBytes = 16 << 20

// syncer makes what the overlapping writer wrote durable, one fdatasync
// for everything written when it starts, and publishes it in order. After
// a store error nothing is synced again (an fdatasync that follows a
// failed one may succeed with the data lost): what follows fails.
func (j *Journal) syncer(done chan struct{}) {
	defer close(done)
	var jobs []syncJob
	for {
		j.mu.Lock()
		for len(j.syncQ) == 0 && !j.syncStop {
			j.syncWake.Wait()
		}
		if len(j.syncQ) == 0 {
			j.mu.Unlock()
			return
		}
		jobs = append(jobs[:0], j.syncQ...)
		clear(j.syncQ)
		j.syncQ = j.syncQ[:0]
		sticky := j.err
		j.mu.Unlock()

		// Jobs before the first failed write are synced; that one and
		// what follows fail with its error.
		k := 0
		for k < len(jobs) && jobs[k].err == nil {
			k++
		}
		var err error
		if sticky != nil {
			err = sticky
		} else if k > 0 {
			err = j.syncOverlapped(jobs[k-1])
		}
		j.mu.Lock()
		for i, jb := range jobs {
			e := err
			if i >= k {
				e = jb.err
			}
			for _, b := range jb.bs {
				j.publish(b, e)
			}
		}
		if len(j.syncQ) == 0 {
			j.syncBusy = false
			j.work.Broadcast()
		}
		j.mu.Unlock()
		clear(jobs)
	}
}

// syncOverlapped fdatasyncs the segment of jb, written up to jb.size;
// syncer only.
func (j *Journal) syncOverlapped(jb syncJob) error {
	err := j.inject("segment-sync", jb.name)
	if err == nil {
		err = jb.seg.Sync()
	}
	j.mu.Lock()
	j.fsyncs++
	j.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%w: fdatasync %s: %w", ErrStore, jb.name, err)
	}
	if j.opts.Retain >= dropCacheRetain && jb.size-j.syncDrop >= dropCacheBytes {
		if d, ok := jb.seg.(cacheDropper); ok {
			d.DropCache(j.syncDrop, jb.size-j.syncDrop)
		}
		j.syncDrop = jb.size
	}
	return nil
}

// publish completes a written batch: its records are durable (err nil)
// or failed; j.mu held.
func (j *Journal) publish(b *batch, err error) {
	if err != nil {
		if j.err == nil {
			j.err = err
			j.log.Error("journal: store failed; refusing further appends", "err", err)
		}
		b.err = j.err
	} else {
		j.durable = b.end
		j.dSeq, j.dTime, j.dDepth = b.seq, b.time, b.depth
		if b.hasNewest {
			j.newest = b.newest
		}
		for _, c := range b.cps {
			j.checkpoints[c.Name] = c.Point
		}
		j.appends += uint64(b.recs)
	}
	b.release()
	j.putSpare(batchMem{buf: b.buf, ext: b.ext, refs: b.refs})
	b.buf, b.ext, b.refs = nil, nil, nil
	close(b.done)
}

// writeBatches writes batches in order and makes them durable: one
// fdatasync of the segment file at the end, and one of a segment before
// the next is started. A batch that fills many group commits' worth of
// records while a slow fdatasync runs is so written with one, not one per
// batch.
func (j *Journal) writeBatches(bs []*batch) error {
	if err := j.writeInOrder(bs, nil); err != nil {
		return err
	}
	return j.syncSegment()
}

// writeGroup writes batches at the end of the open segment, with one
// write, and releases their data; the writer only.
func (j *Journal) writeGroup(bs []*batch) error {
	path := j.wfName
	err := j.inject("segment-write", path)
	if err == nil {
		err = j.appendBatches(bs)
	}
	size := 0
	for _, b := range bs {
		size += b.size()
		b.release() // written (or failed): the data is the store's now
	}
	if err != nil {
		return fmt.Errorf("%w: write %s: %w", ErrStore, path, err)
	}
	j.wfSize += int64(size)
	j.mu.Lock()
	j.batches += uint64(len(bs))
	j.mu.Unlock()
	return nil
}

// appendBatches writes batches to the segment: the records and the data
// they reference with one vectored write where the store can, else
// gathered into one buffer; writer only.
func (j *Journal) appendBatches(bs []*batch) error {
	if len(bs) == 1 && len(bs[0].ext) == 0 {
		return j.wf.Append(bs[0].buf)
	}
	j.iov = j.iov[:0]
	for _, b := range bs {
		j.iov = b.pieces(j.iov)
	}
	defer clear(j.iov)
	if v, ok := j.wf.(vectorAppender); ok {
		return v.AppendV(j.iov)
	}
	j.gather = j.gather[:0]
	for _, p := range j.iov {
		j.gather = append(j.gather, p...)
	}
	return j.wf.Append(j.gather)
}

// syncSegment fdatasyncs the segment file being written; writer only.
func (j *Journal) syncSegment() error {
	path := j.wfName
	err := j.inject("segment-sync", path)
	if err == nil {
		err = j.wf.Sync()
	}
	j.mu.Lock()
	j.fsyncs++
	j.mu.Unlock()
	if err != nil {
		// Never retried: after a failed fsync the page cache may have
		// dropped the data (fsyncgate).
		return fmt.Errorf("%w: fdatasync %s: %w", ErrStore, path, err)
	}
	if j.opts.Retain >= dropCacheRetain && j.wfSize-j.wfDrop >= dropCacheBytes {
		// Nothing reads these records before the retention window
		// ends: their pages go back to the kernel now, warm for the
		// next writes, instead of filling the page cache with a day
		// of journal. Advice only: an error changes nothing.
		if d, ok := j.wf.(cacheDropper); ok {
			d.DropCache(j.wfDrop, j.wfSize-j.wfDrop)
		}
		j.wfDrop = j.wfSize
	}
	return nil
}

// dropCacheRetain is the retention window from which synced journal
// records are dropped from the page cache: with a shorter one the applier
// reads them soon.
const dropCacheRetain = time.Minute

// dropCacheBytes is how much synced journal is dropped from the page cache
// at once (the rest of a segment when the next one starts): one
// posix_fadvise per group commit of a few writes cost more than the
// commit's fdatasync's share of small writes.
const dropCacheBytes = 8 << 20

// dropTail drops the synced rest of the segment being left from the page
// cache; writer only, with everything written synced.
func (j *Journal) dropTail() {
	if j.opts.Retain < dropCacheRetain || j.wfSize <= j.wfDrop {
		return
	}
	if d, ok := j.wf.(cacheDropper); ok {
		d.DropCache(j.wfDrop, j.wfSize-j.wfDrop)
	}
	j.wfDrop = j.wfSize
}

// Err returns the journal's sticky store error, or nil. Once set, every
// Submit and Append fails with it.
func (j *Journal) Err() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}

// probeName is the file Probe writes in the segment directory; it does
// not end in the segment suffix, so recovery never reads it.
const probeName = "probe.tmp"

// Probe tries the store the way the writer uses it: it writes and
// fdatasyncs a block in the segment directory and removes it again. The
// hub calls it before it trusts a journal reopened after a store error
// (ENOSPC, EIO): the reopened journal's recovery only reads, so without a
// probe a store that still fails would look healthy until the next write.
func (j *Journal) Probe() error {
	if err := j.store.Probe(j.inject); err != nil {
		return fmt.Errorf("%w: probe %s: %w", ErrStore, j.store, err)
	}
	return nil
}

// Close waits for submitted records to be written, stops the applier and
// closes the files. It returns the sticky errors, if any.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return ErrClosed
	}
	j.closed = true
	j.work.Broadcast()
	j.mu.Unlock()
	close(j.stop)
	j.applyWG.Wait()
	j.writerWG.Wait()
	var errs []error
	if j.wf != nil {
		if err := j.wf.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	j.applier.run.Lock() // an ApplyNow in flight
	j.applier.closeImages()
	j.applier.run.Unlock()
	j.lock.Close()
	errs = append(errs, j.Err(), j.ApplyErr())
	return errors.Join(errs...)
}

// Volumes returns the VM's volumes as of the end of the journal (including
// records not yet durable), sorted by name.
func (j *Journal) Volumes() []Volume {
	j.mu.Lock()
	defer j.mu.Unlock()
	return sortedVolumes(j.pVols)
}

// InResync reports whether a resync set is open at the durable end of the
// journal.
func (j *Journal) InResync() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.dDepth != 0
}

// Stats are a journal's counters and positions, for metrics.
type Stats struct {
	// Bytes is the journal's size not yet applied (durable end minus
	// applied position), in bytes.
	Bytes int64
	// Segments is the number of segment files.
	Segments int
	// Durable is the position up to which records are durable.
	Durable int64
	// LastSeq is the sequence number of the last durable record with one.
	LastSeq uint64
	// Oldest is the oldest recoverable point (the applied position).
	Oldest Point
	// Newest is the newest durable consistent point.
	Newest Point
	// Applied is the position the base images hold.
	Applied Point
	// InResync: a resync set is open at the durable end.
	InResync bool
	// Appends counts durable records; Batches counts group commits
	// (one write each); Fsyncs counts journal fdatasync calls.
	Appends, Batches, Fsyncs uint64
	// AppliedBytes counts bytes applied to the base images since Open.
	AppliedBytes int64
	// ApplyWrites counts the write calls to the base images (adjacent
	// writes are merged into one, up to 1 MiB).
	ApplyWrites int64
	// ApplyPasses counts apply passes that advanced the base images.
	ApplyPasses uint64
	// Err and ApplyErr are the sticky errors (nil when healthy).
	Err, ApplyErr error
}

// Stats returns the current counters.
func (j *Journal) Stats() Stats {
	j.mu.Lock()
	s := Stats{
		Durable:  j.durable,
		LastSeq:  j.dSeq,
		Newest:   j.newest,
		InResync: j.dDepth != 0,
		Appends:  j.appends,
		Batches:  j.batches,
		Fsyncs:   j.fsyncs,
		Err:      j.err,
	}
	j.mu.Unlock()
	j.segMu.Lock()
	s.Segments = len(j.segs)
	j.segMu.Unlock()
	a := &j.applier
	a.mu.Lock()
	s.Oldest = a.st.Target
	s.Applied = a.st.Base
	s.AppliedBytes = a.appliedBytes
	s.ApplyPasses = a.passes
	s.ApplyWrites = a.applyWrites
	s.ApplyErr = a.err
	a.mu.Unlock()
	s.Bytes = s.Durable - s.Applied.Pos
	return s
}

// LastSeq returns the sequence number of the last record submitted with
// one (durable or not); a later record's must be above it.
func (j *Journal) LastSeq() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.pSeq
}

// Newest returns the newest durable consistent point.
func (j *Journal) Newest() Point {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.newest
}

// Oldest returns the oldest recoverable point: the applied position.
func (j *Journal) Oldest() Point {
	a := &j.applier
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st.Target
}

// HasCheckpoint reports whether a checkpoint named name is in the
// retention window, submitted records included: Submit refuses a second
// checkpoint of that name.
func (j *Journal) HasCheckpoint(name string) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.pCPNames[name]
}

// Checkpoints returns the named checkpoints still in the retention window,
// oldest first.
func (j *Journal) Checkpoints() []Checkpoint {
	floor := j.Oldest()
	j.mu.Lock()
	defer j.mu.Unlock()
	var cps []Checkpoint
	for n, p := range j.checkpoints {
		if p.Pos >= floor.Pos {
			cps = append(cps, Checkpoint{Name: n, Point: p})
		}
	}
	sortCheckpoints(cps)
	return cps
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// zeroFrom reports whether the n bytes of f at off read as zeroes.
func zeroFrom(f io.ReaderAt, off, n int64) bool {
	b := make([]byte, n)
	k, _ := f.ReadAt(b, off)
	return int64(k) == n && allZero(b)
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
