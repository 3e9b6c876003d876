package vhost

import (
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/internal/uring"
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
// checked before the write can be cleared before it.
//
// So signal writes on the caller's goroutine only while the file is
// non-blocking (direct): one system call per completion batch, and no
// goroutine to wake, which on a two-CPU machine cost more than the rest of
// a 4 KiB request. The direct write goes through an io_uring of the
// notifier's own (writeRing), submitted with a raw system call: io_uring
// never blocks the submitter, even if the front end clears the flag after
// the check, and the Go scheduler, which a write(2) enters, would wake its
// monitor thread at the first system call after the process went idle,
// which was most of the ring goroutine's batches. Without io_uring (or
// IOSQE_CQE_SKIP_SUCCESS) the direct write is a write(2).
//
// Once the front end has cleared the flag, the writes happen on a
// goroutine of the notifier's own: signal only sets a flag and wakes it,
// and never waits. That goroutine may park in the kernel for as long as
// the front end keeps the counter full, which costs a thread but no
// completion (a full counter is an interrupt already pending). Without
// io_uring, a front end that clears the flag between the check and a
// direct write, with the counter full, blocks that writer until the
// counter is read: only its own
// queue waits, and halting the queue (unstick) or closing the notifier
// (reap) empties a full counter, so that the connection and the daemon
// never wait for it. Closing the notifier does not wait either; a reaper
// reads the counter (RWF_NOWAIT reads work on eventfds whatever the flags)
// until the blocked writes complete, then closes the fd.
type notifier struct {
	f       *os.File
	rc      syscall.RawConn
	log     *slog.Logger
	what    string
	pending atomic.Bool   // a signal not yet written by the goroutine
	writing atomic.Bool   // the goroutine is in write(2)
	closing atomic.Bool   // close was called
	direct  atomic.Int32  // callers of signal in a direct write(2)
	logged  atomic.Bool   // the blocked-write warning was logged
	watched atomic.Bool   // a halting queue watches for writes (unstickWhileBlocked)
	started chan struct{} // cap 1: a write started while watched
	wake    chan struct{} // cap 1
	exited  chan struct{} // closed when the goroutine returns
	done    chan struct{} // closed when the fd is closed

	// The io_uring a direct signal is submitted on (writeRing), made at
	// the first signal; ringOff once it cannot be used.
	ringMu  sync.Mutex
	ring    *uring.Ring
	ringOff bool
	ringErr atomic.Bool // a failed write was logged
}

// eventfdOne is the 8-byte counter increment written to an eventfd.
var eventfdOne = [8]byte{1}

// newNotifier takes ownership of fd, an eventfd (checkEventfd), and starts
// its goroutine.
func newNotifier(fd int, what string, log *slog.Logger) *notifier {
	unix.SetNonblock(fd, true) // the common case: EAGAIN instead of parking
	n := &notifier{f: os.NewFile(uintptr(fd), what), log: log, what: what,
		started: make(chan struct{}, 1), wake: make(chan struct{}, 1), exited: make(chan struct{}), done: make(chan struct{})}
	rc, err := n.f.SyscallConn()
	if err != nil { // not for an *os.File that wraps a valid fd
		n.f.Close()
		close(n.exited)
		close(n.done)
		return n
	}
	n.rc = rc
	go n.run()
	return n
}

// signal writes 1 to the eventfd, on the caller's goroutine while the
// file is non-blocking, else through the notifier's goroutine, coalescing
// with a write it has not made yet. A nil notifier does nothing.
func (n *notifier) signal() {
	if n == nil || n.writeDirect() {
		return
	}
	n.signalAsync()
}

// signalAsync asks the notifier's goroutine for one write of 1, coalescing
// with a write not yet made. It never waits.
func (n *notifier) signalAsync() {
	if n == nil || n.pending.Swap(true) {
		return
	}
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

// writeDirect writes 1 to the eventfd on the calling goroutine if the file
// is non-blocking and the notifier's goroutine has no write pending or in
// progress (whose signal then covers this one), and reports whether it
// did.
func (n *notifier) writeDirect() bool {
	if n.rc == nil || n.closing.Load() || n.pending.Load() || n.writing.Load() {
		return false
	}
	ok := false
	n.rc.Write(func(fd uintptr) bool {
		// F_GETFL never blocks: a raw system call, without the
		// scheduler's bookkeeping.
		fl, _, errno := unix.RawSyscall(unix.SYS_FCNTL, fd, unix.F_GETFL, 0)
		if errno != 0 || fl&unix.O_NONBLOCK == 0 {
			return true
		}
		ok = true
		if n.writeRing(fd) {
			return true
		}
		if n.direct.Add(1) == 1 {
			n.noteWrite()
		}
		for {
			// EAGAIN: the counter is far from zero, the front end
			// will wake anyway.
			if _, err := unix.Write(int(fd), eventfdOne[:]); err != unix.EINTR {
				break
			}
		}
		n.direct.Add(-1)
		return true
	})
	return ok
}

// writeRing submits the write of 1 to the eventfd fd on the notifier's
// io_uring, with a raw system call, and reports whether it did. io_uring
// issues the write without blocking: on a non-blocking file it is done (or
// fails with EAGAIN on a full counter, which means an interrupt is
// pending anyway) inside io_uring_enter; on a file whose O_NONBLOCK the
// front end cleared after writeDirect looked, it waits in the kernel (a
// poll, then a kernel worker), not on this thread. A system call the Go
// scheduler does not see costs the ring goroutine less than write(2),
// which, in a process that was idle, also wakes the runtime's monitor
// thread (docs/PERFORMANCE.md). It returns false when io_uring or
// IOSQE_CQE_SKIP_SUCCESS (Linux 5.17) is unavailable: the caller then
// writes itself. Completion entries come only for failed writes; they
// are reaped at the next signal.
func (n *notifier) writeRing(fd uintptr) bool {
	n.ringMu.Lock()
	defer n.ringMu.Unlock()
	if n.ring == nil {
		if n.ringOff || notifyUringOff {
			return false
		}
		r, err := uring.New(4)
		if err == nil && !r.SkipsSuccess() {
			r.Close()
			err = errors.New("the kernel lacks IOSQE_CQE_SKIP_SUCCESS (Linux 5.17)")
		}
		if err != nil {
			n.ringOff = true
			n.log.Debug("eventfd writes with write(2)", "fd", n.what, "reason", err)
			return false
		}
		n.ring = r
	}
	n.ring.Reap(n.ringResult)
	e := n.ring.GetSQE()
	if e == nil { // every entry is submitted at once: not reached
		return false
	}
	e.Opcode = uring.OpWrite
	e.Flags = uring.SQECQESkipSuccess
	e.FD = int32(fd)
	e.Addr = uint64(uintptr(unsafe.Pointer(&eventfdOne[0]))) // a global: never moves
	e.Len = uint32(len(eventfdOne))
	if k, err := n.ring.SubmitRaw(); k != 1 || err != nil {
		// The entry may still be in the ring: the ring is never
		// submitted again.
		n.log.Warn("eventfd write on io_uring failed: writing with write(2) from now on", "fd", n.what, "err", err)
		n.ring.Close()
		n.ring, n.ringOff = nil, true
		return false
	}
	return true
}

// ringResult handles the completion entry of a failed ring write: EAGAIN
// is a full counter (an interrupt already pending); anything else is
// logged once.
func (n *notifier) ringResult(c uring.CQE) {
	if c.Res == -int32(unix.EAGAIN) || n.ringErr.Swap(true) {
		return
	}
	n.log.Warn("eventfd write on io_uring failed", "fd", n.what, "err", unix.Errno(-c.Res))
}

// closeRing releases the notifier's io_uring once no signal uses it.
func (n *notifier) closeRing() {
	n.ringMu.Lock()
	defer n.ringMu.Unlock()
	if n.ring != nil {
		n.ring.Close()
		n.ring = nil
	}
	n.ringOff = true
}

func (n *notifier) run() {
	defer close(n.exited)
	for {
		<-n.wake
		if n.pending.Swap(false) {
			n.writing.Store(true)
			n.noteWrite()
			n.rc.Write(func(fd uintptr) bool {
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

// noteWrite tells a watcher (unstickWhileBlocked) that a write started.
func (n *notifier) noteWrite() {
	if n.watched.Load() {
		select {
		case n.started <- struct{}{}:
		default:
		}
	}
}

// watch starts or ends the watching of writes (unstickWhileBlocked); it
// returns the channel a write starting while watched sends on, nil for a
// nil notifier (which never sends).
func (n *notifier) watch(on bool) chan struct{} {
	if n == nil {
		return nil
	}
	n.watched.Store(on)
	return n.started
}

// unstickPeriod is how long a write may stay in progress while a queue
// halts before the counter it may be blocked on is looked at (unstick).
const unstickPeriod = 10 * time.Millisecond

// unstickWhileBlocked releases, until stop is closed, writes of a or b
// (either may be nil) that the front end blocks on a full counter
// (notifier.unstick), so that a halting queue does not wait for the front
// end. It arms a timer only while a write is in progress: otherwise it
// waits for a write to start, so that a halt waiting for slow requests,
// with no signal blocked, costs no periodic wake-ups. ticks counts the
// timer's expiries.
func unstickWhileBlocked(stop <-chan struct{}, ticks *atomic.Uint64, a, b *notifier) {
	sa, sb := a.watch(true), b.watch(true)
	defer a.watch(false)
	defer b.watch(false)
	var t *time.Timer
	defer func() {
		if t != nil {
			t.Stop()
		}
	}()
	for {
		// watch(true) came before this look, so a write that starts
		// after it sends on sa or sb.
		if a.busy() || b.busy() {
			if t == nil {
				t = time.NewTimer(unstickPeriod)
			} else {
				t.Reset(unstickPeriod)
			}
			select {
			case <-stop:
				return
			case <-t.C:
				ticks.Add(1)
				a.unstick()
				b.unstick()
			}
			continue
		}
		select {
		case <-stop:
			return
		case <-sa:
		case <-sb:
		}
	}
}

// busy is blocked for a notifier that may be nil.
func (n *notifier) busy() bool { return n != nil && n.rc != nil && n.blocked() }

// blocked reports whether a write to the notifier may be blocked: one is
// in progress.
func (n *notifier) blocked() bool {
	return n.writing.Load() || n.direct.Load() > 0
}

// drainFull empties the counter of the eventfd fd if it is full (poll
// reports it not writable), which releases the writes blocked on it;
// a counter that is not full is left alone, so that no interrupt the
// front end is owed goes missing.
func (n *notifier) drainFull(fd int) {
	pfd := [1]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	k, err := unix.Poll(pfd[:], 0)
	for err == unix.EINTR {
		// A poll that finds nothing ready returns EINTR when a signal
		// is pending (the Go runtime's preemption signals are
		// frequent): exactly when the counter is full.
		k, err = unix.Poll(pfd[:], 0)
	}
	if err != nil || k != 0 && pfd[0].Revents&unix.POLLOUT != 0 {
		return
	}
	if !n.logged.Swap(true) {
		n.log.Warn("front end keeps an eventfd full with O_NONBLOCK cleared: emptying it to release the blocked write", "fd", n.what)
	}
	var b [8]byte
	for {
		if _, err := unix.Preadv2(fd, [][]byte{b[:]}, -1, unix.RWF_NOWAIT); err != unix.EINTR {
			return
		}
	}
}

// unstick releases a write blocked on a full counter of a notifier in use
// (see drainFull); the queue calls it while it halts.
func (n *notifier) unstick() {
	if n == nil || n.rc == nil || !n.blocked() {
		return
	}
	n.rc.Read(func(fd uintptr) bool {
		n.drainFull(int(fd))
		return true
	})
}

// close ends the notifier: the goroutine exits after a write in progress,
// and the fd is closed once no write uses it. close never waits; if a
// write is blocked, a reaper releases it.
func (n *notifier) close() {
	if n == nil || n.closing.Swap(true) {
		return
	}
	select {
	case n.wake <- struct{}{}:
	default:
	}
	if n.rc == nil {
		return
	}
	// A duplicate of the fd (the same file description, the same
	// counter) lets the reaper read the counter while Close waits for
	// the writes in progress.
	dup := -1
	n.rc.Control(func(fd uintptr) {
		if d, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0); err == nil {
			dup = d
		}
	})
	closed := make(chan struct{})
	go func() {
		<-n.exited
		n.f.Close() // waits for the direct writes in progress
		n.closeRing()
		close(closed)
	}()
	go n.reap(dup, closed)
}

// reapFirst is how long reap waits before it looks for a blocked write.
const reapFirst = 20 * time.Millisecond

// reap waits for the fd of a closed notifier to be closed; while a write
// is blocked on it, it empties the full counter through dup so that the
// write completes. It gives up only when the fd is closed: a front end
// that keeps refilling the counter keeps one thread of ours, no more.
func (n *notifier) reap(dup int, closed chan struct{}) {
	defer close(n.done)
	if dup >= 0 {
		defer unix.Close(dup)
	}
	delay := reapFirst
	t := time.NewTimer(delay)
	defer t.Stop()
	for {
		select {
		case <-closed:
			return
		case <-t.C:
		}
		if dup >= 0 && n.blocked() {
			n.drainFull(dup)
		}
		delay = min(2*delay, time.Second)
		t.Reset(delay)
	}
}
