package vhost

import (
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// Mem is a guest memory table: the regions of SET_MEM_TABLE or of
// ADD_MEM_REG/REM_MEM_REG, each mapped MAP_SHARED from the fd the front end
// sent. A Mem is immutable: a change of table builds a new Mem that shares the
// regions it keeps. Guest memory is reached only through Slice and the
// helpers below, which check every bound.
//
// A Mem's regions are unmapped by the connection only after every queue has
// stopped and every request using them has completed.
type Mem struct {
	regions []*memRegion // sorted by GPA, not overlapping
	// resident: every region is resident (memRegion.resident), so the
	// ring goroutine may make the RWF_NOWAIT reads and writes of its
	// requests raw system calls (mapper.Request.Resident).
	resident bool
}

// memRegion is one mapped region.
type memRegion struct {
	wire.MemRegion
	data    []byte // Size bytes; data[0] is guest address GPA
	mapping []byte // what to munmap; nil for memory this package did not map
	// resident: the region's pages never wait for a disk to be faulted
	// in: the fd is on tmpfs or shmem (memfd, /dev/shm) or hugetlbfs.
	// Memory mapped from a regular file on a disk file system is not.
	resident bool
}

// maxMemSlots is what GET_MAX_MEM_SLOTS answers (rust-vmm's MAX_MEM_SLOTS).
const maxMemSlots = 509

// mapRegion maps r from fd. The fd is not closed.
func mapRegion(r wire.MemRegion, fd int) (*memRegion, error) {
	page := uint64(os.Getpagesize())
	start := r.Offset &^ (page - 1)
	delta := r.Offset - start
	length := delta + r.Size
	if length < r.Size || length > 1<<47 || start > 1<<62 {
		return nil, fmt.Errorf("memory region at %#x size %#x offset %#x: too large", r.GPA, r.Size, r.Offset)
	}
	if err := checkFileSize(fd, r.Offset, r.Size); err != nil {
		return nil, fmt.Errorf("memory region at %#x size %#x offset %#x: %w", r.GPA, r.Size, r.Offset, err)
	}
	resident, err := residentFD(fd)
	if err != nil {
		return nil, fmt.Errorf("memory region at %#x size %#x offset %#x: %w", r.GPA, r.Size, r.Offset, err)
	}
	m, err := unix.Mmap(fd, int64(start), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("map memory region at %#x size %#x: %w", r.GPA, r.Size, err)
	}
	return &memRegion{MemRegion: r, data: m[delta : delta+r.Size : delta+r.Size], mapping: m, resident: resident}, nil
}

// residentFD reports whether the file fd is on a file system whose pages
// are faulted in without disk I/O: tmpfs and shmem, which memfd_create
// and /dev/shm use (TMPFS_MAGIC), and hugetlbfs, which memfd_create with
// MFD_HUGETLB and QEMU's -mem-path on a hugetlbfs mount use
// (HUGETLBFS_MAGIC). Pages of those may still be swapped out, as any
// memory of the process may, but a fault never reads or writes a file.
func residentFD(fd int) (bool, error) {
	var s unix.Statfs_t
	if err := unix.Fstatfs(fd, &s); err != nil {
		return false, fmt.Errorf("fstatfs: %w", err)
	}
	return s.Type == unix.TMPFS_MAGIC || s.Type == unix.HUGETLBFS_MAGIC, nil
}

// checkFileSize checks that fd is a regular file (memfd, tmpfs, hugetlbfs)
// holding offset+size bytes: mapping beyond the end of a file would make the
// first access fault. The front end can still shrink the file later; that
// fault is a connection error (see queue.run).
func checkFileSize(fd int, offset, size uint64) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("fd is not a regular file or memfd (mode %#o)", st.Mode&unix.S_IFMT)
	}
	end := offset + size
	if end < offset || st.Size < 0 || uint64(st.Size) < end {
		return fmt.Errorf("file of %d bytes is shorter than offset %d + size %d", st.Size, offset, size)
	}
	return nil
}

// unmap releases the region's mapping. The caller guarantees that nothing
// uses the region any more.
func (r *memRegion) unmap() {
	if r.mapping != nil {
		unix.Munmap(r.mapping)
		r.mapping, r.data = nil, nil
	}
}

// newMem builds a table from regions; they must not overlap in guest
// physical or in front-end user addresses.
func newMem(regs []*memRegion) (*Mem, error) {
	rs := slices.Clone(regs)
	slices.SortFunc(rs, func(a, b *memRegion) int {
		switch {
		case a.GPA < b.GPA:
			return -1
		case a.GPA > b.GPA:
			return 1
		}
		return 0
	})
	for i := 1; i < len(rs); i++ {
		if rs[i].GPA < rs[i-1].GPA+rs[i-1].Size {
			return nil, fmt.Errorf("memory region at %#x overlaps region at %#x size %#x", rs[i].GPA, rs[i-1].GPA, rs[i-1].Size)
		}
	}
	for i := range rs {
		for j := i + 1; j < len(rs); j++ {
			a, b := rs[i], rs[j]
			if a.UserAddr < b.UserAddr+b.Size && b.UserAddr < a.UserAddr+a.Size {
				return nil, fmt.Errorf("memory region at user address %#x overlaps user address %#x", a.UserAddr, b.UserAddr)
			}
		}
	}
	resident := true
	for _, r := range rs {
		resident = resident && r.resident
	}
	return &Mem{regions: rs, resident: resident}, nil
}

// NewMemFromBytes returns a table of one region backed by b at guest address
// gpa, with user address equal to gpa. It serves tests, fuzzing and
// benchmarks of the ring code without a front end. b must be memory that
// faults in without disk I/O (the Go heap, anonymous or shared memory, not
// a mapping of a file on disk): the table is resident.
func NewMemFromBytes(gpa uint64, b []byte) *Mem {
	r := &memRegion{MemRegion: wire.MemRegion{GPA: gpa, Size: uint64(len(b)), UserAddr: gpa}, data: b, resident: true}
	return &Mem{regions: []*memRegion{r}, resident: true}
}

// find returns the region holding gpa, or nil.
func (m *Mem) find(gpa uint64) *memRegion {
	rs := m.regions
	lo, hi := 0, len(rs)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if rs[mid].GPA+rs[mid].Size <= gpa {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo < len(rs) && rs[lo].GPA <= gpa {
		return rs[lo]
	}
	return nil
}

// Slice returns the n bytes of guest memory at gpa. The range must lie in
// one region; n may be 0 only at an address inside a region. The slice's
// capacity ends with the range.
func (m *Mem) Slice(gpa, n uint64) ([]byte, error) {
	r := m.find(gpa)
	if r == nil {
		return nil, fmt.Errorf("guest address %#x is not in guest memory", gpa)
	}
	off := gpa - r.GPA
	if n > r.Size-off {
		return nil, fmt.Errorf("guest range %#x+%#x leaves its memory region", gpa, n)
	}
	return r.data[off : off+n : off+n], nil
}

// seg is one translated piece of a descriptor chain.
type seg struct {
	b     []byte
	gpa   uint64
	write bool // device-writable
}

// appendSegs translates the guest range gpa..gpa+n, which may span adjacent
// regions, and appends its pieces to dst. No more than max pieces are added
// in all.
func (m *Mem) appendSegs(dst []seg, gpa, n uint64, write bool, max int) ([]seg, error) {
	if gpa+n < gpa {
		return dst, fmt.Errorf("guest range %#x+%#x overflows", gpa, n)
	}
	for n > 0 {
		r := m.find(gpa)
		if r == nil {
			return dst, fmt.Errorf("guest address %#x is not in guest memory", gpa)
		}
		if len(dst) >= max {
			return dst, fmt.Errorf("request has more than %d segments", max)
		}
		off := gpa - r.GPA
		k := min(n, r.Size-off)
		dst = append(dst, seg{b: r.data[off : off+k : off+k], gpa: gpa, write: write})
		gpa += k
		n -= k
	}
	return dst, nil
}

// userSlice returns the n bytes at front-end user address uaddr, which must
// lie in one region, with its capacity running to the end of the region
// (ring accessors use it to read whole aligned words), and the guest address.
func (m *Mem) userSlice(uaddr, n uint64) ([]byte, uint64, error) {
	for _, r := range m.regions {
		if uaddr >= r.UserAddr && uaddr-r.UserAddr < r.Size {
			off := uaddr - r.UserAddr
			if n > r.Size-off {
				return nil, 0, fmt.Errorf("user range %#x+%#x leaves its memory region", uaddr, n)
			}
			return r.data[off : off+n], r.GPA + off, nil
		}
	}
	return nil, 0, fmt.Errorf("user address %#x is not in guest memory", uaddr)
}

// dirtyLog is the dirty-page bitmap of SET_LOG_BASE: bit n of the log marks
// guest page n (VHOST_LOG_PAGE, 4 KiB) as written by the back end.
type dirtyLog struct {
	mapping []byte
	bits    []byte
}

// logPageShift is log2 of VHOST_LOG_PAGE.
const logPageShift = 12

// mapLog maps the log of d from fd.
func mapLog(fd int, d wire.LogDesc) (*dirtyLog, error) {
	page := uint64(os.Getpagesize())
	start := d.Offset &^ (page - 1)
	delta := d.Offset - start
	length := delta + d.Size
	if length < d.Size || length > 1<<40 {
		return nil, fmt.Errorf("log of %d bytes at %d: too large", d.Size, d.Offset)
	}
	if err := checkFileSize(fd, d.Offset, d.Size); err != nil {
		return nil, fmt.Errorf("log of %d bytes at %d: %w", d.Size, d.Offset, err)
	}
	m, err := unix.Mmap(fd, int64(start), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("map log: %w", err)
	}
	return &dirtyLog{mapping: m, bits: m[delta:]}, nil
}

func (l *dirtyLog) unmap() {
	if l != nil && l.mapping != nil {
		unix.Munmap(l.mapping)
		l.mapping, l.bits = nil, nil
	}
}

// mark sets the bits of the pages gpa..gpa+n atomically, as the spec asks:
// "Use atomic operations, as the log may be concurrently manipulated"
// (vhost-user.rst, "Migration"). Pages beyond the log are not marked; the
// front end sized the log to cover all guest memory, so that happens only for
// a hostile front end.
func (l *dirtyLog) mark(gpa, n uint64) {
	if l == nil || n == 0 {
		return
	}
	first := gpa >> logPageShift
	last := (gpa + n - 1) >> logPageShift
	if gpa+n-1 < gpa {
		last = ^uint64(0) >> logPageShift
	}
	for p := first; p <= last; p++ {
		i := p >> 3
		if i >= uint64(len(l.bits)) {
			return
		}
		b := unsafe.Pointer(&l.bits[i])
		// The mapping starts on a page boundary, so the aligned word that
		// holds the byte lies inside it (mappings end on a page too).
		mis := uintptr(b) & 3
		w := (*uint32)(unsafe.Add(b, -int(mis)))
		atomic.OrUint32(w, 1<<(mis*8+uintptr(p&7)))
	}
}
