package vhost

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// protocolFeatures are the protocol features the back end offers.
const protocolFeatures = wire.ProtocolMQ | wire.ProtocolLogSHMFD | wire.ProtocolReplyAck | wire.ProtocolConfig | wire.ProtocolBackendReq |
	wire.ProtocolConfigureMemSlots | wire.ProtocolInflightSHMFD | wire.ProtocolResetDevice | wire.ProtocolStatus

// connError is a protocol violation: the connection is closed.
type connError struct{ err error }

func (e connError) Error() string { return e.err.Error() }
func (e connError) Unwrap() error { return e.err }

func fatalf(format string, args ...any) error { return connError{fmt.Errorf(format, args...)} }

// conn is one front-end connection. Its goroutine (serve) owns the
// negotiated features, the memory table, the log, the inflight region and
// the queues' configuration; the queues' own goroutines serve the rings.
type conn struct {
	e   *Export
	id  uint64
	uc  *net.UnixConn
	log *slog.Logger
	dev *queueRuntime // the queues
	blk *blkDev       // the virtio-blk semantics they serve

	closing    atomic.Bool // teardown started or close called
	negotiated bool        // SET_OWNER seen; owned by the connection goroutine

	// Owned by the connection goroutine.
	features    uint64
	featuresSet bool
	status      uint64
	mem         *Mem
	regions     []*memRegion
	dlog        *dirtyLog
	inflight    *inflightRegion
	wc          *wire.Conn // the socket's framing
	midMsg      bool       // readMsg set the deadline for the rest of a message

	protocol atomic.Uint64 // acked protocol features; read by configChanged

	mu      sync.Mutex // guards backend
	backend *backendChan
}

func newConn(e *Export, uc *net.UnixConn) *conn {
	n := e.connSeq.Add(1)
	log := e.log.With("conn", n)
	blk := newBlkDev(e)
	c := &conn{e: e, id: n, uc: uc, log: log, dev: newQueueRuntime(e, log, blk), blk: blk}
	c.wc = wire.NewConn(uc, wire.Strict(), wire.OnStart(c.startMsg))
	c.dev.onFault = func(err error) {
		c.log.Error("closing connection: fault on memory the front end shares", "err", err)
		c.close()
	}
	return c
}

// close makes the connection goroutine's read fail; it then tears down.
func (c *conn) close() {
	c.closing.Store(true)
	c.uc.Close()
}

// serve reads and handles messages until the front end goes away or breaks
// the protocol, then stops every queue (waiting for their requests) and
// releases guest memory.
func (c *conn) serve() {
	c.log.Info("front end connected")
	// The goroutine reads guest memory (the used index at queue start):
	// a fault there is a connection error too.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer c.teardown()
	c.setIdleDeadline()
	for {
		h, p, fds, err := c.readMsg()
		if err != nil {
			var ne net.Error
			switch {
			case c.dev.dead.Load():
				// onFault logged why.
			case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
				c.log.Info("front end disconnected")
			case errors.As(err, &ne) && ne.Timeout() && !c.negotiated:
				c.log.Warn("closing connection: negotiation not completed", "timeout", c.e.cfg.NegotiationTimeout)
			default:
				c.log.Warn("closing connection", "reason", err)
			}
			return
		}
		err = c.handleSafe(h, p, fds)
		wire.CloseFDs(fds)
		if err == nil {
			continue
		}
		var ce connError
		if errors.As(err, &ce) {
			c.log.Warn("closing connection", "request", h.Code.String(), "reason", err)
			return
		}
		unknown := errors.Is(err, wire.ErrUnknownRequest)
		if !unknown {
			c.log.Warn("request failed", "request", h.Code.String(), "err", err)
		}
		if h.NeedReply() && c.protocol.Load()&wire.ProtocolReplyAck != 0 {
			if err := c.reply(h.Code, wire.U64(1), -1); err != nil {
				c.log.Warn("closing connection", "reason", err)
				return
			}
			continue
		}
		if unknown {
			continue
		}
		c.log.Warn("closing connection", "request", h.Code.String(), "reason", "request failed and the front end asked for no reply")
		return
	}
}

// take removes fd i from fds so that serve does not close it.
func take(fds []int, i int) int {
	fd := fds[i]
	fds[i] = -1
	return fd
}

// setIdleDeadline sets the read deadline between messages: the
// negotiation deadline until SET_OWNER, none after.
func (c *conn) setIdleDeadline() {
	t := c.e.cfg.NegotiationTimeout
	if c.negotiated || t <= 0 {
		c.uc.SetReadDeadline(time.Time{})
		return
	}
	c.uc.SetReadDeadline(time.Now().Add(t))
}

// handleSafe is handle with the faults of the connection goroutine on
// shared memory turned into a connection error; a fault leaves the device
// dead, so that nothing touches that memory again.
func (c *conn) handleSafe(h wire.Header, p []byte, fds []int) (err error) {
	defer func() {
		if r := recover(); r != nil {
			c.dev.dead.Store(true)
			err = connError{fmt.Errorf("%s: fault on memory the front end shares: %s", h.Code, describePanic(r))}
		}
	}()
	return c.handle(h, p, fds)
}

// readMsg reads one message. Once its first bytes arrived, the rest must
// follow within the negotiation timeout.
func (c *conn) readMsg() (wire.Header, []byte, []int, error) {
	h, p, fds, err := c.wc.ReadMsg()
	if c.midMsg {
		c.midMsg = false
		c.setIdleDeadline()
	}
	return h, p, fds, err
}

// startMsg bounds the time the rest of a message may take once its first
// bytes arrived (wire.OnStart).
func (c *conn) startMsg() {
	if t := c.e.cfg.NegotiationTimeout; t > 0 {
		c.uc.SetReadDeadline(time.Now().Add(t))
		c.midMsg = true
	}
}

// reply sends a reply to code with payload pl and, if fd >= 0, one fd.
func (c *conn) reply(code wire.ReqCode, pl wire.Payload, fd int) error {
	var fds []int
	if fd >= 0 {
		fds = []int{fd}
	}
	if err := c.wc.WriteMsg(code, wire.FlagVersion|wire.FlagReply, pl, fds, 10*time.Second); err != nil {
		return connError{fmt.Errorf("send %s reply: %w", code, err)}
	}
	return nil
}

// rawPayload is a payload of raw bytes (GET_CONFIG's error reply is empty).
type rawPayload []byte

func (r rawPayload) AppendTo(b []byte) []byte { return append(b, r...) }

// queue returns queue i, or an error naming it.
func (c *conn) queue(i uint32) (*queue, error) {
	if i >= uint32(len(c.dev.queues)) {
		return nil, fmt.Errorf("queue %d: the device has %d queues", i, len(c.dev.queues))
	}
	return c.dev.queues[i], nil
}

// env is what the connection's rings are set up with.
func (c *conn) env() ringEnv {
	return ringEnv{mem: c.mem, features: c.features, dlog: c.dlog, inflight: c.inflight}
}

// handle decodes and performs one request and sends its reply: the
// explicit reply of the requests that have one, else a REPLY_ACK success
// when asked for. Syntax errors (size, fds) are connection errors;
// semantic errors fail the request (serve answers them).
func (c *conn) handle(h wire.Header, p []byte, fds []int) error {
	if h.IsReply() {
		return fatalf("%s: request carries the reply flag", h.Code)
	}
	pl, err := wire.DecodePayload(h.Code, p)
	if errors.Is(err, wire.ErrUnknownRequest) {
		c.log.Warn("unsupported request", "request", h.Code.String(), "size", h.Size, "fds", len(fds))
		return err
	}
	if err != nil {
		return connError{err}
	}
	if err := wire.CheckFDs(h.Code, pl, len(fds)); err != nil {
		return connError{err}
	}
	var fn msgHandler
	if int(h.Code) < len(handlers) {
		fn = handlers[h.Code]
	}
	if fn == nil {
		return fmt.Errorf("%s: %w", h.Code, wire.ErrUnknownRequest)
	}
	m := message{h: h, pl: pl, fds: fds, replyFD: -1}
	reply, err := fn(c, &m)
	if m.replyFD >= 0 {
		defer unix.Close(m.replyFD)
	}
	if err != nil {
		return err
	}
	if wire.HasReply(h.Code) {
		return c.reply(h.Code, reply, m.replyFD)
	}
	// REPLY_ACK: "the back-end MUST respond with a Payload VhostUserMsg
	// indicating success or failure ... unless the message already has an
	// explicit reply body".
	if h.NeedReply() && c.protocol.Load()&wire.ProtocolReplyAck != 0 {
		return c.reply(h.Code, wire.U64(0), -1)
	}
	return nil
}

// checkEventfd refuses an fd that is not an eventfd: a pipe or socket
// passed as a call or error fd could be kept full by the front end, and
// the kick fd is read as an 8-byte counter.
func checkEventfd(fd int) error {
	link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return fmt.Errorf("fd %d: %w", fd, err)
	}
	if link != "anon_inode:[eventfd]" {
		return fmt.Errorf("fd is %s, not an eventfd", link)
	}
	return nil
}

// anyRunning reports whether a queue is running or paused.
func (c *conn) anyRunning() bool {
	for _, q := range c.dev.queues {
		if !q.isStopped() {
			return true
		}
	}
	return false
}

// quiesce pauses the running queues (waiting for their requests), runs fn,
// and resumes them with the connection's current memory, features and log.
func (c *conn) quiesce(fn func()) {
	var paused []*queue
	for _, q := range c.dev.queues {
		if q.pause() {
			paused = append(paused, q)
		}
	}
	fn()
	env := c.env()
	for _, q := range paused {
		q.resume(env)
	}
}

// setMem replaces the memory table with regs, then unmaps gone once no
// queue can touch them.
func (c *conn) setMem(regs, gone []*memRegion) error {
	m, err := newMem(regs)
	if err != nil {
		// Unmap what is new in regs (not in the current table).
		cur := map[*memRegion]bool{}
		for _, r := range c.regions {
			cur[r] = true
		}
		for _, r := range regs {
			if !cur[r] {
				r.unmap()
			}
		}
		return err
	}
	c.quiesce(func() {
		c.mem, c.regions = m, regs
	})
	unmapAll(gone)
	return nil
}

func unmapAll(regs []*memRegion) {
	for _, r := range regs {
		r.unmap()
	}
}

// resetDevice stops every queue and forgets their configuration and the
// negotiated virtio features (RESET_DEVICE, SET_STATUS 0).
func (c *conn) resetDevice() {
	for _, q := range c.dev.queues {
		q.reset()
	}
	c.features, c.featuresSet = 0, false
	c.blk.features.Store(0)
	c.blk.writeback.Store(true)
}

// teardown stops the queues, waiting for every request in flight, then
// releases guest memory and the fds.
func (c *conn) teardown() {
	c.close()
	for _, q := range c.dev.queues {
		q.close()
	}
	if n := c.dev.dropped.Load(); n > 0 {
		c.log.Warn("requests dropped without completion after a fault", "requests", n)
	}
	unmapAll(c.regions)
	c.regions, c.mem = nil, nil
	c.dlog.unmap()
	c.dlog = nil
	c.inflight.unmap()
	c.inflight = nil
	c.mu.Lock()
	b := c.backend
	c.backend = nil
	c.mu.Unlock()
	if b != nil {
		b.close()
	}
	c.releaseMemory()
}

// releaseMemory hands the memory of large rings back to the system once
// the connection is gone: without it the Go runtime keeps the freed heap
// until its next collection, which an idle daemon may not run for
// minutes. It runs at most every 10 s per export, so that a front end
// reconnecting in a loop cannot make the daemon collect all the time.
func (c *conn) releaseMemory() {
	var n uintptr
	for _, q := range c.dev.queues {
		n += q.dropRequests()
	}
	if n < 4<<20 {
		return
	}
	now, last := mono(), c.e.freedAt.Load()
	if last != 0 && now-last < int64(10*time.Second) {
		return
	}
	if c.e.freedAt.CompareAndSwap(last, now) {
		debug.FreeOSMemory()
	}
}

// configChanged tells the front end that the config space changed
// (BACKEND_CONFIG_CHANGE_MSG), from any goroutine; it does not wait.
func (c *conn) configChanged() {
	if c.protocol.Load()&wire.ProtocolConfig == 0 {
		return
	}
	c.mu.Lock()
	b := c.backend
	c.mu.Unlock()
	if b == nil {
		c.log.Info("config changed, but the front end has no back-end channel")
		return
	}
	ack := c.protocol.Load()&wire.ProtocolReplyAck != 0
	go func() {
		if err := b.send(wire.BackendConfigChangeMsg, ack); err != nil {
			c.log.Warn("config change notification failed", "err", err)
		}
	}()
}

// backendChan is the back-end request channel (SET_BACKEND_REQ_FD).
type backendChan struct {
	mu sync.Mutex
	wc *wire.Conn
}

func newBackendChan(uc *net.UnixConn) *backendChan { return &backendChan{wc: wire.NewConn(uc)} }

// send sends a payload-less request and, with ack, waits for the
// front end's REPLY_ACK.
func (b *backendChan) send(code wire.BackendReqCode, ack bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	flags := wire.FlagVersion
	if ack {
		flags |= wire.FlagNeedReply
	}
	const timeout = 5 * time.Second
	b.wc.UnixConn().SetDeadline(time.Now().Add(timeout))
	if err := b.wc.WriteMsg(wire.ReqCode(code), flags, wire.NoPayload{}, nil, timeout); err != nil {
		return fmt.Errorf("send %s: %w", code, err)
	}
	if !ack {
		return nil
	}
	h, p, fds, err := b.wc.ReadMsg()
	wire.CloseFDs(fds)
	if err != nil {
		return fmt.Errorf("%s reply: %w", code, err)
	}
	if !h.IsReply() || h.Code != wire.ReqCode(code) {
		return fmt.Errorf("%s: bad reply header %+v", code, h)
	}
	if len(p) == 8 && le.Uint64(p) != 0 {
		return fmt.Errorf("%s: front end answered %d", code, le.Uint64(p))
	}
	return nil
}

func (b *backendChan) close() { b.wc.UnixConn().Close() }
