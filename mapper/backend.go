package mapper

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Backend is storage that targets read and write, addressed in bytes.
// All methods may be called concurrently.
type Backend interface {
	// ReadAt fills bufs from byte offset off. Reading past the end of the
	// storage yields zeros.
	ReadAt(bufs [][]byte, off int64) error
	// WriteAt writes bufs at byte offset off.
	WriteAt(bufs [][]byte, off int64) error
	// Flush makes every completed write durable.
	Flush() error
	// Discard deallocates [off, off+n); later reads return zeros or the
	// old data, as a block device's discard does.
	Discard(off, n int64) error
	// WriteZeroes makes [off, off+n) read as zeros; unmap allows the
	// storage to deallocate the range while doing so.
	WriteZeroes(off, n int64, unmap bool) error
	// Size returns the size in bytes.
	Size() (int64, error)
	// Name returns the name the backend was opened by.
	Name() string
	// Close releases the backend.
	Close() error
}

// Identifier is a Backend that can say which storage it reaches: two
// backends with equal identities are the same storage (the same open file
// or the same mapper device), whatever names they were opened by. Targets
// that share state per storage (snapshot origins) key it by identity.
type Identifier interface {
	Identity() any
}

// Identity returns b's identity if it has one, else b itself.
func Identity(b Backend) any {
	if id, ok := b.(Identifier); ok {
		return id.Identity()
	}
	return b
}

// Truncater is a Backend whose size can be cut or extended (regular
// files): image-format targets (ploop) repair files with it.
type Truncater interface {
	Truncate(size int64) error
}

// MapBackend performs r at sector of backend b: the last step of every
// target that passes I/O through unchanged (linear, striped, the paths of
// multipath, snapshot origins). A FUA write is followed by a flush.
func MapBackend(b Backend, sector uint64, r *Request) error {
	off := int64(sector << SectorShift)
	switch r.Op {
	case OpRead:
		return b.ReadAt(r.Data, off)
	case OpWrite:
		if err := b.WriteAt(r.Data, off); err != nil {
			return err
		}
		if r.FUA {
			return b.Flush()
		}
		return nil
	case OpFlush:
		return b.Flush()
	case OpDiscard:
		return b.Discard(off, int64(r.Bytes()))
	case OpWriteZeroes:
		return b.WriteZeroes(off, int64(r.Bytes()), r.Unmap)
	}
	return ErrUnsupported
}

// maxIOV is the kernel's IOV_MAX: the most vectors one preadv takes.
const maxIOV = 1024

// fileBackend is a regular file or a block device.
type fileBackend struct {
	name  string
	f     *os.File
	fd    int
	block bool // a block device: discard and zeroing by ioctl

	// Flush coalescing: writeGen counts completed writes, flushedGen is
	// the writeGen value before the last successful fdatasync started.
	// A Flush with nothing completed since then returns at once, so a
	// 1000-line table over one file costs one fdatasync per flush.
	writeGen   atomic.Uint64
	flushedGen atomic.Uint64
	flushMu    sync.Mutex

	// Set when the kernel or the file system refused RWF_NOWAIT for
	// reads or writes (EOPNOTSUPP, or EINVAL from kernels that take
	// non-blocking buffered writes only on some file systems): the Try
	// methods then return ErrWouldBlock at once.
	noNowaitRead, noNowaitWrite atomic.Bool

	// direct: opened with O_DIRECT (cache = "none"); I/O whose buffers
	// are not aligned to memAlign goes through a bounce buffer, and
	// offsets and lengths must be multiples of offAlign.
	direct             bool
	memAlign, offAlign int

	// onRaw, if set (by tests only), is called when a read or write
	// takes the raw system call path (ioNowaitRaw).
	onRaw func()
}

// OpenFile opens a regular file or block device as a Backend.
func OpenFile(path string, readOnly bool) (Backend, error) {
	return openFile(path, readOnly, CacheWriteback)
}

// OpenFileCache is OpenFile with a cache mode: CacheNone opens with
// O_DIRECT and fails with a clear error where the file system refuses it.
func OpenFileCache(path string, readOnly bool, cache CacheMode) (Backend, error) {
	return openFile(path, readOnly, cache)
}

func openFile(path string, readOnly bool, cache CacheMode) (*fileBackend, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	var f *os.File
	var err error
	if cache == CacheNone {
		f, err = openDirect(path, flag|unix.O_CLOEXEC)
	} else {
		f, err = os.OpenFile(path, flag|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	b := &fileBackend{name: path, f: f, fd: int(f.Fd())}
	switch m := st.Mode(); {
	case m.IsRegular():
	case m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0:
		b.block = true
	default:
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file or block device", path)
	}
	if cache == CacheNone {
		b.direct = true
		if err := b.directAlign(); err != nil {
			f.Close()
			return nil, err
		}
	}
	return b, nil
}

func (b *fileBackend) Name() string { return b.name }

func (b *fileBackend) ReadAt(bufs [][]byte, off int64) error { return b.readv(bufs, off, ioBlocking) }

func (b *fileBackend) WriteAt(bufs [][]byte, off int64) error { return b.writev(bufs, off, ioBlocking) }

// readv reads bufs at off. In the non-blocking modes the read is
// preadv2(RWF_NOWAIT): what the page cache cannot serve at once ends it
// with ErrWouldBlock (and a file system that refuses RWF_NOWAIT is
// remembered); ioNowaitRaw makes it a raw system call.
func (b *fileBackend) readv(bufs [][]byte, off int64, mode ioMode) error {
	if b.direct && !b.aligned(bufs, off) {
		return b.bounce(false, bufs, off)
	}
	nowait, raw := mode != ioBlocking, mode == ioNowaitRaw
	flags := 0
	if nowait {
		flags = unix.RWF_NOWAIT
	}
	if raw && b.onRaw != nil {
		b.onRaw()
	}
	for len(bufs) > 0 {
		n := min(len(bufs), maxIOV)
		vec := bufs[:n]
		want := BufsLen(vec)
		for want > 0 {
			got, err := rw2(unix.SYS_PREADV2, b.fd, vec, off, flags, raw)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				if nowait && wouldBlock(err, &b.noNowaitRead) {
					return ErrWouldBlock
				}
				return fmt.Errorf("read %s at %d: %w", b.name, off, err)
			}
			if got == 0 { // end of file: the rest reads as zeros
				ZeroBufs(vec)
				off += int64(want)
				break
			}
			// A short non-blocking read means part of the range is not
			// cached: the next call returns EAGAIN or reads more.
			off += int64(got)
			want -= got
			vec = advance(vec, got)
		}
		bufs = bufs[n:]
	}
	return nil
}

// writev writes bufs at off; in the non-blocking modes as
// pwritev2(RWF_NOWAIT), see readv.
func (b *fileBackend) writev(bufs [][]byte, off int64, mode ioMode) error {
	if b.direct && !b.aligned(bufs, off) {
		return b.bounce(true, bufs, off)
	}
	nowait, raw := mode != ioBlocking, mode == ioNowaitRaw
	flags := 0
	if nowait {
		flags = unix.RWF_NOWAIT
	}
	if raw && b.onRaw != nil {
		b.onRaw()
	}
	for len(bufs) > 0 {
		n := min(len(bufs), maxIOV)
		vec := bufs[:n]
		want := BufsLen(vec)
		for want > 0 {
			got, err := rw2(unix.SYS_PWRITEV2, b.fd, vec, off, flags, raw)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				if nowait && wouldBlock(err, &b.noNowaitWrite) {
					return ErrWouldBlock
				}
				return fmt.Errorf("write %s at %d: %w", b.name, off, err)
			}
			if got == 0 {
				if nowait {
					return ErrWouldBlock
				}
				return fmt.Errorf("write %s at %d: %w", b.name, off, io.ErrShortWrite)
			}
			off += int64(got)
			want -= got
			vec = advance(vec, got)
		}
		bufs = bufs[n:]
	}
	b.writeGen.Add(1)
	return nil
}

// wouldBlock reports whether err from a RWF_NOWAIT call means "try
// blocking": EAGAIN, or a file system without non-blocking I/O of that
// kind (EOPNOTSUPP, EINVAL), which unsupported records for next time.
func wouldBlock(err error, unsupported *atomic.Bool) bool {
	switch err {
	case unix.EAGAIN:
		return true
	case unix.EOPNOTSUPP, unix.EINVAL:
		unsupported.Store(true)
		return true
	}
	return false
}

// advance drops the first n bytes of vec. It copies the outer slice only
// when a vector is cut in the middle, which happens only on short I/O.
func advance(vec [][]byte, n int) [][]byte {
	for n > 0 && len(vec) > 0 {
		if n >= len(vec[0]) {
			n -= len(vec[0])
			vec = vec[1:]
			continue
		}
		out := make([][]byte, len(vec))
		copy(out, vec)
		out[0] = out[0][n:]
		return out
	}
	return vec
}

func (b *fileBackend) Flush() error {
	gen := b.writeGen.Load()
	if b.flushedGen.Load() >= gen {
		return nil
	}
	b.flushMu.Lock()
	defer b.flushMu.Unlock()
	if b.flushedGen.Load() >= gen { // another flush covered us meanwhile
		return nil
	}
	gen = b.writeGen.Load()
	for {
		err := unix.Fdatasync(b.fd)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("flush %s: %w", b.name, err)
		}
		break
	}
	if b.flushedGen.Load() < gen {
		b.flushedGen.Store(gen)
	}
	return nil
}

func (b *fileBackend) Discard(off, n int64) error {
	if b.block {
		return b.blkRange(unix.BLKDISCARD, off, n, "discard")
	}
	err := unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err != nil {
		return fmt.Errorf("discard %s at %d+%d: %w", b.name, off, n, err)
	}
	b.writeGen.Add(1)
	return nil
}

func (b *fileBackend) WriteZeroes(off, n int64, unmap bool) error {
	if b.block {
		return b.blkRange(unix.BLKZEROOUT, off, n, "write-zeroes")
	}
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if unmap {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	err := unix.Fallocate(b.fd, mode, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) && !unmap {
		err = unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
	if errors.Is(err, unix.EOPNOTSUPP) {
		err = writeZeroes(b, off, n)
	}
	if err != nil {
		return fmt.Errorf("write-zeroes %s at %d+%d: %w", b.name, off, n, err)
	}
	b.writeGen.Add(1)
	return nil
}

// zeroPage is a shared source of zeros for writeZeroes.
var zeroPage [64 << 10]byte

// writeZeroes writes zeros through WriteAt, for storage without a zeroing call.
func writeZeroes(b Backend, off, n int64) error {
	for n > 0 {
		c := min(n, int64(len(zeroPage)))
		if err := b.WriteAt([][]byte{zeroPage[:c]}, off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

func (b *fileBackend) blkRange(req uint, off, n int64, what string) error {
	r := [2]uint64{uint64(off), uint64(n)}
	if err := ioctlPtr(b.fd, req, &r); err != nil {
		return fmt.Errorf("%s %s at %d+%d: %w", what, b.name, off, n, err)
	}
	b.writeGen.Add(1)
	return nil
}

func (b *fileBackend) Size() (int64, error) {
	if b.block {
		var sz uint64
		if err := ioctlPtr(b.fd, unix.BLKGETSIZE64, &sz); err != nil {
			return 0, fmt.Errorf("size of %s: %w", b.name, err)
		}
		return int64(sz), nil
	}
	st, err := b.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", b.name, err)
	}
	return st.Size(), nil
}

func (b *fileBackend) Close() error { return b.f.Close() }

// Truncate implements Truncater for regular files and syncs the new size.
func (b *fileBackend) Truncate(size int64) error {
	if b.block {
		return Errorf(ErrUnsupported, "truncate %s: a block device", b.name)
	}
	if err := b.f.Truncate(size); err != nil {
		return fmt.Errorf("truncate %s to %d: %w", b.name, size, err)
	}
	if err := unix.Fsync(b.fd); err != nil {
		return fmt.Errorf("truncate %s: sync: %w", b.name, err)
	}
	return nil
}

// TryReadAt implements NowaitBackend with preadv2(RWF_NOWAIT): the page
// cache serves the read or it returns ErrWouldBlock. With resident the
// preadv2 is a raw system call (Request.Resident).
//
// An O_DIRECT backend always returns ErrWouldBlock: its reads go to the
// disk, and a synchronous one waits for it whatever RWF_NOWAIT says.
func (b *fileBackend) TryReadAt(bufs [][]byte, off int64, resident bool) error {
	if b.direct || b.noNowaitRead.Load() {
		return ErrWouldBlock
	}
	return b.readv(bufs, off, nowaitMode(resident))
}

// TryWriteAt implements NowaitBackend with pwritev2(RWF_NOWAIT), raw with
// resident as TryReadAt. Where the
// file system has no non-blocking buffered writes (ext4 before 6.x) every
// write returns ErrWouldBlock after the first.
func (b *fileBackend) TryWriteAt(bufs [][]byte, off int64, resident bool) error {
	if b.direct || b.noNowaitWrite.Load() {
		return ErrWouldBlock
	}
	return b.writev(bufs, off, nowaitMode(resident))
}
