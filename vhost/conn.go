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
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
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

// message is one decoded front-end request as a handler sees it. A
// handler that keeps an fd takes it (take) so that serve does not close
// it; one that replies with an fd sets replyFD, which is closed once sent.
type message struct {
	h       wire.Header
	pl      wire.Payload
	fds     []int
	replyFD int
}

// msgHandler performs one decoded request. It returns the payload of the
// request's explicit reply, for the requests that have one
// (HasReply); the others return nil and get a REPLY_ACK reply if asked.
type msgHandler func(c *conn, m *message) (reply wire.Payload, err error)

// handlers maps each request this back end serves to its method. Which
// requests carry fds and which have a reply of their own is the wire
// layer's (msgSpecs, msg.go): the payload is decoded and its fds counted
// before the method runs.
var handlers = [...]msgHandler{
	wire.ReqGetFeatures:         (*conn).getFeatures,
	wire.ReqSetFeatures:         (*conn).setFeatures,
	wire.ReqGetProtocolFeatures: (*conn).getProtocolFeatures,
	wire.ReqSetProtocolFeatures: (*conn).setProtocolFeatures,
	wire.ReqSetOwner:            (*conn).setOwner,
	wire.ReqResetOwner:          (*conn).resetOwner,
	wire.ReqGetQueueNum:         (*conn).getQueueNum,
	wire.ReqGetMaxMemSlots:      (*conn).getMaxMemSlots,
	wire.ReqSetMemTable:         (*conn).setMemTable,
	wire.ReqAddMemReg:           (*conn).addMemReg,
	wire.ReqRemMemReg:           (*conn).remMemReg,
	wire.ReqSetLogBase:          (*conn).setLogBase,
	wire.ReqSetLogFD:            (*conn).setLogFD,
	wire.ReqSetVringNum:         (*conn).setVringNum,
	wire.ReqSetVringAddr:        (*conn).setVringAddr,
	wire.ReqSetVringBase:        (*conn).setVringBase,
	wire.ReqGetVringBase:        (*conn).getVringBase,
	wire.ReqSetVringKick:        (*conn).setVringKick,
	wire.ReqSetVringCall:        (*conn).setVringCall,
	wire.ReqSetVringErr:         (*conn).setVringErr,
	wire.ReqSetVringEnable:      (*conn).setVringEnable,
	wire.ReqGetConfig:           (*conn).getConfig,
	wire.ReqSetConfig:           (*conn).setConfig,
	wire.ReqSetBackendReqFD:     (*conn).setBackendReqFD,
	wire.ReqGetInflightFD:       (*conn).getInflightFD,
	wire.ReqSetInflightFD:       (*conn).setInflightFD,
	wire.ReqResetDevice:         (*conn).resetDeviceMsg,
	wire.ReqSetStatus:           (*conn).setStatus,
	wire.ReqGetStatus:           (*conn).getStatus,
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

func (c *conn) getFeatures(*message) (wire.Payload, error) { return wire.U64(c.e.blkFeatures()), nil }

func (c *conn) setFeatures(m *message) (wire.Payload, error) {
	e := c.e
	v := uint64(m.pl.(wire.U64))
	// A front end that negotiated discard or write-zeroes before a
	// reload took them away (QEMU keeps the guest's features when it
	// reconnects) may ask for them again: such requests then get
	// UNSUPP.
	acceptable := e.blkFeatures()
	if !e.readOnly {
		acceptable |= virtio.BlkFeatureDiscard | virtio.BlkFeatureWriteZeroes
	}
	if v&^acceptable != 0 {
		return nil, fmt.Errorf("features %#x not offered (offered %#x)", v, e.blkFeatures())
	}
	c.quiesce(func() {
		c.features, c.featuresSet = v, true
		c.blk.features.Store(v)
	})
	// vhost-user.rst, "Ring states": "If VHOST_USER_F_PROTOCOL_FEATURES
	// has not been negotiated, the ring starts directly in the enabled
	// state."
	if v&virtio.FeatureProtocolFeatures == 0 {
		for _, q := range c.dev.queues {
			q.enable(true)
		}
	}
	return nil, nil
}

func (c *conn) getProtocolFeatures(*message) (wire.Payload, error) {
	return wire.U64(protocolFeatures), nil
}

func (c *conn) setProtocolFeatures(m *message) (wire.Payload, error) {
	v := uint64(m.pl.(wire.U64))
	if v&^uint64(protocolFeatures) != 0 {
		return nil, fmt.Errorf("protocol features %#x not offered (offered %#x)", v, uint64(protocolFeatures))
	}
	c.protocol.Store(v)
	return nil, nil
}

func (c *conn) setOwner(*message) (wire.Payload, error) {
	if !c.negotiated {
		c.negotiated = true
		c.setIdleDeadline()
	}
	return nil, nil
}

func (c *conn) resetOwner(*message) (wire.Payload, error) {
	// "It is recommended that back-ends either ignore this message, or
	// use it to disable all rings."
	for _, q := range c.dev.queues {
		q.disable()
	}
	return nil, nil
}

func (c *conn) getQueueNum(*message) (wire.Payload, error) { return wire.U64(len(c.dev.queues)), nil }

func (c *conn) getMaxMemSlots(*message) (wire.Payload, error) { return wire.U64(maxMemSlots), nil }

func (c *conn) setMemTable(m *message) (wire.Payload, error) {
	t := m.pl.(wire.MemTable)
	var regs []*memRegion
	for i, r := range t.Regions {
		mr, err := mapRegion(r, m.fds[i])
		if err != nil {
			unmapAll(regs)
			return nil, err
		}
		regs = append(regs, mr)
	}
	return nil, c.setMem(regs, c.regions)
}

func (c *conn) addMemReg(m *message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolConfigureMemSlots == 0 {
		return nil, errors.New("CONFIGURE_MEM_SLOTS not negotiated")
	}
	if len(c.regions) >= maxMemSlots {
		return nil, fmt.Errorf("all %d memory slots in use", maxMemSlots)
	}
	mr, err := mapRegion(m.pl.(wire.SingleMemRegion).Region, m.fds[0])
	if err != nil {
		return nil, err
	}
	regs := append(append([]*memRegion(nil), c.regions...), mr)
	if err := c.setMem(regs, nil); err != nil {
		mr.unmap()
		return nil, err
	}
	return nil, nil
}

func (c *conn) remMemReg(m *message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolConfigureMemSlots == 0 {
		return nil, errors.New("CONFIGURE_MEM_SLOTS not negotiated")
	}
	// "The memory region to be removed is identified by its guest
	// address, user address and size. The mmap offset is ignored."
	r := m.pl.(wire.SingleMemRegion).Region
	var keep, gone []*memRegion
	for _, mr := range c.regions {
		if mr.GPA == r.GPA && mr.UserAddr == r.UserAddr && mr.Size == r.Size && gone == nil {
			gone = append(gone, mr)
		} else {
			keep = append(keep, mr)
		}
	}
	if gone == nil {
		return nil, fmt.Errorf("no memory region at %#x size %#x user address %#x", r.GPA, r.Size, r.UserAddr)
	}
	return nil, c.setMem(keep, gone)
}

// setLogBase maps the dirty log. vhost-user.rst, "Communication":
// SET_LOG_BASE has a reply when LOG_SHMFD is negotiated.
func (c *conn) setLogBase(m *message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolLogSHMFD == 0 {
		return nil, errors.New("LOG_SHMFD not negotiated")
	}
	l, err := mapLog(m.fds[0], m.pl.(wire.LogDesc))
	if err != nil {
		return nil, err
	}
	old := c.dlog
	c.quiesce(func() { c.dlog = l })
	old.unmap()
	return wire.U64(0), nil
}

// setLogFD takes the optional log eventfd; this back end does not signal
// it.
func (c *conn) setLogFD(*message) (wire.Payload, error) { return nil, nil }

func (c *conn) setVringNum(m *message) (wire.Payload, error) {
	s := m.pl.(wire.VringState)
	q, err := c.queue(s.Index)
	if err != nil {
		return nil, err
	}
	return nil, q.setNum(s.Num)
}

func (c *conn) setVringAddr(m *message) (wire.Payload, error) {
	a := m.pl.(wire.VringAddr)
	q, err := c.queue(a.Index)
	if err != nil {
		return nil, err
	}
	return nil, q.setAddr(a, c.env())
}

func (c *conn) setVringBase(m *message) (wire.Payload, error) {
	s := m.pl.(wire.VringState)
	q, err := c.queue(s.Index)
	if err != nil {
		return nil, err
	}
	return nil, q.setBase(s.Num)
}

func (c *conn) getVringBase(m *message) (wire.Payload, error) {
	s := m.pl.(wire.VringState)
	q, err := c.queue(s.Index)
	if err != nil {
		return nil, connError{err}
	}
	return wire.VringState{Index: s.Index, Num: uint32(q.takeBase())}, nil
}

func (c *conn) setVringKick(m *message) (wire.Payload, error) {
	v := m.pl.(wire.VringFD)
	q, err := c.queue(uint32(v.Index))
	if err != nil {
		return nil, err
	}
	var f *os.File
	if !v.NoFD {
		if err := checkEventfd(m.fds[0]); err != nil {
			return nil, fmt.Errorf("queue %d: kick: %w", v.Index, err)
		}
		fd := take(m.fds, 0)
		unix.SetNonblock(fd, true)
		f = os.NewFile(uintptr(fd), fmt.Sprintf("kick%d", v.Index))
	}
	return nil, q.setKick(f, c.env())
}

// notifierOf checks and takes the eventfd of SET_VRING_CALL or
// SET_VRING_ERR; nil with the no-fd bit.
func (c *conn) notifierOf(m *message, what string) (*queue, *notifier, error) {
	v := m.pl.(wire.VringFD)
	q, err := c.queue(uint32(v.Index))
	if err != nil {
		return nil, nil, err
	}
	if v.NoFD {
		return q, nil, nil
	}
	if err := checkEventfd(m.fds[0]); err != nil {
		return nil, nil, fmt.Errorf("queue %d: %s: %w", v.Index, m.h.Code, err)
	}
	return q, newNotifier(take(m.fds, 0), fmt.Sprintf("%s%d", what, v.Index), c.log), nil
}

func (c *conn) setVringCall(m *message) (wire.Payload, error) {
	q, n, err := c.notifierOf(m, "call")
	if err != nil {
		return nil, err
	}
	q.setCall(n)
	return nil, nil
}

func (c *conn) setVringErr(m *message) (wire.Payload, error) {
	q, n, err := c.notifierOf(m, "err")
	if err != nil {
		return nil, err
	}
	q.setErr(n)
	return nil, nil
}

func (c *conn) setVringEnable(m *message) (wire.Payload, error) {
	s := m.pl.(wire.VringState)
	q, err := c.queue(s.Index)
	if err != nil {
		return nil, err
	}
	if s.Num > 1 {
		return nil, fmt.Errorf("queue %d: enable %d, want 0 or 1", s.Index, s.Num)
	}
	q.enable(s.Num == 1)
	return nil, nil
}

func (c *conn) getConfig(m *message) (wire.Payload, error) {
	cm := m.pl.(wire.ConfigMsg)
	if c.protocol.Load()&wire.ProtocolConfig == 0 {
		return rawPayload(nil), nil
	}
	// "vhost-user back-end uses zero length of payload to indicate an
	// error"; any range within the 96-byte config space is served.
	if uint64(cm.Offset)+uint64(cm.Size) > virtio.ConfigSpaceSize {
		c.log.Warn("GET_CONFIG beyond config space", "offset", cm.Offset, "size", cm.Size)
		return rawPayload(nil), nil
	}
	cfg := c.blk.config()
	cm.Data = cfg[cm.Offset : cm.Offset+cm.Size]
	return cm, nil
}

func (c *conn) setConfig(m *message) (wire.Payload, error) {
	cm := m.pl.(wire.ConfigMsg)
	if c.protocol.Load()&wire.ProtocolConfig == 0 {
		return nil, errors.New("CONFIG not negotiated")
	}
	// "back-ends MUST NOT accept SET_CONFIG for read-only configuration
	// space fields unless the live migration bit is set". The only
	// writable field is writeback (offset 32), with CONFIG_WCE.
	const wceOff = 32
	covers := cm.Offset <= wceOff && cm.Offset+cm.Size > wceOff
	if cm.Flags == wire.ConfigFlagWritable && (cm.Offset != wceOff || cm.Size != 1) {
		return nil, fmt.Errorf("SET_CONFIG of read-only bytes %d+%d", cm.Offset, cm.Size)
	}
	if uint64(cm.Offset)+uint64(cm.Size) > virtio.ConfigSpaceSize {
		return nil, fmt.Errorf("SET_CONFIG %d+%d beyond config space", cm.Offset, cm.Size)
	}
	if covers {
		if c.features&virtio.BlkFeatureConfigWCE == 0 {
			return nil, errors.New("writeback written without CONFIG_WCE")
		}
		wb := cm.Data[wceOff-cm.Offset]
		if wb > 1 {
			return nil, fmt.Errorf("writeback %d, want 0 or 1", wb)
		}
		c.blk.writeback.Store(wb == 1)
		c.log.Info("cache mode set", "writeback", wb == 1)
	}
	return nil, nil
}

func (c *conn) setBackendReqFD(m *message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolBackendReq == 0 {
		return nil, errors.New("BACKEND_REQ not negotiated")
	}
	f := os.NewFile(uintptr(take(m.fds, 0)), "backend-req")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("back-end channel: %w", err)
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return nil, errors.New("back-end channel is not a unix socket")
	}
	c.mu.Lock()
	old := c.backend
	c.backend = newBackendChan(uc)
	c.mu.Unlock()
	if old != nil {
		old.close()
	}
	return nil, nil
}

func (c *conn) getInflightFD(m *message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolInflightSHMFD == 0 {
		return nil, connError{errors.New("GET_INFLIGHT_FD: INFLIGHT_SHMFD not negotiated")}
	}
	if c.anyRunning() {
		return nil, connError{errors.New("GET_INFLIGHT_FD while queues run")}
	}
	d := m.pl.(wire.InflightDesc)
	r, fd, rd, err := createInflight(d.NumQueues, d.QueueSize)
	if err != nil {
		return nil, connError{err}
	}
	m.replyFD = fd
	c.inflight.unmap()
	c.inflight = r
	return rd, nil
}

func (c *conn) setInflightFD(m *message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolInflightSHMFD == 0 {
		return nil, errors.New("INFLIGHT_SHMFD not negotiated")
	}
	if c.anyRunning() {
		return nil, errors.New("SET_INFLIGHT_FD while queues run")
	}
	r, err := mapInflight(m.fds[0], m.pl.(wire.InflightDesc))
	if err != nil {
		return nil, err
	}
	c.inflight.unmap()
	c.inflight = r
	return nil, nil
}

func (c *conn) resetDeviceMsg(*message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolResetDevice == 0 {
		return nil, errors.New("RESET_DEVICE not negotiated")
	}
	c.resetDevice()
	return nil, nil
}

func (c *conn) setStatus(m *message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolStatus == 0 {
		return nil, errors.New("STATUS not negotiated")
	}
	v := uint64(m.pl.(wire.U64))
	if v > 0xff {
		return nil, fmt.Errorf("device status %#x beyond 8 bits", v)
	}
	c.status = v
	if v == 0 {
		c.resetDevice() // virtio 1.x 2.1: writing 0 resets the device
	}
	return nil, nil
}

func (c *conn) getStatus(*message) (wire.Payload, error) {
	if c.protocol.Load()&wire.ProtocolStatus == 0 {
		return nil, connError{errors.New("GET_STATUS: STATUS not negotiated")}
	}
	return wire.U64(c.status), nil
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
		n += uintptr(len(q.reqs)) * unsafe.Sizeof(request{})
		q.reqs = nil
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
