package vhost

import (
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// An export serves one front end. A second one that connects while the
// first is served is refused: its socket is closed at once and the refusal
// is logged. qemu-storage-daemon instead stops accepting, so a second QEMU
// waits in the listen backlog without a word; two front ends on one disk is
// a misconfiguration, and the second QEMU is better told at once (its
// vhost-user-blk realize fails) than left hanging. A front end that arrives
// while the previous one is going away (it hung up, or its connection is
// tearing down and finishing in-flight I/O) is queued instead, with a log
// line, so that a restarted or reconnecting QEMU is served as soon as the
// export is free.

// admitGrace is how long a new front end waits for a live current one to
// go away before it is refused: it covers a front end that reconnects
// before the back end noticed its old connection close.
const admitGrace = time.Second

// admit serves uc if the export is free, queues it while the current
// connection goes away, and refuses it otherwise.
func (e *Export) admit(uc *net.UnixConn, conns *sync.WaitGroup) {
	deadline := time.Now().Add(admitGrace)
	logged := false
	for {
		e.mu.Lock()
		if e.closed.Load() {
			e.mu.Unlock()
			uc.Close()
			return
		}
		if e.busy == nil {
			c := newConn(e, uc)
			done := make(chan struct{})
			e.conn, e.busy = c, done
			e.mu.Unlock()
			conns.Add(1)
			go func() {
				defer conns.Done()
				e.serveConn(c)
				e.mu.Lock()
				e.conn, e.busy = nil, nil
				e.mu.Unlock()
				close(done)
			}()
			return
		}
		busy, cur := e.busy, e.conn
		e.mu.Unlock()
		var prev uint64
		going := true
		if cur != nil {
			prev, going = cur.id, cur.goingAway()
		}
		if !going && time.Now().After(deadline) {
			e.log.Warn("refusing a second front end: the export serves one at a time", "serving_conn", prev)
			uc.Close()
			return
		}
		if going && !logged {
			e.log.Info("front end queued until the previous one has gone away", "previous_conn", prev)
			logged = true
		}
		wait := 20 * time.Millisecond
		if going {
			wait = time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-busy:
		case <-t.C:
		}
		t.Stop()
	}
}

// goingAway reports whether the connection is tearing down or its front
// end hung up.
func (c *conn) goingAway() bool {
	if c.closing.Load() {
		return true
	}
	rc, err := c.uc.SyscallConn()
	if err != nil {
		return true
	}
	hup := false
	cerr := rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, _ := unix.Poll(p, 0); n > 0 && p[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0 {
			hup = true
		}
	})
	return hup || cerr != nil
}

// watchCaps reads what the table serves and follows reloads: a change is
// logged and announced to the front end with a config change
// (BACKEND_CONFIG_CHANGE_MSG), as a resize is. Virtio feature bits are
// fixed for a connection, so the guest sees new bits when QEMU next
// connects (it negotiates again); until then the operation the table no
// longer serves completes with VIRTIO_BLK_S_UNSUPP.
func (e *Export) watchCaps() {
	tc := e.cfg.Table
	if tc == nil {
		e.discard.Store(true)
		e.zeroes.Store(true)
		return
	}
	d, z := tc.Discards()
	e.discard.Store(d)
	e.zeroes.Store(z)
	cancelResize := e.cancel
	cancelReload := tc.OnReload(func() {
		d, z := tc.Discards()
		od, oz := e.discard.Swap(d), e.zeroes.Swap(z)
		if od == d && oz == z {
			return
		}
		e.log.Info("table reloaded: discard support changed", "discard", d, "write_zeroes", z)
		e.mu.Lock()
		c := e.conn
		e.mu.Unlock()
		if c != nil {
			c.configChanged()
		}
	})
	e.cancel = func() {
		cancelResize()
		cancelReload()
	}
}
