// Package uring is a minimal io_uring ring on raw system calls: setup,
// submission entries for vectored reads and writes and no-ops, batched
// submission and completion reaping. It is what vhostdm's asynchronous I/O
// engine (mapper.IOQueue) needs and nothing more.
//
// Why not a library. The candidates read were
// github.com/pawelgaczynski/giouring (a liburing port without cgo, tested
// by its author on one kernel, low test coverage, last synced with liburing
// in 2023), github.com/iceber/iouring-go (allocates a request object and
// a result channel per I/O and runs its own completion goroutine: the
// per-request cost this engine exists to remove; no release since 2022) and
// github.com/godzie44/go-uring (a reactor for network I/O on top of a
// liburing port, unmaintained since 2022). The subset vhostdm uses (one
// ring, READV, WRITEV, NOP, io_uring_enter) is about 250 lines on
// golang.org/x/sys/unix, which the module already depends on, with no
// cgo and no extra goroutine or allocation per request.
//
// A Ring has one submitter at a time (its owner serialises GetSQE and
// Submit) and one reaper at a time (Reap and Wait, or Ready and Reap after
// a registered eventfd fired); the two may run concurrently. The kernel ABI
// is include/uapi/linux/io_uring.h.
package uring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SQEAsync is IOSQE_ASYNC: the kernel runs the request on an io-wq
// thread instead of trying it inline in io_uring_enter first.
const SQEAsync = 1 << 4

// SQECQESkipSuccess is IOSQE_CQE_SKIP_SUCCESS (Linux 5.17): no
// completion entry unless the request fails. [Ring.SkipsSuccess] reports
// whether the kernel honours it.
const SQECQESkipSuccess = 1 << 6

// Opcodes (enum io_uring_op).
const (
	OpNop    = 0
	OpReadv  = 1
	OpWritev = 2
	OpWrite  = 23 // IORING_OP_WRITE (Linux 5.6)
	OpFsync  = 3  // IORING_OP_FSYNC: the whole file with Len 0
)

// FsyncDatasync (in an OpFsync entry's RWFlags, the kernel's fsync_flags)
// makes it an fdatasync.
const FsyncDatasync = 1

const (
	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	enterGetEvents = 1 << 0

	featSingleMmap   = 1 << 0
	featNoDrop       = 1 << 1
	featSubmitStable = 1 << 2
	featCQESkip      = 1 << 11

	setupCQSize = 1 << 3
	setupClamp  = 1 << 4

	sqCQOverflow = 1 << 1 // IORING_SQ_CQ_OVERFLOW

	registerEventfd = 4 // IORING_REGISTER_EVENTFD (Linux 5.2)
)

// SQE is struct io_uring_sqe (64 bytes).
type SQE struct {
	Opcode      uint8
	Flags       uint8
	IOPrio      uint16
	FD          int32
	Off         uint64
	Addr        uint64
	Len         uint32
	RWFlags     uint32
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	SpliceFDIn  int32
	Addr3       uint64
	_           uint64
}

// CQE is struct io_uring_cqe (16 bytes).
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

type sqOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

type cqOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, CQEs, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

type params struct {
	SQEntries, CQEntries, Flags, SQThreadCPU, SQThreadIdle, Features, WQFD uint32
	Resv                                                                   [3]uint32
	SQOff                                                                  sqOffsets
	CQOff                                                                  cqOffsets
}

// Ring is one io_uring instance.
type Ring struct {
	fd             int
	sqMem, cqMem   []byte
	sqeMem         []byte
	sqHead, sqTail *uint32
	sqFlags        *uint32
	sqMask         uint32
	sqEntries      uint32
	sqArray        []uint32
	sqes           []SQE
	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           []CQE
	tail           uint32 // SQEs handed out by GetSQE, published by Submit
	features       uint32
	closed         bool
}

// New sets up a ring of at least entries submission entries (rounded up
// to a power of two by the kernel) and twice as many completion entries.
// It fails on kernels without io_uring (ENOSYS), where it is forbidden
// (EPERM: seccomp, kernel.io_uring_disabled), without the locked memory
// the rings need (ENOMEM on kernels that charge RLIMIT_MEMLOCK), or
// without the features this package relies on (Linux 5.5).
func New(entries uint32) (*Ring, error) {
	var p params
	p.Flags = setupCQSize | setupClamp
	p.CQEntries = 2 * entries
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &Ring{fd: int(fd)}
	if err := r.mmap(&p); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func (r *Ring) mmap(p *params) error {
	const need = featSingleMmap | featNoDrop | featSubmitStable
	if p.Features&need != need {
		return fmt.Errorf("io_uring: kernel lacks features %#x (Linux 5.5)", need&^p.Features)
	}
	sqSize := int(p.SQOff.Array) + int(p.SQEntries)*4
	cqSize := int(p.CQOff.CQEs) + int(p.CQEntries)*int(unsafe.Sizeof(CQE{}))
	size := max(sqSize, cqSize)
	mem, err := unix.Mmap(r.fd, offSQRing, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring: mmap rings: %w", err)
	}
	r.sqMem, r.cqMem = mem, mem // one mapping (IORING_FEAT_SINGLE_MMAP)
	sqeSize := int(p.SQEntries) * int(unsafe.Sizeof(SQE{}))
	r.sqeMem, err = unix.Mmap(r.fd, offSQEs, sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring: mmap submission entries: %w", err)
	}
	r.sqHead = (*uint32)(unsafe.Pointer(&mem[p.SQOff.Head]))
	r.sqTail = (*uint32)(unsafe.Pointer(&mem[p.SQOff.Tail]))
	r.sqFlags = (*uint32)(unsafe.Pointer(&mem[p.SQOff.Flags]))
	r.sqMask = *(*uint32)(unsafe.Pointer(&mem[p.SQOff.RingMask]))
	r.sqEntries = p.SQEntries
	r.sqArray = unsafe.Slice((*uint32)(unsafe.Pointer(&mem[p.SQOff.Array])), p.SQEntries)
	r.sqes = unsafe.Slice((*SQE)(unsafe.Pointer(&r.sqeMem[0])), p.SQEntries)
	r.cqHead = (*uint32)(unsafe.Pointer(&mem[p.CQOff.Head]))
	r.cqTail = (*uint32)(unsafe.Pointer(&mem[p.CQOff.Tail]))
	r.cqMask = *(*uint32)(unsafe.Pointer(&mem[p.CQOff.RingMask]))
	r.cqes = unsafe.Slice((*CQE)(unsafe.Pointer(&mem[p.CQOff.CQEs])), p.CQEntries)
	// The array maps ring slots to entries one to one, for good.
	for i := range r.sqArray {
		r.sqArray[i] = uint32(i)
	}
	r.tail = atomic.LoadUint32(r.sqTail)
	r.features = p.Features
	return nil
}

// SkipsSuccess reports whether the kernel honours [SQECQESkipSuccess]
// (IORING_FEAT_CQE_SKIP, Linux 5.17).
func (r *Ring) SkipsSuccess() bool { return r.features&featCQESkip != 0 }

// FD returns the ring's descriptor, for waiting on it with poll or epoll:
// it is readable while the completion ring holds entries.
func (r *Ring) FD() int { return r.fd }

// Entries returns the number of submission entries.
func (r *Ring) Entries() int { return int(r.sqEntries) }

// GetSQE returns a zeroed submission entry to fill, or nil when the
// submission ring is full (Submit, then try again). The entry is handed to
// the kernel by the next Submit.
func (r *Ring) GetSQE() *SQE {
	head := atomic.LoadUint32(r.sqHead)
	if r.tail-head >= r.sqEntries {
		return nil
	}
	e := &r.sqes[r.tail&r.sqMask]
	*e = SQE{}
	r.tail++
	return e
}

// Pending returns the entries got and not yet submitted.
func (r *Ring) Pending() int { return int(r.tail - atomic.LoadUint32(r.sqTail)) }

// publish makes the entries got since the last submission visible to the
// kernel and returns how many published entries it has not consumed yet,
// including any a short submission left behind.
func (r *Ring) publish() uint32 {
	atomic.StoreUint32(r.sqTail, r.tail)
	return r.tail - atomic.LoadUint32(r.sqHead)
}

// Submit publishes the entries got since the last Submit and hands every
// published entry the kernel has not consumed yet to it with one
// io_uring_enter; it returns how many the kernel took.
func (r *Ring) Submit() (int, error) {
	n := r.publish()
	if n == 0 {
		return 0, nil
	}
	return r.enter(n, 0, 0)
}

// SubmitRaw is Submit with a raw system call: the calling goroutine's
// thread enters io_uring_enter without telling the Go scheduler (which
// would wake its monitor thread if the process was idle). It is only for
// entries the kernel issues without blocking the submitter, which is what
// io_uring does with every request (one that would block goes to a
// kernel worker or waits on a poll), on a ring whose submitter is never
// a second thread at the same time (no wait on the ring's submission
// lock).
func (r *Ring) SubmitRaw() (int, error) {
	n := r.publish()
	if n == 0 {
		return 0, nil
	}
	for {
		k, _, errno := unix.RawSyscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(n), 0, 0, 0, 0)
		switch errno {
		case 0:
			return int(k), nil
		case unix.EINTR:
			continue
		}
		return int(k), fmt.Errorf("io_uring_enter: %w", errno)
	}
}

// RegisterEventfd makes the kernel signal the eventfd fd (add to its
// counter) whenever it posts completions, so that a reaper can wait for
// them in a poller instead of in io_uring_enter (Linux 5.2). The ring
// does not own fd: close it after the ring.
func (r *Ring) RegisterEventfd(fd int) error {
	v := int32(fd)
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerEventfd, uintptr(unsafe.Pointer(&v)), 1, 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_register(EVENTFD): %w", errno)
	}
	return nil
}

// Ready returns the number of completions ready to reap.
func (r *Ring) Ready() int {
	return int(atomic.LoadUint32(r.cqTail) - atomic.LoadUint32(r.cqHead))
}

// Overflowed reports whether the kernel holds completions that did not
// fit in the completion ring (IORING_SQ_CQ_OVERFLOW): FlushOverflow moves
// them in once Reap has made room.
func (r *Ring) Overflowed() bool {
	return atomic.LoadUint32(r.sqFlags)&sqCQOverflow != 0
}

// FlushOverflow asks the kernel to move completions it holds back
// (Overflowed) into the completion ring, as far as they fit; it does not
// wait.
func (r *Ring) FlushOverflow() error {
	_, err := r.enter(0, 0, enterGetEvents)
	return err
}

// Wait blocks until at least one completion is ready.
func (r *Ring) Wait() error {
	if atomic.LoadUint32(r.cqTail) != atomic.LoadUint32(r.cqHead) {
		return nil
	}
	_, err := r.enter(0, 1, enterGetEvents)
	return err
}

func (r *Ring) enter(toSubmit, minComplete, flags uint32) (int, error) {
	for {
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return int(n), fmt.Errorf("io_uring_enter: %w", errno)
	}
}

// Reap calls fn for every ready completion, in order, and returns how many
// there were; it does not wait.
func (r *Ring) Reap(fn func(CQE)) int {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for ; head != tail; head++ {
		c := r.cqes[head&r.cqMask]
		// Free the slot before fn runs: fn may submit more.
		atomic.StoreUint32(r.cqHead, head+1)
		fn(c)
		n++
	}
	return n
}

// ErrClosed is returned by the methods of a closed Ring.
var ErrClosed = errors.New("io_uring closed")

// Close unmaps the rings and closes the ring's descriptor; the kernel
// cancels what is still in flight.
func (r *Ring) Close() error {
	if r.closed {
		return ErrClosed
	}
	r.closed = true
	if r.sqeMem != nil {
		unix.Munmap(r.sqeMem)
	}
	if r.sqMem != nil {
		unix.Munmap(r.sqMem)
	}
	return unix.Close(r.fd)
}

// PrepRW fills e for a vectored read or write of n iovecs at iov.
func (e *SQE) PrepRW(op uint8, fd int, iov *unix.Iovec, n int, off int64, userData uint64) {
	e.Opcode = op
	e.FD = int32(fd)
	e.Addr = uint64(uintptr(unsafe.Pointer(iov)))
	e.Len = uint32(n)
	e.Off = uint64(off)
	e.UserData = userData
}

// Unconsumed returns the entries submitted that the kernel has not
// consumed yet (left by a short submission).
func (r *Ring) Unconsumed() int {
	return int(atomic.LoadUint32(r.sqTail) - atomic.LoadUint32(r.sqHead))
}

// registerIOWQMaxWorkers is IORING_REGISTER_IOWQ_MAX_WORKERS (Linux 5.15).
const registerIOWQMaxWorkers = 19

// SetMaxWorkers raises the io-wq thread limit for I/O the kernel cannot
// issue without blocking (reads of regular files and block devices not in
// the page cache, for example) to bounded; the kernel's default is four
// per CPU, fewer than the requests a queue keeps in flight. Kernels before
// 5.15 keep their default and return an error.
func (r *Ring) SetMaxWorkers(bounded uint32) error {
	v := [2]uint32{bounded, 0} // 0: leave the unbounded limit
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerIOWQMaxWorkers, uintptr(unsafe.Pointer(&v[0])), 2, 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_register(IOWQ_MAX_WORKERS): %w", errno)
	}
	return nil
}
