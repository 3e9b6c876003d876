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

	"github.com/vhostdm/vhostdm/internal/imagelock"
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
// waits in the poller); d, once the first append found that the file
// system takes O_DIRECT, appends around the page cache (directAppender).
type fileSegment struct {
	*os.File
	iov *[]unix.Iovec
	rs  *ringSync
	d   **directAppender // *d nil: not tried yet, or buffered appends
}

func newFileSegment(f *os.File) fileSegment {
	return fileSegment{File: f, iov: new([]unix.Iovec), rs: new(ringSync), d: new(*directAppender)}
}

func (f fileSegment) Close() error {
	f.rs.close()
	if d := *f.d; d != nil {
		d.close()
	}
	return f.File.Close()
}

func (f fileSegment) Append(b []byte) error {
	return f.AppendV([][]byte{b})
}

// AppendV appends bufs: with O_DIRECT where the file system takes it
// (directAppender), else with writev (IOV_MAX slices at a time), from a
// vector reused across calls (unix.Writev allocates one per call).
func (f fileSegment) AppendV(bufs [][]byte) error {
	if d := f.direct(); d != nil {
		return d.appendV(bufs)
	}
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

// direct returns the segment's O_DIRECT appender, opening it at the first
// append; nil where the file system refuses O_DIRECT (tmpfs before Linux
// 6.6).
func (f fileSegment) direct() *directAppender {
	if *f.d == nil {
		*f.d = openDirect(f.File)
	}
	return f.appending()
}

// appending returns the segment's O_DIRECT appender if it is open, else
// nil (not appended to yet, or buffered appends).
func (f fileSegment) appending() *directAppender {
	if d := *f.d; d != nil && d.fd >= 0 {
		return d
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
// cache. Advice only: an error changes nothing. O_DIRECT appends leave
// nothing there.
func (f fileSegment) DropCache(off, n int64) {
	if f.appending() != nil {
		return
	}
	unix.Fadvise(int(f.Fd()), off, n, unix.FADV_DONTNEED)
}

func (f fileSegment) Size() (int64, error) {
	if d := f.appending(); d != nil {
		return d.size, nil
	}
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (f fileSegment) Truncate(size int64) error {
	if f.appending() != nil {
		return errors.New("journal: truncating a segment being appended to")
	}
	if err := f.File.Truncate(size); err != nil {
		return err
	}
	return f.File.Sync()
}

// directAppender appends to a segment file with O_DIRECT writes, so that
// the journal's bytes do not pass through the page cache.
//
// Why: a hub receives every protected write of its VMs and reads the
// journal back only when the retention window ends, a day later, or for a
// recovery. Buffered appends made the kernel allocate a page-cache folio
// and buffer heads for every 4 KiB, reserve delayed-allocation blocks,
// copy the bytes, write them back in the fdatasync and free the pages
// again when the journal dropped them (DropCache): the hub's profile
// under 4 KiB protected writes put 55% of its CPU in the journal's
// writev. An O_DIRECT write copies nothing in the kernel; the appender
// copies the bytes once into an aligned buffer.
//
// O_DIRECT wants file offsets, lengths and memory aligned to the device's
// logical block (512 or 4096 bytes; directAlign covers both). Records
// are not aligned, so each append rewrites the segment's last partial
// block from its start with the bytes it held (kept in the buffer's
// head) and pads the new last block with zeroes. Rewriting acknowledged
// bytes with the same bytes cannot lose them: a write torn at any point
// leaves each byte old or new, and the two are equal. The zero padding
// past the appended bytes is never a record: in the last segment, Open
// takes it for a torn tail and truncates it (as a crash's partial
// append); in an earlier one, readers stop at the next segment's start;
// close cuts it when it can.
//
// The fdatasync (Sync) is still needed: O_DIRECT bypasses the page
// cache, not the device's volatile cache nor the file's metadata.
type directAppender struct {
	fd   int      // O_DIRECT, write only; -1: O_DIRECT refused, buffered appends
	size int64    // bytes appended: the segment's logical size
	buf  []byte   // aligned; buf[:size%directAlign] holds the last partial block
	rs   ringSync // the writes, on a ring of their own (Sync runs meanwhile)
}

// directAlign is the alignment of O_DIRECT appends: a page, the largest
// logical block of common devices.
const directAlign = 4096

// openDirect opens f's file again with O_DIRECT; where that fails the
// appender has fd -1 (buffered appends for good).
func openDirect(f *os.File) *directAppender {
	d := &directAppender{fd: -1}
	fi, err := f.Stat()
	if err != nil {
		return d
	}
	fd, err := unix.Open(f.Name(), unix.O_WRONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return d // EINVAL: file systems without O_DIRECT (tmpfs before Linux 6.6)
	}
	d.size = fi.Size()
	tail := int(d.size % directAlign)
	d.buf = alignedBuf(max(64<<10, directAlign))
	if tail > 0 {
		if n, _ := f.ReadAt(d.buf[:tail], d.size-int64(tail)); n < tail {
			// The last block cannot be read back to rewrite it:
			// appends stay buffered.
			unix.Close(fd)
			return d
		}
	}
	d.fd = fd
	return d
}

// alignedBuf returns n bytes at a directAlign-aligned address.
func alignedBuf(n int) []byte {
	b := make([]byte, n+directAlign)
	off := int(-uintptr(unsafe.Pointer(unsafe.SliceData(b))) & (directAlign - 1))
	return b[off : off+n : off+n]
}

// appendV appends bufs: the last partial block and bufs, padded to a
// whole block, in one O_DIRECT write.
func (d *directAppender) appendV(bufs [][]byte) error {
	tail := int(d.size % directAlign)
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	end := tail + n
	whole := (end + directAlign - 1) &^ (directAlign - 1)
	if whole > len(d.buf) {
		nb := alignedBuf(whole + whole/4)
		copy(nb, d.buf[:tail])
		d.buf = nb
	}
	k := tail
	for _, b := range bufs {
		k += copy(d.buf[k:], b)
	}
	clear(d.buf[end:whole])
	off := d.size - int64(tail)
	for w := 0; w < whole; {
		m, err := d.rs.pwrite(d.fd, d.buf[w:whole], off+int64(w))
		if err != nil {
			return err
		}
		if m <= 0 {
			return io.ErrShortWrite
		}
		w += m
	}
	d.size += int64(n)
	if t := int(d.size % directAlign); t > 0 {
		copy(d.buf, d.buf[end-t:end])
	}
	return nil
}

// close cuts the zero padding past the appended bytes (advice: Open
// truncates what is left as a torn tail) and closes the O_DIRECT
// descriptor.
func (d *directAppender) close() {
	if d.fd < 0 {
		return
	}
	d.rs.close()
	if d.size%directAlign != 0 {
		unix.Ftruncate(d.fd, d.size)
	}
	unix.Close(d.fd)
	d.fd = -1
}

// fileImage is an image file; prealloc: Resize grows it with fallocate
// and Zero keeps the blocks. It holds QEMU's image locks as a writer
// (internal/imagelock) while open: a QEMU, qemu-img or vhostdm that would
// write the replica the hub keeps, or read it as it changes, is refused
// ("Failed to get "write" lock"), as for a running VM's disk.
type fileImage struct {
	*os.File
	prealloc bool
	unlock   func()
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
	unlock, err := imagelock.Lock(int(f.Fd()), path, true, imagelock.Auto, nil)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%w (a QEMU, qemu-img or vhostdm writing the hub's image? read it with -U, or recover a copy with repagent-hub recover)", err)
	}
	return &fileImage{File: f, prealloc: prealloc, unlock: unlock}, nil
}

// Close closes the file and releases its image locks.
func (f *fileImage) Close() error {
	err := f.File.Close()
	if f.unlock != nil {
		f.unlock()
		f.unlock = nil
	}
	return err
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
