package mapper

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// CacheMode says whether a device's file and block-device backends go
// through the host's page cache, as QEMU's cache.direct.
type CacheMode int

const (
	// CacheWriteback reads and writes through the page cache (the
	// default); a flush makes completed writes durable with fdatasync.
	CacheWriteback CacheMode = iota
	// CacheNone opens backends with O_DIRECT: I/O bypasses the page
	// cache, a flush still issues fdatasync for the disk's own cache.
	CacheNone
)

// ParseCacheMode parses "writeback" (or "") and "none".
func ParseCacheMode(s string) (CacheMode, error) {
	switch s {
	case "", "writeback":
		return CacheWriteback, nil
	case "none":
		return CacheNone, nil
	}
	return 0, Errorf(ErrInvalid, "cache %q: want \"writeback\" or \"none\"", s)
}

func (c CacheMode) String() string {
	if c == CacheNone {
		return "none"
	}
	return "writeback"
}

// directAlign finds what O_DIRECT I/O on b must be aligned to: memAlign
// for buffer addresses and lengths, offAlign for file offsets and
// transfer lengths (the logical block size). statx(STATX_DIOALIGN) says
// where the kernel supports it (Linux 6.1); otherwise a block device's
// logical block size serves for both, and a file's 4096.
func (b *fileBackend) directAlign() error {
	var st unix.Statx_t
	err := unix.Statx(b.fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st)
	if err == nil && st.Mask&unix.STATX_DIOALIGN != 0 {
		if st.Dio_offset_align == 0 {
			return fmt.Errorf("%s: the file system refuses O_DIRECT (cache = \"none\")", b.name)
		}
		b.memAlign, b.offAlign = int(st.Dio_mem_align), int(st.Dio_offset_align)
	} else {
		b.memAlign, b.offAlign = 4096, 4096
	}
	if b.block {
		lbs, err := unix.IoctlGetInt(b.fd, unix.BLKSSZGET)
		if err != nil {
			return fmt.Errorf("logical block size of %s: %w", b.name, err)
		}
		b.offAlign = max(b.offAlign, lbs)
		if st.Mask&unix.STATX_DIOALIGN == 0 {
			b.memAlign = lbs
		}
	}
	b.memAlign = max(b.memAlign, 1)
	return nil
}

// openDirect opens path with O_DIRECT; a file system that refuses it
// (ramfs, some FUSE and network file systems) gets a clear error.
func openDirect(path string, flag int) (*os.File, error) {
	f, err := os.OpenFile(path, flag|unix.O_DIRECT, 0)
	if errors.Is(err, unix.EINVAL) {
		return nil, fmt.Errorf("%s: the file system refuses O_DIRECT (cache = \"none\"): %w", path, err)
	}
	return f, err
}

// BlockSize returns the logical block size O_DIRECT I/O on b needs, 512
// without O_DIRECT.
func (b *fileBackend) BlockSize() int {
	if !b.direct {
		return 1 << SectorShift
	}
	return max(b.offAlign, 1<<SectorShift)
}

// aligned reports whether bufs at off can go to the kernel as they are
// under O_DIRECT.
func (b *fileBackend) aligned(bufs [][]byte, off int64) bool {
	if off%int64(b.offAlign) != 0 {
		return false
	}
	total := 0
	m := uintptr(b.memAlign - 1)
	for _, v := range bufs {
		if len(v) == 0 {
			continue
		}
		if uintptr(unsafe.Pointer(&v[0]))&m != 0 || uintptr(len(v))&m != 0 {
			return false
		}
		total += len(v)
	}
	return total%b.offAlign == 0
}

// bounceSize is the size of the aligned buffers unaligned O_DIRECT I/O
// goes through, a chunk at a time.
const bounceSize = 1 << 20

// bouncePool holds aligned bounce buffers of bounceSize bytes.
var bouncePool = sync.Pool{New: func() any {
	raw := make([]byte, bounceSize+4096)
	skip := int(-uintptr(unsafe.Pointer(&raw[0])) & 4095)
	buf := raw[skip : skip+bounceSize : skip+bounceSize]
	return &buf
}}

// bounce performs an O_DIRECT read or write whose guest buffers are not
// aligned, through an aligned buffer. The offset and length must still be
// multiples of the logical block size: a request that is not is refused
// (its device was exported with a smaller logical block size than the
// backend's, or its table maps it to an unaligned offset).
func (b *fileBackend) bounce(write bool, bufs [][]byte, off int64) error {
	total := BufsLen(bufs)
	if off%int64(b.offAlign) != 0 || total%b.offAlign != 0 {
		return Errorf(ErrInvalid, "%s: O_DIRECT I/O of %d bytes at %d: not a multiple of the backend's %d-byte logical block",
			b.name, total, off, b.offAlign)
	}
	if b.memAlign > 4096 {
		return Errorf(ErrInvalid, "%s: O_DIRECT memory alignment %d: larger than a page", b.name, b.memAlign)
	}
	bp := bouncePool.Get().(*[]byte)
	defer bouncePool.Put(bp)
	var vec [8][]byte
	done := 0
	for done < total {
		n := min(total-done, bounceSize)
		part := SliceBufs(vec[:0], bufs, done, n)
		chunk := [][]byte{(*bp)[:n]}
		if write {
			gatherBufs(chunk[0], part)
			if err := b.writev(chunk, off+int64(done), ioBlocking); err != nil {
				return err
			}
		} else {
			if err := b.readv(chunk, off+int64(done), ioBlocking); err != nil {
				return err
			}
			scatterBufs(part, chunk[0])
		}
		done += n
	}
	return nil
}

// gatherBufs copies bufs, in order, to dst.
func gatherBufs(dst []byte, bufs [][]byte) {
	for _, v := range bufs {
		dst = dst[copy(dst, v):]
	}
}

// scatterBufs copies src, in order, to bufs.
func scatterBufs(bufs [][]byte, src []byte) {
	for _, v := range bufs {
		src = src[copy(v, src):]
	}
}
