package vhost

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// This file holds the queue's configuration methods: the connection
// goroutine changes a queue's state only through them.

// ringEnv is what a ring is set up with: the connection's memory table,
// negotiated features, dirty log and inflight region.
type ringEnv struct {
	mem      *Mem
	features uint64
	dlog     *dirtyLog
	inflight *inflightRegion
}

// isStopped reports whether the queue is stopped (neither running nor
// paused).
func (q *queue) isStopped() bool { return q.state == queueStopped }

// mustBeStopped refuses a setup message for a queue that runs.
func (q *queue) mustBeStopped() error {
	if q.state != queueStopped {
		return fmt.Errorf("queue %d is running", q.index)
	}
	return nil
}

// setNum sets the ring size (SET_VRING_NUM); the queue is stopped.
func (q *queue) setNum(n uint32, packed bool) error {
	if err := q.mustBeStopped(); err != nil {
		return err
	}
	// Virtio 1.x 2.8: packed queue sizes are anything up to 32768.
	if packed && (n == 0 || n > virtio.MaxQueueSize) {
		return fmt.Errorf("queue %d: size %d: must be from 1 to %d", q.index, n, virtio.MaxQueueSize)
	}
	// Virtio 1.x 2.7: split queue sizes are powers of 2 up to 32768.
	if !packed && (n == 0 || n > virtio.MaxQueueSize || n&(n-1) != 0) {
		return fmt.Errorf("queue %d: size %d: must be a power of 2 from 1 to %d", q.index, n, virtio.MaxQueueSize)
	}
	q.num = uint16(n)
	return nil
}

// setBase sets the next avail index (SET_VRING_BASE); the queue is stopped.
// A packed ring's base carries the avail and used positions (packed.go),
// checked when the ring starts.
func (q *queue) setBase(n uint32, packed bool) error {
	if err := q.mustBeStopped(); err != nil {
		return err
	}
	if !packed && n > 0xffff {
		return fmt.Errorf("queue %d: base %d beyond 16 bits (a split ring's index)", q.index, n)
	}
	q.base, q.baseHi = uint16(n), uint16(n>>16)
	return nil
}

// setAddr sets the ring addresses (SET_VRING_ADDR). A running ring is
// paused and set up again at once (the front end toggles VHOST_VRING_F_LOG
// during migration); if the new addresses do not translate, it keeps the
// old ones.
func (q *queue) setAddr(a wire.VringAddr, env ringEnv) error {
	if q.state == queueStopped {
		q.addr, q.addrSet = a, true
		return nil
	}
	q.pause()
	old := q.addr
	q.addr = a
	if err := q.setupRing(env); err != nil {
		q.addr = old
		q.setupRing(env)
		q.resume(env)
		return fmt.Errorf("queue %d: %w", q.index, err)
	}
	q.resume(env)
	return nil
}

// takeBase stops the queue for GET_VRING_BASE and returns the next avail
// index (a packed ring's avail and used positions); the kick fd is closed
// and must be set again before a restart.
func (q *queue) takeBase() uint32 {
	// "stop ring upon receiving VHOST_USER_GET_VRING_BASE": wait for
	// the requests in flight so that none completes after the reply.
	q.stop()
	q.closeKick()
	return q.baseFull()
}

// setKick replaces the kick eventfd (nil: poll). A running queue keeps
// running on the new fd; a stopped one starts, as "the back-end must start
// ring upon receiving a kick": the ring goroutine starts now and pops once
// the ring is enabled.
func (q *queue) setKick(f *os.File, env ringEnv) error {
	wasRunning := q.state == queueRunning
	q.pause()
	if q.kick != nil {
		q.kick.Close()
	}
	q.kick, q.kickSet = f, true
	if wasRunning {
		q.resume(env)
		return nil
	}
	if err := q.configured(); err != nil {
		return fmt.Errorf("queue %d: cannot start: %w", q.index, err)
	}
	if err := q.start(env); err != nil {
		return fmt.Errorf("queue %d: %w", q.index, err)
	}
	return nil
}

// closeKick closes the kick fd, if any, and forgets it.
func (q *queue) closeKick() {
	if q.kick != nil {
		q.kick.Close()
		q.kick = nil
	}
	q.kickSet = false
}

// setCall replaces the call eventfd's writer (nil: none).
func (q *queue) setCall(n *notifier) {
	old := q.call.Swap(n)
	if old == nil {
		return
	}
	old.close()
	if n != nil {
		// A completer that loaded the old fd may have signalled it after
		// QEMU stopped looking at it: QEMU sends SET_VRING_CALL without
		// waiting for a reply when the guest masks or unmasks an MSI-X
		// vector, and tests the fd it replaces before this back end has
		// read the message (virtio_pci_one_vector_unmask). Signal the new
		// one so that no completion waits for an interrupt that was lost;
		// a spurious interrupt costs the driver one look at the used ring.
		// The notifier's goroutine writes: this goroutine must not wait
		// for the front end.
		n.signalAsync()
	}
}

// setErr replaces the error eventfd's writer (nil: none).
func (q *queue) setErr(n *notifier) {
	if old := q.errf.Swap(n); old != nil {
		old.close()
	}
}

// enable enables or disables the ring (SET_VRING_ENABLE, or SET_FEATURES
// without VHOST_USER_F_PROTOCOL_FEATURES).
func (q *queue) enable(on bool) {
	q.enabled.Store(on)
	if q.state == queueRunning {
		q.nudge()
	}
}

// disable stops the queue and disables it (RESET_OWNER).
func (q *queue) disable() {
	q.stop()
	q.enabled.Store(false)
}

// reset stops the queue and forgets its configuration (RESET_DEVICE,
// SET_STATUS 0); the call and error eventfds stay.
func (q *queue) reset() {
	q.stop()
	q.closeKick()
	q.addrSet = false
	q.num, q.base, q.baseHi = 0, 0, 0
	q.enabled.Store(false)
}

// close stops the queue and closes its fds (the connection is gone).
func (q *queue) close() {
	q.stop()
	q.closeKick()
	q.call.Swap(nil).close()
	q.errf.Swap(nil).close()
}

// dropRequests frees the per-head request table of a closed queue and
// returns its size in bytes.
func (q *queue) dropRequests() uintptr {
	n := uintptr(len(q.reqs)) * unsafe.Sizeof(request{})
	q.reqs = nil
	return n
}

// configured reports whether the queue has what it needs to start.
func (q *queue) configured() error {
	switch {
	case q.num == 0:
		return errors.New("no SET_VRING_NUM")
	case !q.addrSet:
		return errors.New("no SET_VRING_ADDR")
	case !q.kickSet:
		return errors.New("no SET_VRING_KICK")
	}
	return nil
}
