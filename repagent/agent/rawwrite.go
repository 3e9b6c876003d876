package agent

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxIov is the most buffers one writev takes (IOV_MAX).
const maxIov = 1024

// writevRaw writes bufs to the connection's socket with writev system calls
// made without the Go runtime's syscall bookkeeping (RawSyscall), waiting
// in the poller (and so under the write deadline) when the socket's buffer
// is full. The socket is non-blocking, so a writev never blocks: made as
// an ordinary system call, one that copied a batch for longer than the
// scheduler monitor's tick had its P handed to another thread (a futex
// wake-up and a context switch) while it ran.
func (c *agentConn) writevRaw(bufs [][]byte) error {
	var werr error
	err := c.rc.Write(func(fd uintptr) bool {
		for len(bufs) > 0 {
			iov := c.rawIov[:0]
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
			c.rawIov = iov
			if len(iov) == 0 {
				return true
			}
			n, _, e := unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
			clear(iov) // no references to the data kept
			switch e {
			case 0:
				bufs = consume(bufs, int(n))
			case unix.EINTR:
			case unix.EAGAIN:
				return false // the poller waits for room
			default:
				werr = e
				return true
			}
		}
		return true
	})
	if err != nil {
		return err
	}
	return werr
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

// rawConn returns the connection's socket for writevRaw, nil if it has
// none (TLS, a test's pipe).
func rawConn(nc any) syscall.RawConn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}
