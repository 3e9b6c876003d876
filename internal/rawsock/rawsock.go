// Package rawsock reads and writes a non-blocking socket with raw system
// calls (unix.RawSyscall), waiting in Go's network poller as net.Conn
// does, so that the connection's deadlines apply.
//
// A raw system call does not tell the Go scheduler that its thread entered
// the kernel. An ordinary one does, and when the process was idle before
// it, that wakes the runtime's monitor thread (sysmon), which then polls
// every 20 µs while anything runs; a call that copies for longer than the
// monitor's tick also has its P handed to another thread (a futex wake-up
// and a context switch). A read or write of a non-blocking socket never
// blocks (EAGAIN: the poller waits), so nothing is lost by not telling the
// scheduler. Replication pays for both on every batch: profiles of a paced
// 4 KiB protected write run put sysmon at about a sixth of the hub's CPU
// (docs/PERFORMANCE.md, "Protected writes").
package rawsock

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxIov is the most buffers one writev takes (IOV_MAX).
const maxIov = 1024

// Conn is a socket read and written with raw system calls. Read, Write
// and Writev may run at the same time as each other; Write and Writev
// are each for one writer at a time.
type Conn struct {
	rc   syscall.RawConn
	addr net.Addr
	iov  []unix.Iovec // Writev's vector, reused
	// Write's buffer list and vector, its own (no allocation per call).
	one  [1][]byte
	wiov []unix.Iovec
}

// New returns a Conn for nc's socket, or nil when nc is not a socket
// that Go's poller manages (a TLS connection, which reads and writes
// through its own buffers; a pipe).
func New(nc net.Conn) *Conn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return &Conn{rc: rc, addr: nc.RemoteAddr()}
}

// Read reads into p what the socket holds, waiting for something if it
// holds nothing; io.EOF when the peer has closed.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n uintptr
	var errno syscall.Errno
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			n, _, errno = unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
			switch errno {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // wait in the poller
			}
			return true
		}
	})
	if err = c.opErr("read", err, errno); err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, io.EOF
	}
	return int(n), nil
}

// Write writes all of p (or fails), and returns how much it wrote. It
// shares no state with Writev (its buffer list and vector are its own),
// so the two may run at once.
func (c *Conn) Write(p []byte) (int, error) {
	c.one[0] = p
	n, err := c.writev("write", c.one[:], &c.wiov)
	c.one[0] = nil // no reference to the caller's data kept
	return n, err
}

// Writev writes all of bufs (or fails), up to maxIov buffers per writev;
// it may change bufs' elements.
func (c *Conn) Writev(bufs [][]byte) error {
	_, err := c.writev("writev", bufs, &c.iov)
	return err
}

// writev is Write and Writev: it writes bufs with writev calls, waiting
// in the poller while the socket is full, and returns the bytes written;
// *vec is the iovec array to use (kept, grown, for the next call); op
// names the call in an error.
func (c *Conn) writev(op string, bufs [][]byte, vec *[]unix.Iovec) (int, error) {
	done := 0
	var errno syscall.Errno
	err := c.rc.Write(func(fd uintptr) bool {
		for len(bufs) > 0 {
			iov := (*vec)[:0]
			for _, b := range bufs {
				if len(iov) == maxIov {
					break
				}
				if len(b) > 0 {
					v := unix.Iovec{Base: &b[0]}
					v.SetLen(len(b))
					iov = append(iov, v)
				}
			}
			*vec = iov
			if len(iov) == 0 {
				return true
			}
			n, _, e := unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
			clear(iov) // no references to the data kept
			switch e {
			case 0:
				done += int(n)
				bufs = consume(bufs, int(n))
			case unix.EINTR:
			case unix.EAGAIN:
				return false // wait in the poller
			default:
				errno = e
				return true
			}
		}
		return true
	})
	return done, c.opErr(op, err, errno)
}

// consume returns bufs without their first n bytes.
func consume(bufs [][]byte, n int) [][]byte {
	for len(bufs) > 0 && n >= len(bufs[0]) {
		n -= len(bufs[0])
		bufs = bufs[1:]
	}
	if len(bufs) > 0 && n > 0 {
		bufs[0] = bufs[0][n:]
	}
	return bufs
}

// opErr returns a net.OpError for the poller's error or the call's errno,
// as net.Conn would; nil for neither.
func (c *Conn) opErr(op string, err error, errno syscall.Errno) error {
	if err == nil && errno != 0 {
		err = os.NewSyscallError(op, errno)
	}
	if err == nil {
		return nil
	}
	return &net.OpError{Op: op, Net: c.addr.Network(), Addr: c.addr, Err: err}
}
