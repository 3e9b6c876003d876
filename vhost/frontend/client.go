package frontend

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// le is the byte order of every virtio and vhost-user field.
var le = binary.LittleEndian

// Config configures a Client.
type Config struct {
	Socket    string // the back end's unix socket
	NumQueues int    // default 1
	QueueSize int    // power of two, default 128
	MemSize   uint64 // guest memory bytes, default 64 MiB
	Regions   int    // guest memory split into this many regions, default 1
	// Indirect puts every request in an indirect table when the back end
	// offers VIRTIO_F_RING_INDIRECT_DESC.
	Indirect bool
	// NoEventIdx declines VIRTIO_F_RING_EVENT_IDX.
	NoEventIdx bool
	// Packed negotiates VIRTIO_F_RING_PACKED (Dial fails if the back end
	// does not offer it); QueueSize then need not be a power of two.
	Packed bool
	// MemTable sends SET_MEM_TABLE even when the back end offers
	// CONFIGURE_MEM_SLOTS (then ADD_MEM_REG is used, as QEMU does).
	MemTable bool
	// Inflight negotiates INFLIGHT_SHMFD when offered: the client gets the
	// inflight region with GET_INFLIGHT_FD and hands it back on Reconnect,
	// so that a restarted back end resubmits what was in flight.
	Inflight bool
	// MemDir, if set, backs guest memory with an unnamed regular file
	// (O_TMPFILE) in that directory instead of a memfd, as QEMU's
	// memory-backend-file on a disk file system does.
	MemDir string
	// NoReplyAck declines REPLY_ACK; by default every request that has no
	// reply of its own is sent with NEED_REPLY and its result checked.
	NoReplyAck bool
	// OnConfigChange is called (from the back-end channel's goroutine) for
	// each CONFIG_CHANGE_MSG. May be nil.
	OnConfigChange func()
}

// Client is a vhost-user-blk front end, as QEMU is: it owns memfd guest
// memory shared with the back end, negotiates features, sets up the memory
// table and the rings with eventfds, and submits virtio-blk requests on any
// queue, many at a time. Its methods may be called from any goroutine;
// completion callbacks run on the queue's completion goroutine and must not
// block.
type Client struct {
	cfg Config

	// Immutable after Dial.
	memfd  int
	mem    []byte // guest memory; GPA 0 is mem[0]
	base   uintptr
	queues []*clientQueue
	heap   pageAlloc

	mu         sync.Mutex // guards the socket and everything below
	uc         *net.UnixConn
	wc         *wire.Conn // framing on uc
	features   uint64
	protocol   uint64
	config     BlkConfig
	inflightFD int
	inflight   wire.InflightDesc
	backend    *net.UnixConn
	logFD      int
	logMem     []byte
	closed     bool

	configChanges atomic.Uint64
}

// Errors of the client.
var (
	ErrRingFull     = errors.New("vhost client: no free descriptors")
	ErrClientClosed = errors.New("vhost client: closed")
)

// Dial connects to the back end at cfg.Socket, retrying until ctx is done
// while the socket does not accept, and sets up the device as QEMU does.
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	if cfg.NumQueues == 0 {
		cfg.NumQueues = 1
	}
	if cfg.QueueSize == 0 {
		cfg.QueueSize = 128
	}
	if cfg.MemSize == 0 {
		cfg.MemSize = 64 << 20
	}
	if cfg.Regions == 0 {
		cfg.Regions = 1
	}
	if cfg.NumQueues < 1 || cfg.NumQueues > 256 {
		return nil, fmt.Errorf("vhost client: %d queues", cfg.NumQueues)
	}
	if qs := cfg.QueueSize; qs < 2 || qs > virtio.MaxQueueSize || (qs&(qs-1) != 0 && !cfg.Packed) {
		return nil, fmt.Errorf("vhost client: queue size %d: must be a power of two from 2 to %d", qs, virtio.MaxQueueSize)
	}
	if cfg.Regions < 1 || cfg.Regions > wire.MaxFDs {
		return nil, fmt.Errorf("vhost client: %d regions", cfg.Regions)
	}
	c := &Client{cfg: cfg, memfd: -1, inflightFD: -1, logFD: -1}
	if err := c.allocMemory(); err != nil {
		c.release()
		return nil, err
	}
	if err := c.connect(ctx); err != nil {
		c.release()
		return nil, err
	}
	if err := c.setup(); err != nil {
		c.uc.Close()
		c.release()
		return nil, err
	}
	for _, q := range c.queues {
		go q.complete()
	}
	return c, nil
}

// release frees what allocMemory made. Each fd is closed once: the test
// suites run the back end in this process, where a number closed twice
// may by then be one of the back end's fds.
func (c *Client) release() {
	for _, q := range c.queues {
		if q.call != nil {
			q.call.Close() // callFD is its fd; a second Close does nothing
		}
		q.kickMu.Lock()
		if q.kickFD >= 0 {
			unix.Close(q.kickFD)
			q.kickFD = -1
		}
		q.kickMu.Unlock()
	}
	if c.mem != nil {
		unix.Munmap(c.mem)
		c.mem = nil
	}
	if c.memfd >= 0 {
		unix.Close(c.memfd)
	}
	if c.inflightFD >= 0 {
		unix.Close(c.inflightFD)
	}
	if c.logMem != nil {
		unix.Munmap(c.logMem)
	}
	if c.logFD >= 0 {
		unix.Close(c.logFD)
	}
}

// connect dials the socket, retrying until ctx is done.
func (c *Client) connect(ctx context.Context) error {
	var d net.Dialer
	for {
		nc, err := d.DialContext(ctx, "unix", c.cfg.Socket)
		if err == nil {
			c.uc = nc.(*net.UnixConn)
			c.wc = wire.NewConn(c.uc)
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vhost client: connect %s: %w", c.cfg.Socket, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// clientWantFeatures are the virtio features the client accepts.
const clientWantFeatures = virtio.FeatureVersion1 | virtio.FeatureProtocolFeatures | virtio.BlkFeatureSizeMax | virtio.BlkFeatureSegMax |
	virtio.BlkFeatureBlkSize | virtio.BlkFeatureTopology | virtio.BlkFeatureFlush | virtio.BlkFeatureConfigWCE | virtio.BlkFeatureMQ |
	virtio.BlkFeatureDiscard | virtio.BlkFeatureWriteZeroes | virtio.BlkFeatureRO

// setup negotiates and sets up memory and rings, as QEMU's
// vhost_user_backend_init and vhost_dev_start do. The caller holds c.mu or
// is Dial.
func (c *Client) setup() error {
	f, err := c.getU64(wire.ReqGetFeatures)
	if err != nil {
		return err
	}
	want := uint64(clientWantFeatures)
	if c.cfg.Indirect {
		want |= virtio.FeatureIndirectDesc
	}
	if !c.cfg.NoEventIdx {
		want |= virtio.FeatureEventIdx
	}
	if c.cfg.Packed {
		if f&virtio.FeatureRingPacked == 0 {
			return fmt.Errorf("vhost client: back end does not offer VIRTIO_F_RING_PACKED (features %#x)", f)
		}
		want |= virtio.FeatureRingPacked
	}
	c.features = f & want
	c.protocol = 0
	if f&virtio.FeatureProtocolFeatures != 0 {
		pf, err := c.getU64(wire.ReqGetProtocolFeatures)
		if err != nil {
			return err
		}
		wantP := uint64(wire.ProtocolMQ | wire.ProtocolConfig | wire.ProtocolBackendReq | wire.ProtocolLogSHMFD | wire.ProtocolResetDevice | wire.ProtocolStatus)
		if !c.cfg.NoReplyAck {
			wantP |= wire.ProtocolReplyAck
		}
		if !c.cfg.MemTable {
			wantP |= wire.ProtocolConfigureMemSlots
		}
		if c.cfg.Inflight {
			wantP |= wire.ProtocolInflightSHMFD
		}
		c.protocol = pf & wantP
		if err := c.setU64(wire.ReqSetProtocolFeatures, c.protocol); err != nil {
			return err
		}
	}
	if c.protocol&wire.ProtocolMQ != 0 {
		n, err := c.getU64(wire.ReqGetQueueNum)
		if err != nil {
			return err
		}
		if n < uint64(c.cfg.NumQueues) {
			return fmt.Errorf("vhost client: back end supports %d queues, want %d", n, c.cfg.NumQueues)
		}
	} else if c.cfg.NumQueues > 1 {
		return fmt.Errorf("vhost client: back end does not offer MQ, want %d queues", c.cfg.NumQueues)
	}
	if c.protocol&wire.ProtocolConfigureMemSlots != 0 {
		n, err := c.getU64(wire.ReqGetMaxMemSlots)
		if err != nil {
			return err
		}
		if n < uint64(c.cfg.Regions) {
			return fmt.Errorf("vhost client: back end has %d memory slots, want %d", n, c.cfg.Regions)
		}
	}
	if c.protocol&wire.ProtocolBackendReq != 0 {
		if err := c.setupBackendChannel(); err != nil {
			return err
		}
	}
	if err := c.send(wire.ReqSetOwner, wire.NoPayload{}, nil); err != nil {
		return err
	}
	if c.protocol&wire.ProtocolConfig != 0 {
		b, err := c.getConfigLocked(0, 60)
		if err != nil {
			return err
		}
		c.config = ParseBlkConfig(b)
	}
	if err := c.setU64(wire.ReqSetFeatures, c.features); err != nil {
		return err
	}
	if c.protocol&wire.ProtocolConfigureMemSlots != 0 {
		for _, r := range c.regions() {
			if err := c.send(wire.ReqAddMemReg, wire.SingleMemRegion{Region: r}, []int{c.memfd}); err != nil {
				return err
			}
		}
	} else {
		if err := c.send(wire.ReqSetMemTable, wire.MemTable{Regions: c.regions()}, repeatFD(c.memfd, c.cfg.Regions)); err != nil {
			return err
		}
	}
	if c.protocol&wire.ProtocolInflightSHMFD != 0 {
		if c.inflightFD < 0 {
			d := wire.InflightDesc{NumQueues: uint16(c.cfg.NumQueues), QueueSize: uint16(c.cfg.QueueSize)}
			h, p, fds, err := c.request(wire.ReqGetInflightFD, d, nil, true)
			if err != nil {
				return err
			}
			if len(fds) != 1 || h.Size != wire.InflightDescSize {
				wire.CloseFDs(fds)
				return fmt.Errorf("vhost client: GET_INFLIGHT_FD reply of %d bytes with %d fds", h.Size, len(fds))
			}
			pl, err := wire.DecodePayload(wire.ReqGetInflightFD, p)
			if err != nil {
				wire.CloseFDs(fds)
				return err
			}
			c.inflight, c.inflightFD = pl.(wire.InflightDesc), fds[0]
		}
		if err := c.send(wire.ReqSetInflightFD, c.inflight, []int{c.inflightFD}); err != nil {
			return err
		}
	}
	for _, q := range c.queues {
		if err := c.setupQueue(q); err != nil {
			return err
		}
	}
	if c.protocol&wire.ProtocolStatus != 0 {
		// ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
		if err := c.setU64(wire.ReqSetStatus, 1|2|8|4); err != nil {
			return err
		}
	}
	return nil
}

func repeatFD(fd, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = fd
	}
	return out
}

// setupBackendChannel creates the back-end request channel.
func (c *Client) setupBackendChannel() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("back-end channel: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "backend-req")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		return fmt.Errorf("back-end channel: %w", err)
	}
	err = c.send(wire.ReqSetBackendReqFD, wire.NoPayload{}, []int{fds[1]})
	unix.Close(fds[1])
	if err != nil {
		nc.Close()
		return err
	}
	if c.backend != nil {
		c.backend.Close()
	}
	c.backend = nc.(*net.UnixConn)
	go c.serveBackend(c.backend)
	return nil
}

// serveBackend answers the back end's requests: CONFIG_CHANGE_MSG is
// counted and passed to OnConfigChange; others are refused.
func (c *Client) serveBackend(uc *net.UnixConn) {
	defer uc.Close()
	wc := wire.NewConn(uc)
	for {
		h, _, fds, err := wc.ReadMsg()
		wire.CloseFDs(fds)
		if err != nil {
			return
		}
		var res uint64
		if wire.BackendReqCode(h.Code) == wire.BackendConfigChangeMsg {
			c.configChanges.Add(1)
			if c.cfg.OnConfigChange != nil {
				c.cfg.OnConfigChange()
			}
		} else {
			res = 1
		}
		if h.NeedReply() {
			if err := wc.WriteMsg(h.Code, wire.FlagVersion|wire.FlagReply, wire.U64(res), nil, 30*time.Second); err != nil {
				return
			}
		}
	}
}

// ConfigChanges returns how many CONFIG_CHANGE_MSG the back end sent.
func (c *Client) ConfigChanges() uint64 { return c.configChanges.Load() }

// Features returns the negotiated virtio features.
func (c *Client) Features() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.features
}

// ProtocolFeatures returns the negotiated protocol features.
func (c *Client) ProtocolFeatures() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.protocol
}

// Config returns the config space read at connection time.
func (c *Client) Config() BlkConfig {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.config
}

// GetConfig reads size bytes of config space at offset with GET_CONFIG.
func (c *Client) GetConfig(offset, size uint32) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.getConfigLocked(offset, size)
}

// ReadConfig reads the whole config space prefix this client knows.
func (c *Client) ReadConfig() (BlkConfig, error) {
	b, err := c.GetConfig(0, 60)
	if err != nil {
		return BlkConfig{}, err
	}
	cfg := ParseBlkConfig(b)
	c.mu.Lock()
	c.config = cfg
	c.mu.Unlock()
	return cfg, nil
}

func (c *Client) getConfigLocked(offset, size uint32) ([]byte, error) {
	req := wire.ConfigMsg{Offset: offset, Size: size, Data: make([]byte, size)}
	h, p, _, err := c.request(wire.ReqGetConfig, req, nil, true)
	if err != nil {
		return nil, err
	}
	if h.Size != wire.ConfigHeaderSize+size {
		return nil, fmt.Errorf("vhost client: GET_CONFIG reply of %d bytes, want %d", h.Size, wire.ConfigHeaderSize+size)
	}
	return p[wire.ConfigHeaderSize:], nil
}

// SetWriteback writes the writeback byte of the config space (CONFIG_WCE).
func (c *Client) SetWriteback(on bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := byte(0)
	if on {
		v = 1
	}
	return c.send(wire.ReqSetConfig, wire.ConfigMsg{Offset: 32, Size: 1, Data: []byte{v}}, nil)
}

func (c *Client) getU64(code wire.ReqCode) (uint64, error) {
	h, p, _, err := c.request(code, wire.NoPayload{}, nil, true)
	if err != nil {
		return 0, err
	}
	if h.Size != 8 {
		return 0, fmt.Errorf("vhost client: %s reply of %d bytes", code, h.Size)
	}
	return le.Uint64(p), nil
}

func (c *Client) setU64(code wire.ReqCode, v uint64) error { return c.send(code, wire.U64(v), nil) }

// send sends a request that has no reply of its own; with REPLY_ACK it asks
// for one and checks it.
func (c *Client) send(code wire.ReqCode, pl wire.Payload, fds []int) error {
	ack := c.protocol&wire.ProtocolReplyAck != 0 && code != wire.ReqSetProtocolFeatures
	h, p, rfds, err := c.request(code, pl, fds, ack)
	wire.CloseFDs(rfds)
	if err != nil || !ack {
		return err
	}
	if h.Size != 8 {
		return fmt.Errorf("vhost client: %s ack of %d bytes", code, h.Size)
	}
	if v := le.Uint64(p); v != 0 {
		return fmt.Errorf("vhost client: %s failed (back end answered %d)", code, v)
	}
	return nil
}

// request sends one request and, if reply is set, reads its reply.
func (c *Client) request(code wire.ReqCode, pl wire.Payload, fds []int, reply bool) (wire.Header, []byte, []int, error) {
	if c.uc == nil {
		return wire.Header{}, nil, nil, ErrClientClosed
	}
	flags := wire.FlagVersion
	if reply && !wire.HasReply(code) {
		flags |= wire.FlagNeedReply
	}
	if err := c.wc.WriteMsg(code, flags, pl, fds, 30*time.Second); err != nil {
		return wire.Header{}, nil, nil, fmt.Errorf("vhost client: send %s: %w", code, err)
	}
	if !reply {
		return wire.Header{}, nil, nil, nil
	}
	c.uc.SetReadDeadline(time.Now().Add(30 * time.Second))
	h, p, rfds, err := c.wc.ReadMsg()
	c.uc.SetReadDeadline(time.Time{})
	if err != nil {
		return wire.Header{}, nil, nil, fmt.Errorf("vhost client: %s reply: %w", code, err)
	}
	if h.Code != code || !h.IsReply() {
		wire.CloseFDs(rfds)
		return wire.Header{}, nil, nil, fmt.Errorf("vhost client: %s answered with %s flags %#x", code, h.Code, h.Flags)
	}
	return h, bytes.Clone(p), rfds, nil
}

// NumQueues returns the number of queues.
func (c *Client) NumQueues() int { return len(c.queues) }

// Stop stops every queue with GET_VRING_BASE, which waits for the back end
// to finish the requests in flight, and remembers the bases for Reconnect.
func (c *Client) Stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, q := range c.queues {
		h, p, _, err := c.request(wire.ReqGetVringBase, wire.VringState{Index: uint32(q.idx)}, nil, true)
		if err != nil {
			return err
		}
		if h.Size != 8 {
			return fmt.Errorf("vhost client: GET_VRING_BASE reply of %d bytes", h.Size)
		}
		q.mu.Lock()
		q.base, q.baseSet = uint16(le.Uint32(p[4:])), true
		if q.pk != nil {
			q.pk.base = le.Uint32(p[4:])
		}
		q.mu.Unlock()
	}
	return nil
}

// Reconnect drops the connection and connects again (to the same or a
// restarted back end), retrying until ctx is done, then sets up the device
// again. Requests in flight stay in the rings: a back end with the inflight
// region this client hands back completes them.
func (c *Client) Reconnect(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClientClosed
	}
	if c.uc != nil {
		c.uc.Close()
		c.uc = nil
	}
	if c.backend != nil {
		c.backend.Close()
		c.backend = nil
	}
	for {
		if err := c.connect(ctx); err != nil {
			return err
		}
		err := c.setup()
		if err == nil {
			return nil
		}
		c.uc.Close()
		c.uc = nil
		if ctx.Err() != nil {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Close closes the connection, fails requests still in flight and releases
// guest memory.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	if c.uc != nil {
		c.uc.Close()
		c.uc = nil
	}
	if c.backend != nil {
		c.backend.Close()
		c.backend = nil
	}
	c.mu.Unlock()
	for _, q := range c.queues {
		// release closes the file again, which does nothing: q.call
		// stays, as the owner of callFD.
		q.call.Close()
		<-q.done
	}
	for _, q := range c.queues {
		q.mu.Lock()
		q.dead = true
		var dones []func(Result)
		for i := range q.pend {
			if q.pend[i].inUse && q.pend[i].done != nil {
				dones = append(dones, q.pend[i].done)
			}
			q.pend[i] = clientPending{}
		}
		q.mu.Unlock()
		for _, d := range dones {
			d(Result{Err: ErrClientClosed})
		}
	}
	c.release()
	return nil
}
