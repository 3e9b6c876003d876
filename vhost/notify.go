package vhost

import (
	"log/slog"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A notifier signals one call or error eventfd of a front end.
//
// An eventfd write blocks while the counter would pass 0xfffffffffffffffe,
// unless the file is non-blocking; but O_NONBLOCK is a flag of the open file
// description, which the front end shares (the fd came through SCM_RIGHTS),
// so it can clear the flag after SET_VRING_CALL and keep the counter full.
// Nothing makes a single write safe against that: eventfd rejects
// RWF_NOWAIT writes (EOPNOTSUPP, Linux 6.18), an eventfd cannot be reopened
// through /proc/self/fd for a description of our own (ENXIO), and a flag
// checked before the write can be cleared before it. So the writes happen
// on a goroutine of the notifier's own: signal only sets a flag and wakes
// it, and never waits. That goroutine may park in the kernel for as long as
// the front end keeps the counter full, which costs a thread but no
// completion (a full counter is an interrupt already pending). Closing the
// notifier does not wait for it either; a reaper reads the counter
// (RWF_NOWAIT reads work on eventfds whatever the flags) until the blocked
// write completes and the goroutine exits, closing the fd.
type notifier struct {
	f       *os.File
	rc      syscall.RawConn
	log     *slog.Logger
	what    string
	pending atomic.Bool   // a signal not yet written
	writing atomic.Bool   // the goroutine is in write(2)
	closing atomic.Bool   // close was called
	wake    chan struct{} // cap 1
	done    chan struct{} // closed when the goroutine has closed the fd
}

// eventfdOne is the 8-byte counter increment written to an eventfd.
var eventfdOne = [8]byte{1}

// newNotifier takes ownership of fd, an eventfd (checkEventfd), and starts
// its goroutine.
func newNotifier(fd int, what string, log *slog.Logger) *notifier {
	unix.SetNonblock(fd, true) // the common case: EAGAIN instead of parking
	n := &notifier{f: os.NewFile(uintptr(fd), what), log: log, what: what,
		wake: make(chan struct{}, 1), done: make(chan struct{})}
	rc, err := n.f.SyscallConn()
	if err != nil { // not for an *os.File that wraps a valid fd
		n.f.Close()
		close(n.done)
		return n
	}
	n.rc = rc
	go n.run()
	return n
}

// signal asks for one write of 1 to the eventfd, coalescing with a write
// not yet made. It never waits; a nil notifier does nothing.
func (n *notifier) signal() {
	if n == nil || n.pending.Swap(true) {
		return
	}
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

func (n *notifier) run() {
	defer close(n.done)
	defer n.f.Close()
	for {
		<-n.wake
		if n.pending.Swap(false) {
			n.writing.Store(true)
			n.rc.Write(func(fd uintptr) bool {
				// EAGAIN: the counter is far from zero, the
				// front end will wake anyway.
				for {
					if _, err := unix.Write(int(fd), eventfdOne[:]); err != unix.EINTR {
						return true
					}
				}
			})
			n.writing.Store(false)
		}
		if n.closing.Load() {
			return
		}
	}
}

// close ends the notifier: the goroutine exits after a write in progress,
// and closes the fd. close never waits; if the write is blocked, a reaper
// releases it.
func (n *notifier) close() {
	if n == nil || n.closing.Swap(true) {
		return
	}
	select {
	case n.wake <- struct{}{}:
	default:
	}
	select {
	case <-n.done:
		return
	default:
	}
	go n.reap()
}

// reapFirst is how long reap waits before it looks for a blocked write.
const reapFirst = 20 * time.Millisecond

// reap waits for the goroutine of a closed notifier; while that goroutine
// is blocked in its write, it empties the counter so that the write
// completes. It gives up only when the goroutine has exited: a front end
// that keeps refilling the counter keeps one thread of ours, no more.
func (n *notifier) reap() {
	delay := reapFirst
	t := time.NewTimer(delay)
	defer t.Stop()
	logged := false
	var b [8]byte
	iov := [][]byte{b[:]}
	for {
		select {
		case <-n.done:
			return
		case <-t.C:
		}
		if n.writing.Load() {
			if !logged {
				n.log.Warn("front end keeps an eventfd full with O_NONBLOCK cleared: emptying it to release the blocked write", "fd", n.what)
				logged = true
			}
			// The fd stays open while the goroutine runs; after
			// it closed the fd, rc.Read fails instead of reading
			// another file.
			n.rc.Read(func(fd uintptr) bool {
				unix.Preadv2(int(fd), iov, -1, unix.RWF_NOWAIT)
				return true
			})
		}
		delay = min(2*delay, time.Second)
		t.Reset(delay)
	}
}
