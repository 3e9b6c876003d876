package journal

import (
	"context"
	"errors"
	"io"
	"slices"
)

// The storage seam: a Journal keeps its segments, its applied state and
// its base images in a Store. DirStore (a VM's directory, the format of
// FORMAT.md) is the default; the hub's Ceph build keeps them in RADOS
// objects and RBD images. The journal's logic (records, consistent
// points, group commit, the applier) is the same over both: a Store only
// moves bytes.

// Store holds the journal of one VM. Its methods may be called
// concurrently; a Segment or Image it returns is used by one goroutine at
// a time unless it says otherwise.
type Store interface {
	// String names the store in logs and errors (a directory, a pool).
	String() string
	// Lock takes the store for this process until the returned Closer is
	// closed; another holder makes it fail with an error wrapping
	// ErrInUse.
	Lock() (io.Closer, error)

	// Segments returns the start positions of the segments, in any order.
	Segments() ([]int64, error)
	// CreateSegment creates the empty segment starting at start; it must
	// not exist. The creation is durable once SyncSegments returns.
	CreateSegment(start int64) (Segment, error)
	// OpenSegment opens an existing segment for reading and appending.
	OpenSegment(start int64) (Segment, error)
	// RemoveSegment removes a segment (a missing one is not an error);
	// durable once SyncSegments returns.
	RemoveSegment(start int64) error
	// SyncSegments makes segment creations and removals durable.
	SyncSegments() error
	// SegmentName names a segment in logs and fault hooks.
	SegmentName(start int64) string

	// GetState returns the applied state, or nil when there is none yet.
	GetState() ([]byte, error)
	// PutState replaces the applied state atomically and durably.
	PutState(b []byte) error
	// StateName names the state in logs and fault hooks.
	StateName() string

	// OpenImage opens volume vol's base image; with create a missing one
	// is created empty (size 0), else it fails with an error wrapping
	// fs.ErrNotExist.
	OpenImage(vol string, create bool) (Image, error)
	// SyncImages makes image creations durable.
	SyncImages() error

	// Probe writes and syncs a little data where segments go and removes
	// it again: is the store writable? It calls hook("segment-write",
	// name) before the write and hook("segment-sync", name) before the
	// sync, and fails with hook's error.
	Probe(hook func(op, name string) error) error

	// Target returns where Materialize writes the images of a recovered
	// point; out is the caller's name for it (a directory for DirStore),
	// base the point the base images hold while it copies them.
	Target(out string, base Point) (Target, error)
}

// Segment is one segment of the journal: a byte stream that grows by
// appends.
type Segment interface {
	// ReadAt reads as io.ReaderAt does (io.EOF past the end).
	io.ReaderAt
	// Append adds b at the end: all of it or, on error, possibly a prefix
	// (a torn tail, which Open truncates).
	Append(b []byte) error
	// Sync makes the appended bytes durable.
	Sync() error
	// Size returns the segment's length in bytes.
	Size() (int64, error)
	// Truncate cuts the segment to size bytes, durably.
	Truncate(size int64) error
	Close() error
}

// vectorAppender is a Segment that appends many slices with one write
// (all of them or, on error, possibly a prefix, as Append).
type vectorAppender interface {
	AppendV(bufs [][]byte) error
}

// cacheDropper is a Segment whose synced bytes can leave the page cache.
type cacheDropper interface {
	DropCache(off, n int64)
}

// Image is a volume's image: a base image in a Store, or a recovered one
// in a Target. A write past its end grows it, as a file grows: an apply
// pass redone after a crash writes where a later resize of that pass may
// already have shrunk the image.
type Image interface {
	io.ReaderAt
	io.WriterAt
	// Size returns the image's size in bytes.
	Size() (int64, error)
	// Resize sets the image's size; a base image grows with its blocks
	// reserved where the store can (fallocate).
	Resize(size int64) error
	// Zero makes [off, off+n) read as zeroes.
	Zero(off, n int64) error
	// Sync makes written data durable.
	Sync() error
	// Name is how a user reaches the image: a file path, or
	// rbd:POOL/IMAGE.
	Name() string
	Close() error
}

// Target receives the images Materialize writes.
type Target interface {
	// CopyImage creates volume vol's image as a copy of src (size bytes;
	// a reflink or clone where the store can) and opens it for writing.
	// An existing image is an error wrapping fs.ErrExist. Called while
	// src is quiescent.
	CopyImage(ctx context.Context, vol string, src Image, size int64) (Image, error)
	// CreateImage creates an empty image for a volume added after the
	// base; an existing one is an error wrapping fs.ErrExist.
	CreateImage(vol string) (Image, error)
	// Sync makes the images' creation durable (their data is synced
	// through Image.Sync).
	Sync() error
}

// listSegments returns the store's segments, sorted by start.
func (j *Journal) listSegments() ([]segment, error) {
	starts, err := j.store.Segments()
	if err != nil {
		return nil, err
	}
	slices.Sort(starts)
	segs := make([]segment, len(starts))
	for i, s := range starts {
		segs[i] = segment{start: s, path: j.store.SegmentName(s), st: j.store}
	}
	return segs, nil
}

// readSegment returns a whole segment's bytes.
func readSegment(st Store, start int64) ([]byte, error) {
	f, err := st.OpenSegment(start)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	b := make([]byte, size)
	n, err := f.ReadAt(b, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:n], nil
}
