package vhost

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
	"golang.org/x/sys/unix"
)

// This file holds one method per front-end request (handlers); conn.handle
// decodes a message, checks its fds and calls the method, and sends the
// reply.

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
	return nil, q.setNum(s.Num, c.features&virtio.FeatureRingPacked != 0)
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
	return nil, q.setBase(s.Num, c.features&virtio.FeatureRingPacked != 0)
}

func (c *conn) getVringBase(m *message) (wire.Payload, error) {
	s := m.pl.(wire.VringState)
	q, err := c.queue(s.Index)
	if err != nil {
		return nil, connError{err}
	}
	return wire.VringState{Index: s.Index, Num: q.takeBase()}, nil
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
