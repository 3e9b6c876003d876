package hub

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawReader reads a non-blocking socket with raw read(2) calls, waiting
// for data in the Go network poller as net.Conn does (read deadlines
// apply). A raw system call does not tell the Go scheduler it entered the
// kernel, so it does not wake the runtime's monitor thread (sysmon),
// which a plain read does whenever the process was idle before it; the
// monitor then polls every 20 µs while anything runs. The hub's reader is
// what wakes first when a mirrored write arrives at an idle hub: profiles
// of the paced 4 KiB run put sysmon at ~17% of the hub's CPU. A read of a
// non-blocking socket never blocks (EAGAIN), so nothing is lost by not
// telling the scheduler.
type rawReader struct {
	rc   syscall.RawConn
	addr net.Addr
}

// newRawReader returns a rawReader of nc, or nc itself when it is not a
// socket the poller manages (a TLS connection reads through its own
// buffer: it gets nc).
func newRawReader(nc net.Conn) io.Reader {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nc
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nc
	}
	return &rawReader{rc: rc, addr: nc.RemoteAddr()}
}

func (r *rawReader) Read(p []byte) (int, error) {
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
	if err == nil && errno != 0 {
		err = os.NewSyscallError("read", errno)
	}
	if err != nil {
		return 0, &net.OpError{Op: "read", Net: r.addr.Network(), Addr: r.addr, Err: err}
	}
	if n == 0 {
		return 0, io.EOF
	}
	return int(n), nil
}
