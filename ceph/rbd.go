//go:build ceph

package ceph

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/ceph/go-ceph/rbd"

	"github.com/vhostdm/vhostdm/mapper"
)

// Vector I/O. librbd has scatter-gather calls (rbd_aio_readv and
// rbd_aio_writev), but go-ceph v0.30.0 does not wrap them and keeps the
// image handle unexported, so they cannot be reached without a second
// librbd binding. Each librbd call is a round trip to an OSD (a read
// always, a write when the cache is off), so a request of many small
// vectors is gathered into one bounce buffer and issued as one call; a
// vector of directRun bytes or more goes to librbd as it is, with no copy.
const (
	directRun = 64 << 10 // vectors this large are passed straight through
	bounceMax = 1 << 20  // the largest gathered run
)

var bouncePool = sync.Pool{New: func() any { b := make([]byte, bounceMax); return &b }}

// identity is what makes two opens the same storage.
type identity struct {
	pool int64
	ns   string
	id   string // the image's id, stable across renames
	snap string
}

// image is one open librbd image, shared by the handles of one Opener.
type image struct {
	img      *rbd.Image
	name     string
	identity identity
	size     atomic.Int64 // the size last seen; refreshed past it
	refs     int          // guarded by Opener.mu
}

func (b *image) close() error {
	err := b.img.Flush()
	if cerr := b.img.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("close %s: %w", b.name, err)
	}
	return nil
}

// handle is one table's use of an image: a mapper.Backend.
type handle struct {
	*image
	name string
	o    *Opener
	key  imageKey
	once sync.Once
}

var (
	_ mapper.Backend    = (*handle)(nil)
	_ mapper.Identifier = (*handle)(nil)
	_ mapper.Marker     = (*handle)(nil)
)

func (h *handle) Name() string { return h.name }

// Identity implements mapper.Identifier: pool, namespace, image id and
// snapshot.
func (h *handle) Identity() any { return h.identity }

func (h *handle) Close() error {
	var err error
	h.once.Do(func() { err = h.o.release(h.key) })
	return err
}

// run is a stretch of a request's vectors issued as one librbd call.
type run struct {
	bufs  [][]byte
	n     int
	large bool // one vector passed straight through
}

// runs splits bufs into runs: each large vector alone, consecutive small
// ones gathered up to bounceMax bytes.
func runs(bufs [][]byte, fn func(r run, off int64) error, off int64) error {
	var cur run
	emit := func() error {
		if cur.n == 0 {
			return nil
		}
		err := fn(cur, off)
		off += int64(cur.n)
		cur = run{}
		return err
	}
	for _, v := range bufs {
		if len(v) == 0 {
			continue
		}
		if len(v) >= directRun {
			if err := emit(); err != nil {
				return err
			}
			cur = run{bufs: [][]byte{v}, n: len(v), large: true}
			if err := emit(); err != nil {
				return err
			}
			continue
		}
		if cur.n+len(v) > bounceMax {
			if err := emit(); err != nil {
				return err
			}
		}
		cur.bufs = append(cur.bufs, v)
		cur.n += len(v)
	}
	return emit()
}

// ReadAt implements mapper.Backend. Past the image's end reads zeros.
func (h *handle) ReadAt(bufs [][]byte, off int64) error {
	return runs(bufs, func(r run, off int64) error {
		if r.large || len(r.bufs) == 1 {
			return h.read(r.bufs[0], off)
		}
		bp := bouncePool.Get().(*[]byte)
		defer bouncePool.Put(bp)
		buf := (*bp)[:r.n]
		if err := h.read(buf, off); err != nil {
			return err
		}
		for _, v := range r.bufs {
			buf = buf[copy(v, buf):]
		}
		return nil
	}, off)
}

// read fills p from off, zeros past the end of the image.
func (h *handle) read(p []byte, off int64) error {
	end := off + int64(len(p))
	if end > h.size.Load() {
		sz, err := h.img.GetSize()
		if err != nil {
			return fmt.Errorf("read %s at %d: size: %w", h.name, off, err)
		}
		h.size.Store(int64(sz))
		if end > int64(sz) {
			valid := max(int64(sz)-off, 0)
			clear(p[valid:])
			p = p[:valid]
		}
	}
	for len(p) > 0 {
		n, err := h.img.ReadAt(p, off)
		if n == 0 && errors.Is(err, io.EOF) { // shrunk meanwhile
			clear(p)
			return nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return mapper.WithClass(fmt.Errorf("read %s at %d+%d: %w", h.name, off, len(p), err), mapper.ErrIO)
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// WriteAt implements mapper.Backend.
func (h *handle) WriteAt(bufs [][]byte, off int64) error {
	return runs(bufs, func(r run, off int64) error {
		if r.large || len(r.bufs) == 1 {
			return h.write(r.bufs[0], off)
		}
		bp := bouncePool.Get().(*[]byte)
		defer bouncePool.Put(bp)
		buf := (*bp)[:0]
		for _, v := range r.bufs {
			buf = append(buf, v...)
		}
		return h.write(buf, off)
	}, off)
}

func (h *handle) write(p []byte, off int64) error {
	n, err := h.img.WriteAt(p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return mapper.WithClass(fmt.Errorf("write %s at %d+%d: %w", h.name, off, len(p), err), mapper.ErrIO)
	}
	return nil
}

// Flush implements mapper.Backend with rbd_flush: librbd's cache writes
// back, and every write completed before is durable in the cluster.
func (h *handle) Flush() error {
	if err := h.img.Flush(); err != nil {
		return mapper.WithClass(fmt.Errorf("flush %s: %w", h.name, err), mapper.ErrIO)
	}
	return nil
}

// Discard implements mapper.Backend with rbd_discard. librbd may keep
// the data of a range that covers only part of an object (as a block
// device's discard may).
func (h *handle) Discard(off, n int64) error {
	if _, err := h.img.Discard(uint64(off), uint64(n)); err != nil {
		return mapper.WithClass(fmt.Errorf("discard %s at %d+%d: %w", h.name, off, n, err), mapper.ErrIO)
	}
	return nil
}

// zeroSector is the pattern of write-zeroes.
var zeroSector [mapper.SectorSize]byte

// WriteZeroes implements mapper.Backend with rbd_writesame of a zero
// sector: go-ceph v0.30.0 has no rbd_write_zeroes. librbd turns a
// zero write-same into a zeroing discard (rbd_discard_on_zeroed_write_same,
// on by default), which deallocates whole objects and zeroes partial
// ones, whatever unmap says.
func (h *handle) WriteZeroes(off, n int64, unmap bool) error {
	if off%mapper.SectorSize != 0 || n%mapper.SectorSize != 0 {
		return mapper.Errorf(mapper.ErrInvalid, "write-zeroes %s at %d+%d: not sector aligned", h.name, off, n)
	}
	for n > 0 {
		c := min(n, 1<<30) // librbd takes a size_t; keep each call bounded
		got, err := h.img.WriteSame(uint64(off), uint64(c), zeroSector[:], 0)
		if err == nil && got != c {
			err = io.ErrShortWrite
		}
		if err != nil {
			return mapper.WithClass(fmt.Errorf("write-zeroes %s at %d+%d: %w", h.name, off, c, err), mapper.ErrIO)
		}
		off += c
		n -= c
	}
	return nil
}

// Size implements mapper.Backend: the image's (or snapshot's) size now.
func (h *handle) Size() (int64, error) {
	sz, err := h.img.GetSize()
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", h.name, err)
	}
	h.size.Store(int64(sz))
	return int64(sz), nil
}

// Mark implements mapper.Marker with a snapshot named MarkSnapPrefix+tag:
// rbd_flush, then a snapshot of the image (one of that name already is
// replaced). The token is the snapshot's name and id. A snapshot or a
// read-only open cannot change: nothing is marked.
//
// The snapshot costs nothing while the daemon is stopped; the first
// write to each object after it copies the object, so ChangedSince, at
// the next start, removes it before the guest writes.
func (h *handle) Mark(tag string) (string, error) {
	if h.key.readOnly || h.identity.snap != "" {
		return "", nil
	}
	if err := h.img.Flush(); err != nil {
		return "", fmt.Errorf("flush %s: %w", h.name, err)
	}
	tag = MarkSnapPrefix + tag
	if id, ok, err := h.snapID(tag); err != nil {
		return "", err
	} else if ok {
		if err := h.img.GetSnapshot(tag).Remove(); err != nil {
			return "", fmt.Errorf("%s: remove the earlier snapshot %q (id %d): %w", h.name, tag, id, explain(err))
		}
	}
	if _, err := h.img.CreateSnapshot(tag); err != nil {
		return "", fmt.Errorf("%s: snapshot %q: %w", h.name, tag, explain(err))
	}
	id, ok, err := h.snapID(tag)
	if err != nil {
		return "", err
	}
	if !ok {
		return "", fmt.Errorf("%s: snapshot %q is not listed after its creation", h.name, tag)
	}
	return tag + "@" + strconv.FormatUint(id, 10), nil
}

// snapID returns the id of the image's snapshot named name.
func (h *handle) snapID(name string) (uint64, bool, error) {
	snaps, err := h.img.GetSnapshotNames()
	if err != nil {
		return 0, false, fmt.Errorf("%s: list snapshots: %w", h.name, explain(err))
	}
	for _, s := range snaps {
		if s.Name == name {
			return s.Id, true, nil
		}
	}
	return 0, false, nil
}

// ChangedSince implements mapper.Marker: rbd_diff_iterate2 from the
// mark's snapshot to the image as it is (whole objects, which the object
// map answers without reading them where the image has fast-diff), then
// the snapshot is removed. A snapshot that is gone, or was replaced (its
// id differs), is reported as a change: what happened cannot be told.
func (h *handle) ChangedSince(token string) (string, error) {
	i := strings.LastIndexByte(token, '@')
	want, err := strconv.ParseUint(token[i+1:], 10, 64)
	if i <= 0 || err != nil {
		return "", fmt.Errorf("%s: malformed mark %q", h.name, token)
	}
	name := token[:i]
	id, ok, err := h.snapID(name)
	switch {
	case err != nil:
		return "", err
	case !ok:
		return fmt.Sprintf("the snapshot %q that marked %s when vhostdm stopped writing it is gone: whether it was written since cannot be told", name, h.name), nil
	case id != want:
		return fmt.Sprintf("the snapshot %q that marked %s when vhostdm stopped writing it was replaced (id %d, not %d): whether it was written since cannot be told", name, h.name, id, want), nil
	}
	var changed, extents uint64
	size, err := h.img.GetSize()
	if err == nil {
		err = h.diff(name, size, &changed, &extents)
	}
	// Removed whether or not the comparison worked: left in place it
	// would cost a copy of every object the guest writes next.
	if rerr := h.img.GetSnapshot(name).Remove(); rerr != nil {
		h.o.log.Warn("removing the snapshot that marked an rbd image failed; remove it by hand (rbd snap rm)", "image", h.name, "snapshot", name, "err", explain(rerr))
	}
	if err != nil {
		return "", fmt.Errorf("%s: compare with snapshot %q: %w", h.name, name, explain(err))
	}
	if changed == 0 {
		return "", nil
	}
	return fmt.Sprintf("%s was written while vhostdm did not serve it (%d bytes in %d changed extents of whole objects since snapshot %q)", h.name, changed, extents, name), nil
}

// diff adds up the extents that changed since snapshot name over the
// first size bytes of the image (whole objects).
func (h *handle) diff(name string, size uint64, changed, extents *uint64) error {
	return h.img.DiffIterate(rbd.DiffIterateConfig{
		SnapName: name, Offset: 0, Length: size,
		IncludeParent: rbd.ExcludeParent, WholeObject: rbd.EnableWholeObject,
		Callback: func(_, n uint64, _ int, _ any) int {
			*changed += n
			*extents++
			return 0
		},
	})
}
