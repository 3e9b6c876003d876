package journal

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/internal/uring"
)

// ringSync runs a segment file's fdatasync on an io_uring kernel worker
// while the calling goroutine waits in the Go network poller, on the
// ring's descriptor, instead of in the system call.
//
// Why: a goroutine in a blocking system call keeps its P busy in the Go
// scheduler's eyes, and while any P is busy the runtime's monitor thread
// (sysmon) wakes every 20 µs to see whether to take it back. A journal
// fdatasync takes milliseconds (the ext4 commit of an appended file), one
// after the other under load: the hub's profile showed sysmon's polling
// at about 17% of the hub's CPU. Parked in the poller, the goroutine
// leaves the process idle (sysmon sleeps) until the completion arrives.
// The fdatasync itself is the same (IORING_OP_FSYNC with
// IORING_FSYNC_DATASYNC runs vfs_fsync_range on an io-wq thread of this
// process; its CPU is the process's); the submission is a raw
// io_uring_enter (the kernel always hands an fsync to a worker, the
// submitter never blocks).
//
// Where io_uring is unavailable (ENOSYS, EPERM: seccomp or
// kernel.io_uring_disabled, no locked memory) or its descriptor cannot be
// polled, the first Sync falls back to fdatasync(2) for good.
type ringSync struct {
	mu    sync.Mutex // one fdatasync at a time on the ring
	tried bool       // set up (or failed to) already
	ring  *uring.Ring
	poll  *os.File        // a duplicate of the ring's descriptor, in the poller
	rc    syscall.RawConn // poll's
}

// datasync makes fd's data durable (fdatasync).
func (s *ringSync) datasync(fd int) error {
	_, err := s.run("fsync", func(e *uring.SQE) {
		e.Opcode, e.FD, e.RWFlags = uring.OpFsync, int32(fd), uring.FsyncDatasync
	}, func() (int, error) { return 0, unix.Fdatasync(fd) })
	return err
}

// pwrite writes b at off of fd (pwrite(2)), returning the bytes written.
// The journal's O_DIRECT appends wait for the disk: on the ring, in the
// poller, for the reason above.
func (s *ringSync) pwrite(fd int, b []byte, off int64) (int, error) {
	return s.run("write", func(e *uring.SQE) {
		e.Opcode, e.FD = uring.OpWrite, int32(fd)
		e.Addr, e.Len, e.Off = uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b)))), uint32(len(b)), uint64(off)
	}, func() (int, error) {
		for {
			n, err := unix.Pwrite(fd, b, off)
			if err != unix.EINTR {
				return n, err
			}
		}
	})
}

// run submits one operation that prep fills and waits for its result,
// or runs fallback where there is no ring; what names it in errors.
func (s *ringSync) run(what string, prep func(*uring.SQE), fallback func() (int, error)) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.tried {
		s.tried = true
		s.setup()
	}
	if s.ring == nil {
		return fallback()
	}
	e := s.ring.GetSQE()
	if e == nil {
		return 0, errors.New("io_uring: no submission entry") // one at a time: never
	}
	prep(e)
	if _, err := s.ring.SubmitRaw(); err != nil {
		return 0, err
	}
	var res int32
	done := false
	err := s.rc.Read(func(uintptr) bool {
		s.ring.Reap(func(c uring.CQE) { res, done = c.Res, true })
		return done
	})
	if err != nil {
		// The poller failed (the descriptor was closed): the
		// operation's fate is unknown; the caller's error is sticky.
		return 0, fmt.Errorf("io_uring %s: waiting for the completion: %w", what, err)
	}
	if res < 0 {
		return 0, syscall.Errno(-res)
	}
	return int(res), nil
}

// setup creates the ring and registers it with the poller; on failure
// the ring stays nil (fdatasync(2) then).
func (s *ringSync) setup() {
	r, err := uring.New(2)
	if err != nil {
		return
	}
	dup, err := unix.FcntlInt(uintptr(r.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err == nil {
		if err = unix.SetNonblock(dup, true); err != nil {
			unix.Close(dup)
		}
	}
	if err != nil {
		r.Close()
		return
	}
	f := os.NewFile(uintptr(dup), "io_uring")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		r.Close()
		return
	}
	// A descriptor the poller refused would block Read in the raw
	// read below forever: probe that the poller has it (a deadline is
	// only supported on polled files).
	if f.SetReadDeadline(time.Time{}) != nil {
		f.Close()
		r.Close()
		return
	}
	s.ring, s.poll, s.rc = r, f, rc
}

// close releases the ring.
func (s *ringSync) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ring != nil {
		s.poll.Close()
		s.ring.Close()
		s.ring, s.poll, s.rc = nil, nil, nil
	}
}
