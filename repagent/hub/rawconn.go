package hub

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawConn reads and writes a non-blocking socket with raw read(2) and
// write(2) calls, waiting in the Go network poller as net.Conn does (its
// deadlines apply). A raw system call does not tell the Go scheduler it
// entered the kernel, so it does not wake the runtime's monitor thread
// (sysmon), which a plain call does whenever the process was idle before
// it; the monitor then polls every 20 µs while anything runs. On a hub
// paced by its agent the process idles between a socket read and the
// next, and between a group commit and its WRITE_ACK: profiles of the
// paced 4 KiB run put sysmon at ~17% of the hub's CPU. A read or write of
// a non-blocking socket never blocks (EAGAIN: the poller waits), so
// nothing is lost by not telling the scheduler.
type rawConn struct {
	rc   syscall.RawConn
	addr net.Addr
}

// newRawConn returns a rawConn of nc, or nc itself when it is not a
// socket the poller manages (a TLS connection reads and writes through
// its own buffers: it gets nc).
func newRawConn(nc net.Conn) io.ReadWriter {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nc
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nc
	}
	return &rawConn{rc: rc, addr: nc.RemoteAddr()}
}

func (r *rawConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n uintptr
	var errno syscall.Errno
	err := r.rc.Read(func(fd uintptr) bool {
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
	if err = r.opErr("read", err, errno); err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, io.EOF
	}
	return int(n), nil
}

// Write writes all of p (or fails).
func (r *rawConn) Write(p []byte) (int, error) {
	done := 0
	var errno syscall.Errno
	err := r.rc.Write(func(fd uintptr) bool {
		for done < len(p) {
			n, _, e := unix.RawSyscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[done])), uintptr(len(p)-done))
			switch e {
			case 0:
				done += int(n)
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
	return done, r.opErr("write", err, errno)
}

// opErr returns a net.OpError for the poller's error or the call's errno,
// as net.Conn would; nil for neither.
func (r *rawConn) opErr(op string, err error, errno syscall.Errno) error {
	if err == nil && errno != 0 {
		err = os.NewSyscallError(op, errno)
	}
	if err == nil {
		return nil
	}
	return &net.OpError{Op: op, Net: r.addr.Network(), Addr: r.addr, Err: err}
}
