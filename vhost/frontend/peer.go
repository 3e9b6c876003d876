package frontend

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// ErrPeerGone is returned by Client.WaitPeerGone when the back end closed
// its end of the vhost-user socket: it exited, was killed or dropped the
// connection.
var ErrPeerGone = errors.New("back end closed the vhost-user connection")

// WaitPeerGone blocks until the back end closes its end of the socket
// (ErrPeerGone), ctx is done (ctx.Err()) or the client is closed
// (ErrClientClosed). It watches a duplicate of the socket's descriptor
// for hang-up without reading from it, so it may run alongside requests
// and messages; a back end that dies with requests in flight is noticed
// at once instead of when they time out.
func (c *Client) WaitPeerGone(ctx context.Context) error {
	c.mu.Lock()
	if c.closed || c.uc == nil {
		c.mu.Unlock()
		return ErrClientClosed
	}
	rc, err := c.uc.SyscallConn()
	c.mu.Unlock()
	if err != nil {
		return err
	}
	dup := -1
	var derr error
	if err := rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return err
	}
	if derr != nil {
		return fmt.Errorf("watch back end: dup: %w", derr)
	}
	defer unix.Close(dup)
	const tick = 50 * time.Millisecond
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		c.mu.Lock()
		closed := c.closed
		c.mu.Unlock()
		if closed {
			return ErrClientClosed
		}
		fds := []unix.PollFd{{Fd: int32(dup), Events: unix.POLLRDHUP}}
		n, err := unix.Poll(fds, int(tick/time.Millisecond))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("watch back end: poll: %w", err)
		}
		if n > 0 && fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0 {
			return ErrPeerGone
		}
	}
}
