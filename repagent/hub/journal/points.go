package journal

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

type selKind int

const (
	selNewest selKind = iota
	selTime
	selSeq
	selCheckpoint
	selPos
)

// Selector chooses a consistent point: Newest, AtTime, AtSeq, AtCheckpoint
// or AtPos.
type Selector struct {
	kind selKind
	time time.Time
	seq  uint64
	name string
	pos  int64
}

// Newest selects the newest durable consistent point.
func Newest() Selector { return Selector{kind: selNewest} }

// AtTime selects the newest consistent point whose time is at or before t.
func AtTime(t time.Time) Selector { return Selector{kind: selTime, time: t} }

// AtSeq selects the newest consistent point whose sequence number is at or
// below n: the state after write n and every write before it, when n is a
// sequence number outside a resync set.
func AtSeq(n uint64) Selector { return Selector{kind: selSeq, seq: n} }

// AtCheckpoint selects the checkpoint named name.
func AtCheckpoint(name string) Selector { return Selector{kind: selCheckpoint, name: name} }

// AtPos selects the consistent point at journal position pos exactly.
func AtPos(pos int64) Selector { return Selector{kind: selPos, pos: pos} }

// String describes the selector ("seq 42", "checkpoint \"nightly\"").
func (s Selector) String() string {
	switch s.kind {
	case selTime:
		return "time " + s.time.UTC().Format(time.RFC3339Nano)
	case selSeq:
		return fmt.Sprintf("seq %d", s.seq)
	case selCheckpoint:
		return fmt.Sprintf("checkpoint %q", s.name)
	case selPos:
		return fmt.Sprintf("position %d", s.pos)
	}
	return "newest"
}

// Resolve returns the consistent point that sel selects, within the
// retention window. Errors: ErrBeforeWindow (older than the oldest
// recoverable point), ErrUnknownCheckpoint, ErrNoPoint (newer than the newest
// consistent point, or a position that is not one).
func (j *Journal) Resolve(ctx context.Context, sel Selector) (Point, error) {
	id := j.applier.pin(0)
	defer j.applier.unpin(id)
	p, err := j.resolve(ctx, sel, j.Oldest())
	if err != nil {
		return Point{}, fmt.Errorf("%s: %w", sel, err)
	}
	return p, nil
}

func (j *Journal) resolve(ctx context.Context, sel Selector, floor Point) (Point, error) {
	j.mu.Lock()
	newest := j.newest
	cp, cpOK := j.checkpoints[sel.name]
	expired := slices.Contains(j.expired, sel.name)
	j.mu.Unlock()
	switch sel.kind {
	case selNewest:
		return newest, nil
	case selCheckpoint:
		if !cpOK {
			if expired {
				return Point{}, fmt.Errorf("%w (oldest point is at %s)", ErrBeforeWindow, fmtTime(floor.Time))
			}
			return Point{}, ErrUnknownCheckpoint
		}
		if cp.Pos < floor.Pos {
			return Point{}, fmt.Errorf("%w (oldest point is at %s)", ErrBeforeWindow, fmtTime(floor.Time))
		}
		return cp, nil
	case selTime:
		if sel.time.Before(floor.Time) {
			return Point{}, fmt.Errorf("%w (oldest point is at %s)", ErrBeforeWindow, fmtTime(floor.Time))
		}
		if !sel.time.Before(newest.Time) {
			return newest, nil
		}
	case selSeq:
		if sel.seq < floor.Seq {
			return Point{}, fmt.Errorf("%w (oldest point has seq %d)", ErrBeforeWindow, floor.Seq)
		}
		if sel.seq > newest.Seq {
			return Point{}, fmt.Errorf("%w: the newest consistent point has seq %d", ErrNoPoint, newest.Seq)
		}
	case selPos:
		if sel.pos < floor.Pos {
			return Point{}, fmt.Errorf("%w (oldest point is at position %d)", ErrBeforeWindow, floor.Pos)
		}
		if sel.pos > newest.Pos {
			return Point{}, fmt.Errorf("%w: the newest consistent point is at position %d", ErrNoPoint, newest.Pos)
		}
	}
	found := floor
	err := j.walk(ctx, floor, newest.Pos, func(p Point, rec *Record) bool {
		switch sel.kind {
		case selTime:
			if rec.Time.After(sel.time) {
				return false
			}
		case selSeq:
			if rec.HasSeq && rec.Seq > sel.seq {
				return false
			}
		case selPos:
			if p.Pos > sel.pos {
				return false
			}
		}
		if p.Pos >= 0 {
			found = p
		}
		return true
	})
	if err != nil {
		return Point{}, err
	}
	if sel.kind == selPos && found.Pos != sel.pos {
		return Point{}, fmt.Errorf("%w: not a consistent point", ErrNoPoint)
	}
	return found, nil
}

// walk reads the records from floor to end, calling fn with each record and
// the point at its end (Pos -1 when that end is inside a resync set), until
// fn returns false. The caller pins floor.
func (j *Journal) walk(ctx context.Context, floor Point, end int64, fn func(Point, *Record) bool) error {
	if end <= floor.Pos {
		return nil
	}
	r, err := newReader(j.segments(), floor.Pos, end, nil)
	if err != nil {
		return err
	}
	defer r.close()
	depth, seq := 0, floor.Seq
	for n := 0; ; n++ {
		if n%1024 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		rec, _, e, err := r.next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch rec.Kind {
		case KindResyncBegin:
			depth = 1
		case KindResyncEnd:
			depth = 0
		}
		if rec.HasSeq {
			seq = rec.Seq
		}
		p := Point{Pos: -1}
		if depth == 0 {
			p = Point{Pos: e, Seq: seq, Time: rec.Time}
		}
		if !fn(p, &rec) {
			return nil
		}
	}
}

// Points calls fn with every consistent point in the retention window,
// oldest first (the oldest recoverable point, then every record end outside
// resync sets up to the newest durable consistent point), until fn returns
// false.
func (j *Journal) Points(ctx context.Context, fn func(Point) bool) error {
	floor := j.Oldest()
	id := j.applier.pin(floor.Pos)
	defer j.applier.unpin(id)
	if floor = j.Oldest(); !fn(floor) {
		return nil
	}
	return j.walk(ctx, floor, j.Newest().Pos, func(p Point, _ *Record) bool {
		return p.Pos < 0 || fn(p)
	})
}

// Scan calls fn with every durable record from the oldest recoverable point on, in
// journal order, with the positions of its start and end, until fn returns
// an error (which Scan returns). rec.Data is valid only during the call.
func (j *Journal) Scan(ctx context.Context, fn func(rec Record, start, end int64) error) error {
	floor := j.Oldest()
	id := j.applier.pin(floor.Pos)
	defer j.applier.unpin(id)
	floor = j.Oldest()
	j.mu.Lock()
	end := j.durable
	j.mu.Unlock()
	if end <= floor.Pos {
		return nil
	}
	r, err := newReader(j.segments(), floor.Pos, end, nil)
	if err != nil {
		return err
	}
	defer r.close()
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		rec, s, e, err := r.next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := fn(rec, s, e); err != nil {
			return err
		}
	}
}

// Recovered describes a materialized point.
type Recovered struct {
	Point Point
	// Volumes are the images written, with their sizes at the point.
	Volumes []RecoveredVolume
}

// RecoveredVolume is one materialized volume image.
type RecoveredVolume struct {
	Name string
	Size int64
	Path string
}

// Materialize writes every volume of the VM as it was at the consistent
// point sel selects, as outDir/NAME.img (outDir is created if needed; an
// existing image there is an error, never overwritten): a copy of the base
// image (a reflink where the file system can, else copy_file_range, else a
// plain copy) with the journal replayed up to the point. The images and
// outDir are fsynced before it returns. It never writes the base images or
// the journal; the applier waits while the base images are copied. On error
// (ctx ended, ENOSPC in outDir) the images written so far stay in outDir.
func (j *Journal) Materialize(ctx context.Context, sel Selector, outDir string) (Recovered, error) {
	a := &j.applier
	a.run.RLock()
	unlocked := false
	unlock := func() {
		if !unlocked {
			unlocked = true
			a.run.RUnlock()
		}
	}
	defer unlock()
	a.mu.Lock()
	st, aerr := a.st, a.err
	a.mu.Unlock()
	if aerr != nil && st.Target != st.Base {
		return Recovered{}, fmt.Errorf("materialize: base images may be mid-apply: %w", aerr)
	}
	id := a.pin(st.Base.Pos)
	defer a.unpin(id)
	p, err := j.resolve(ctx, sel, st.Base)
	if err != nil {
		return Recovered{}, fmt.Errorf("materialize %s: %w", sel, err)
	}
	tgt, err := j.store.Target(outDir, st.Base)
	if err != nil {
		return Recovered{}, fmt.Errorf("materialize: %w", err)
	}
	out := &imageSet{sizes: map[string]int64{}, files: map[string]Image{}, syncDir: tgt.Sync,
		open: func(vol string, _ bool) (Image, error) { return tgt.CreateImage(vol) }}
	defer out.close()
	for _, v := range st.Volumes {
		src, err := j.store.OpenImage(v.Name, false)
		if err != nil {
			return Recovered{}, fmt.Errorf("materialize: copy %s: %w", v.Name, err)
		}
		f, err := tgt.CopyImage(ctx, v.Name, src, v.Size)
		src.Close()
		if err != nil {
			return Recovered{}, fmt.Errorf("materialize: copy %s: %w", v.Name, err)
		}
		out.files[v.Name] = f
		out.sizes[v.Name] = v.Size
	}
	unlock() // the pin keeps the segments; the base images are copied
	if p.Pos > st.Base.Pos {
		r, err := newReader(j.segments(), st.Base.Pos, p.Pos, nil)
		if err != nil {
			return Recovered{}, fmt.Errorf("materialize: %w", err)
		}
		defer r.close()
		for n := 0; ; n++ {
			if n%1024 == 0 && ctx.Err() != nil {
				return Recovered{}, ctx.Err()
			}
			rec, _, _, err := r.next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return Recovered{}, fmt.Errorf("materialize: %w", err)
			}
			if err := out.apply(&rec); err != nil {
				return Recovered{}, fmt.Errorf("materialize: %w", err)
			}
		}
	}
	out.created = true
	if err := out.sync(); err != nil {
		return Recovered{}, fmt.Errorf("materialize: %w", err)
	}
	rv := Recovered{Point: p}
	for _, v := range sortedVolumes(out.sizes) {
		rv.Volumes = append(rv.Volumes, RecoveredVolume{Name: v.Name, Size: v.Size, Path: out.files[v.Name].Name()})
	}
	return rv, nil
}

// copyImage copies src (size bytes) to a new file dst and returns dst open
// for writing: FICLONE (a reflink) where the file system can, else the data
// extents only (SEEK_DATA/SEEK_HOLE; holes stay holes), each with
// copy_file_range, else read and write.
func copyImage(src, dst string, size int64) (*os.File, error) {
	in, err := os.Open(src)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*os.File, error) {
		out.Close()
		os.Remove(dst)
		return nil, err
	}
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err == nil {
		if err := out.Truncate(size); err != nil {
			return fail(err)
		}
		return out, nil
	}
	if err := out.Truncate(size); err != nil {
		return fail(err)
	}
	ifd := int(in.Fd())
	for pos := int64(0); pos < size; {
		data, err := unix.Seek(ifd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole up to the end
		}
		hole := size
		if err == nil {
			if hole, err = unix.Seek(ifd, data, unix.SEEK_HOLE); err != nil {
				return fail(err)
			}
		} else {
			data = pos // no SEEK_DATA: copy everything
		}
		hole = min(hole, size)
		if data >= size {
			break
		}
		if err := copyRange(in, out, data, hole-data); err != nil {
			return fail(err)
		}
		pos = hole
	}
	return out, nil
}

// copyRange copies n bytes at off from in to out: copy_file_range, else
// read and write.
func copyRange(in, out *os.File, off, n int64) error {
	roff, woff := off, off
	for n > 0 {
		c, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(min(n, 1<<30)), 0)
		if err != nil || c == 0 {
			break
		}
		n -= int64(c)
	}
	if n == 0 {
		return nil
	}
	buf := make([]byte, 1<<20)
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := in.ReadAt(buf[:c], roff); err != nil {
			return err
		}
		if _, err := out.WriteAt(buf[:c], woff); err != nil {
			return err
		}
		roff += c
		woff += c
		n -= c
	}
	return nil
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "the start"
	}
	return t.UTC().Format(time.RFC3339Nano)
}
