package journal

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DirStore returns the Store of a VM's directory (FORMAT.md): segment
// files under dir/journal, base images dir/VOLUME.img (preallocated),
// state dir/state.json, lock dir/lock. The directory is created at Lock.
func DirStore(dir string) Store { return &dirStore{dir: dir, segDir: filepath.Join(dir, segDirName)} }

type dirStore struct {
	dir, segDir string
}

func (s *dirStore) String() string { return s.dir }

func (s *dirStore) Lock() (io.Closer, error) {
	if err := os.MkdirAll(s.segDir, 0o700); err != nil {
		return nil, err
	}
	if err := syncDir(s.dir); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(s.dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("%w: %w", ErrInUse, err)
	}
	return lock, nil
}

func (s *dirStore) Segments() ([]int64, error) {
	segs, err := listSegments(s.segDir)
	if err != nil {
		return nil, err
	}
	starts := make([]int64, len(segs))
	for i, sg := range segs {
		starts[i] = sg.start
	}
	return starts, nil
}

func (s *dirStore) SegmentName(start int64) string { return filepath.Join(s.segDir, segName(start)) }

func (s *dirStore) CreateSegment(start int64) (Segment, error) {
	f, err := os.OpenFile(s.SegmentName(start), os.O_RDWR|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	return newFileSegment(f), nil
}

func (s *dirStore) OpenSegment(start int64) (Segment, error) {
	f, err := os.OpenFile(s.SegmentName(start), os.O_RDWR|os.O_APPEND, 0)
	if err != nil {
		return nil, err
	}
	return newFileSegment(f), nil
}

func (s *dirStore) RemoveSegment(start int64) error {
	if err := os.Remove(s.SegmentName(start)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func (s *dirStore) SyncSegments() error { return syncDir(s.segDir) }

func (s *dirStore) StateName() string { return filepath.Join(s.dir, stateFile) }

func (s *dirStore) GetState() ([]byte, error) {
	path := s.StateName()
	_ = os.Remove(path + ".tmp")
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return b, err
}

// PutState replaces the state file durably (ReplaceFile).
func (s *dirStore) PutState(b []byte) error { return ReplaceFile(s.StateName(), b) }

// ReplaceFile replaces path with data durably: write a temporary file,
// fsync, rename, fsync the directory. The hub's own state files use it
// too.
func ReplaceFile(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func (s *dirStore) OpenImage(vol string, create bool) (Image, error) {
	return openFileImage(filepath.Join(s.dir, vol+imageSuffix), create, false, true)
}

func (s *dirStore) SyncImages() error { return syncDir(s.dir) }

func (s *dirStore) Probe(hook func(op, name string) error) error {
	path := filepath.Join(s.segDir, probeName)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	defer f.Close()
	if err := hook("segment-write", path); err != nil {
		return err
	}
	if _, err := f.Write(make([]byte, 4096)); err != nil {
		return err
	}
	if err := hook("segment-sync", path); err != nil {
		return err
	}
	return unix.Fdatasync(int(f.Fd()))
}

func (s *dirStore) Target(out string, _ Point) (Target, error) {
	if err := os.MkdirAll(out, 0o700); err != nil {
		return nil, err
	}
	return dirTarget(out), nil
}

// fileSegment is a segment file opened with O_APPEND. iov is AppendV's
// reused vector (the writer's only: one appender at a time); rs runs
// Sync's fdatasync (ringSync: on an io_uring worker while the caller
// waits in the poller).
type fileSegment struct {
	*os.File
	iov *[]unix.Iovec
	rs  *ringSync
}

func newFileSegment(f *os.File) fileSegment {
	return fileSegment{File: f, iov: new([]unix.Iovec), rs: new(ringSync)}
}

func (f fileSegment) Close() error {
	f.rs.close()
	return f.File.Close()
}

func (f fileSegment) Append(b []byte) error {
	_, err := f.Write(b)
	return err
}

// AppendV appends bufs with writev (IOV_MAX slices at a time), from a
// vector reused across calls (unix.Writev allocates one per call).
func (f fileSegment) AppendV(bufs [][]byte) error {
	fd := f.Fd()
	for len(bufs) > 0 {
		k := min(len(bufs), iovMax)
		iov := (*f.iov)[:0]
		for _, b := range bufs[:k] {
			v := unix.Iovec{Base: unsafe.SliceData(b)}
			v.SetLen(len(b))
			iov = append(iov, v)
		}
		*f.iov = iov
		r, _, e := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(unsafe.SliceData(iov))), uintptr(len(iov)))
		clear(iov) // no references to written buffers stay
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		n := int(r)
		if n == 0 {
			return io.ErrShortWrite
		}
		// Skip what was written; a partial slice stays, shortened.
		for n > 0 {
			if n >= len(bufs[0]) {
				n -= len(bufs[0])
				bufs = bufs[1:]
			} else {
				bufs[0] = bufs[0][n:]
				n = 0
			}
		}
	}
	return nil
}

// iovMax is Linux's IOV_MAX.
const iovMax = 1024

func (f fileSegment) Sync() error { return f.rs.datasync(int(f.Fd())) }

// overlapSync marks a file as one that may be synced while appended to:
// fdatasync and writev on one descriptor, from two goroutines.
func (fileSegment) overlapSync() {}

// DropCache gives the synced bytes [off, off+n) back to the kernel's page
// cache. Advice only: an error changes nothing.
func (f fileSegment) DropCache(off, n int64) {
	unix.Fadvise(int(f.Fd()), off, n, unix.FADV_DONTNEED)
}

func (f fileSegment) Size() (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (f fileSegment) Truncate(size int64) error {
	if err := f.File.Truncate(size); err != nil {
		return err
	}
	return f.File.Sync()
}

// fileImage is an image file; prealloc: Resize grows it with fallocate
// and Zero keeps the blocks.
type fileImage struct {
	*os.File
	prealloc bool
}

// openFileImage opens (with create, creating; with excl, only creating)
// an image file.
func openFileImage(path string, create, excl, prealloc bool) (Image, error) {
	flags := os.O_RDWR
	if create {
		flags |= os.O_CREATE
	}
	if excl {
		flags |= os.O_EXCL
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, err
	}
	return &fileImage{File: f, prealloc: prealloc}, nil
}

func (f *fileImage) Size() (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (f *fileImage) Resize(size int64) error {
	cur, err := f.Size()
	if err != nil {
		return err
	}
	switch {
	case size > cur && f.prealloc:
		err = unix.Fallocate(int(f.Fd()), 0, cur, size-cur)
		if errors.Is(err, unix.EOPNOTSUPP) {
			err = f.Truncate(size)
		}
	case size != cur:
		err = f.Truncate(size)
	}
	return err
}

func (f *fileImage) Zero(off, n int64) error { return zeroRange(f.File, off, n, f.prealloc) }

// dirTarget materializes into a directory: OUT/VOLUME.img.
type dirTarget string

func (d dirTarget) path(vol string) string { return filepath.Join(string(d), vol+imageSuffix) }

func (d dirTarget) CopyImage(_ context.Context, vol string, src Image, size int64) (Image, error) {
	f, err := copyImage(src.Name(), d.path(vol), size)
	if err != nil {
		return nil, err
	}
	return &fileImage{File: f}, nil
}

func (d dirTarget) CreateImage(vol string) (Image, error) {
	return openFileImage(d.path(vol), true, true, false)
}

func (d dirTarget) Sync() error { return syncDir(string(d)) }
