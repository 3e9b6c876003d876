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
	"unsafe"

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
	// MemTable sends SET_MEM_TABLE even when the back end offers
	// CONFIGURE_MEM_SLOTS (then ADD_MEM_REG is used, as QEMU does).
	MemTable bool
	// Inflight negotiates INFLIGHT_SHMFD when offered: the client gets the
	// inflight region with GET_INFLIGHT_FD and hands it back on Reconnect,
	// so that a restarted back end resubmits what was in flight.
	Inflight bool
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

// BlkConfig is struct virtio_blk_config as read with GET_CONFIG.
type BlkConfig struct {
	Capacity              uint64 // 512-byte sectors
	SizeMax               uint32
	SegMax                uint32
	BlkSize               uint32
	PhysicalBlockExp      uint8
	AlignmentOffset       uint8
	MinIOSize             uint16
	OptIOSize             uint32
	Writeback             uint8
	NumQueues             uint16
	MaxDiscardSectors     uint32
	MaxDiscardSeg         uint32
	DiscardSectorAlign    uint32
	MaxWriteZeroesSectors uint32
	MaxWriteZeroesSeg     uint32
	WriteZeroesMayUnmap   uint8
}

// ParseBlkConfig decodes a config space prefix; missing fields are zero.
func ParseBlkConfig(b []byte) BlkConfig {
	var c [virtio.ConfigSpaceSize]byte
	copy(c[:], b)
	return BlkConfig{
		Capacity: le.Uint64(c[0:]), SizeMax: le.Uint32(c[8:]), SegMax: le.Uint32(c[12:]),
		BlkSize: le.Uint32(c[20:]), PhysicalBlockExp: c[24], AlignmentOffset: c[25],
		MinIOSize: le.Uint16(c[26:]), OptIOSize: le.Uint32(c[28:]), Writeback: c[32],
		NumQueues: le.Uint16(c[34:]), MaxDiscardSectors: le.Uint32(c[36:]), MaxDiscardSeg: le.Uint32(c[40:]),
		DiscardSectorAlign: le.Uint32(c[44:]), MaxWriteZeroesSectors: le.Uint32(c[48:]),
		MaxWriteZeroesSeg: le.Uint32(c[52:]), WriteZeroesMayUnmap: c[56],
	}
}

// Range is one discard or write-zeroes segment.
type Range struct {
	Sector  uint64
	Sectors uint32
	Flags   uint32 // BlkDiscardUnmap for write-zeroes
}

// Header is a vhost-user message header (RawRequest, RawConn).
type Header = wire.Header

// Desc is a split-ring descriptor (SubmitChain).
type Desc = virtio.Desc

// Descriptor flags (SubmitChain).
const (
	DescFlagNext     = virtio.DescFlagNext
	DescFlagWrite    = virtio.DescFlagWrite
	DescFlagIndirect = virtio.DescFlagIndirect
)

// Virtio-blk values a caller of Submit uses (virtio 1.x, 5.2).
const (
	BlkTypeIn          = virtio.BlkTypeIn
	BlkTypeOut         = virtio.BlkTypeOut
	BlkTypeFlush       = virtio.BlkTypeFlush
	BlkTypeGetID       = virtio.BlkTypeGetID
	BlkTypeDiscard     = virtio.BlkTypeDiscard
	BlkTypeWriteZeroes = virtio.BlkTypeWriteZeroes
	BlkStatusOK        = virtio.BlkStatusOK
	BlkStatusIOErr     = virtio.BlkStatusIOErr
	BlkStatusUnsupp    = virtio.BlkStatusUnsupp
	// BlkDiscardUnmap is VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
	BlkDiscardUnmap = virtio.BlkDiscardUnmap
	// BlkFeatureRO is the read-only device feature, in Features.
	BlkFeatureRO = virtio.BlkFeatureRO
)

// BlkRequest is one virtio-blk request. Data buffers must be guest memory
// (from Client.Buf): they are device-writable for IN and GET_ID,
// device-readable otherwise.
type BlkRequest struct {
	Type   uint32
	Sector uint64
	Data   [][]byte
	Ranges []Range // DISCARD, WRITE_ZEROES
}

// Result is the outcome of a request: the status byte the device wrote and
// the used length it reported, or Err if the request never completed.
type Result struct {
	Status uint8
	Len    uint32
	Err    error
}

// StatusError is a request completed with a status other than OK.
type StatusError struct{ Status uint8 }

func (e *StatusError) Error() string {
	switch e.Status {
	case virtio.BlkStatusIOErr:
		return "virtio-blk status IOERR"
	case virtio.BlkStatusUnsupp:
		return "virtio-blk status UNSUPP"
	}
	return fmt.Sprintf("virtio-blk status %d", e.Status)
}

// Errors of the client.
var (
	ErrRingFull     = errors.New("vhost client: no free descriptors")
	ErrClientClosed = errors.New("vhost client: closed")
)

const (
	slotSize      = 4096 // per head descriptor: header, status, segments, indirect table
	slotStatusOff = 16
	slotRangesOff = 32
	slotTableOff  = 512
	maxSlotTable  = (slotSize - slotTableOff) / virtio.DescSize
	pageSize      = 4096
)

// clientQueue is the driver side of one virtqueue.
type clientQueue struct {
	c      *Client
	idx    int
	num    uint16
	desc   []byte
	avail  []byte
	used   []byte
	dGPA   uint64
	aGPA   uint64
	uGPA   uint64
	slots  []byte
	sGPA   uint64
	kickFD int
	call   *os.File
	callFD int
	done   chan struct{}
	fence  uint32

	mu          sync.Mutex // submission side and pend
	free        []uint16
	pend        []clientPending
	availIdx    uint16
	kickedIdx   uint16
	deferKick   bool
	kickPending bool
	eventIdx    bool
	space       chan struct{}
	base        uint16 // next SET_VRING_BASE; valid if baseSet
	baseSet     bool

	dead     bool   // the client is closed; guarded by mu
	lastUsed uint16 // completion goroutine only
	strays   atomic.Uint64
}

type clientPending struct {
	inUse bool
	raw   bool
	descs []uint16
	done  func(Result)
}

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
	if qs := cfg.QueueSize; qs < 2 || qs > virtio.MaxQueueSize || qs&(qs-1) != 0 {
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

// allocMemory creates the guest memory and lays out the rings and slots.
func (c *Client) allocMemory() error {
	nq, qs := c.cfg.NumQueues, c.cfg.QueueSize
	dn, an, un := virtio.RingSizes(qs)
	perQueue := alignUp(uint64(dn), pageSize) + alignUp(uint64(an), pageSize) + alignUp(uint64(un), pageSize) + uint64(qs)*slotSize
	fixed := uint64(nq) * perQueue
	size := alignUp(c.cfg.MemSize, uint64(pageSize*c.cfg.Regions))
	if size < fixed+1<<20 {
		size = alignUp(fixed+1<<20, uint64(pageSize*c.cfg.Regions))
	}
	fd, err := unix.MemfdCreate("vhostdm-guest", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("guest memory: %w", err)
	}
	c.memfd = fd
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return fmt.Errorf("guest memory: %w", err)
	}
	m, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("guest memory: %w", err)
	}
	c.mem = m
	c.base = uintptr(unsafe.Pointer(unsafe.SliceData(m)))
	off := uint64(0)
	take := func(n uint64) ([]byte, uint64) {
		b := m[off : off+n : alignUp(off+n, pageSize)]
		g := off
		off = alignUp(off+n, pageSize)
		return b, g
	}
	for i := range nq {
		q := &clientQueue{c: c, idx: i, num: uint16(qs), kickFD: -1, callFD: -1, space: make(chan struct{}, 1)}
		q.desc, q.dGPA = take(uint64(dn))
		q.avail, q.aGPA = take(uint64(an))
		q.used, q.uGPA = take(uint64(un))
		q.slots, q.sGPA = take(uint64(qs) * slotSize)
		q.pend = make([]clientPending, qs)
		for d := qs - 1; d >= 0; d-- {
			q.free = append(q.free, uint16(d))
		}
		kfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return fmt.Errorf("kick eventfd: %w", err)
		}
		q.kickFD = kfd
		cfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return fmt.Errorf("call eventfd: %w", err)
		}
		q.callFD = cfd
		q.call = os.NewFile(uintptr(cfd), "call")
		q.done = make(chan struct{})
		c.queues = append(c.queues, q)
	}
	c.heap.init(off, size)
	return nil
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) / a * a }

// release frees what allocMemory made.
func (c *Client) release() {
	for _, q := range c.queues {
		if q.call != nil {
			q.call.Close()
		} else if q.callFD >= 0 {
			unix.Close(q.callFD)
		}
		if q.kickFD >= 0 {
			unix.Close(q.kickFD)
		}
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

// regions returns the memory regions of the guest memory.
func (c *Client) regions() []wire.MemRegion {
	n := uint64(c.cfg.Regions)
	size := uint64(len(c.mem)) / n
	var out []wire.MemRegion
	for i := range n {
		out = append(out, wire.MemRegion{GPA: i * size, Size: size, UserAddr: uint64(c.base) + i*size, Offset: i * size})
	}
	return out
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

// setupQueue sends the vring messages of one queue in QEMU's order.
func (c *Client) setupQueue(q *clientQueue) error {
	i := uint32(q.idx)
	q.mu.Lock()
	q.eventIdx = c.features&virtio.FeatureEventIdx != 0
	base := q.base
	if !q.baseSet {
		// After a back end went away without GET_VRING_BASE, QEMU restarts
		// from the used index (virtio_queue_restore_last_avail_idx); a back
		// end with the inflight region knows better.
		_, base = virtio.LoadWord(q.used)
	}
	q.baseSet = false
	q.mu.Unlock()
	if err := c.send(wire.ReqSetVringCall, wire.VringFD{Index: uint8(i)}, []int{q.callFD}); err != nil {
		return err
	}
	if err := c.send(wire.ReqSetVringNum, wire.VringState{Index: i, Num: uint32(q.num)}, nil); err != nil {
		return err
	}
	if err := c.send(wire.ReqSetVringBase, wire.VringState{Index: i, Num: uint32(base)}, nil); err != nil {
		return err
	}
	if err := c.send(wire.ReqSetVringAddr, q.addr(0), nil); err != nil {
		return err
	}
	if err := c.send(wire.ReqSetVringKick, wire.VringFD{Index: uint8(i)}, []int{q.kickFD}); err != nil {
		return err
	}
	if c.features&virtio.FeatureProtocolFeatures != 0 {
		if err := c.send(wire.ReqSetVringEnable, wire.VringState{Index: i, Num: 1}, nil); err != nil {
			return err
		}
	}
	// Kick once: requests may have been made available while no back end
	// was listening.
	q.mu.Lock()
	q.kickedIdx = q.availIdx
	q.mu.Unlock()
	q.kick()
	return nil
}

func (q *clientQueue) addr(flags uint32) wire.VringAddr {
	b := uint64(q.c.base)
	return wire.VringAddr{Index: uint32(q.idx), Flags: flags, Desc: b + q.dGPA, Used: b + q.uGPA, Avail: b + q.aGPA, Log: q.uGPA}
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

// RawRequest sends any header, payload and fds on the client's connection
// and, if reply is set, returns the next message read (for tests of hostile
// front ends). The header's Size is sent as given.
func (c *Client) RawRequest(h Header, payload []byte, fds []int, reply bool) (Header, []byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.uc == nil {
		return wire.Header{}, nil, ErrClientClosed
	}
	if err := c.wc.WriteRaw(append(h.AppendTo(nil), payload...), fds, 30*time.Second); err != nil {
		return wire.Header{}, nil, err
	}
	if !reply {
		return wire.Header{}, nil, nil
	}
	c.uc.SetReadDeadline(time.Now().Add(10 * time.Second))
	rh, p, rfds, err := c.wc.ReadMsg()
	c.uc.SetReadDeadline(time.Time{})
	wire.CloseFDs(rfds)
	return rh, bytes.Clone(p), err
}

// RawConn is a bare vhost-user connection that sends whatever it is given.
type RawConn struct {
	uc *net.UnixConn
	wc *wire.Conn
}

// DialRaw connects to socket without any negotiation.
func DialRaw(ctx context.Context, socket string) (*RawConn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	uc := nc.(*net.UnixConn)
	return &RawConn{uc: uc, wc: wire.NewConn(uc)}, nil
}

// Send writes raw bytes (a header and payload, or any part of one) with fds.
func (r *RawConn) Send(b []byte, fds []int) error { return r.wc.WriteRaw(b, fds, 30*time.Second) }

// Recv reads one message, waiting at most timeout.
func (r *RawConn) Recv(timeout time.Duration) (Header, []byte, []int, error) {
	r.uc.SetReadDeadline(time.Now().Add(timeout))
	defer r.uc.SetReadDeadline(time.Time{})
	h, p, fds, err := r.wc.ReadMsg()
	return h, bytes.Clone(p), fds, err
}

// CloseWrite shuts down the sending side, as a peer that stops in the
// middle of a message.
func (r *RawConn) CloseWrite() error { return r.uc.CloseWrite() }

// Close closes the connection.
func (r *RawConn) Close() error { return r.uc.Close() }

// Buf returns n bytes of guest memory for request data; FreeBuf returns
// them.
func (c *Client) Buf(n int) ([]byte, error) {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return nil, ErrClientClosed
	}
	off, ok := c.heap.alloc(n)
	if !ok {
		return nil, fmt.Errorf("vhost client: no %d bytes of guest memory left", n)
	}
	return c.mem[off : off+uint64(n) : off+uint64(n)], nil
}

// FreeBuf returns a buffer from Buf.
func (c *Client) FreeBuf(b []byte) {
	if g, ok := c.GuestAddr(b); ok {
		c.heap.free(g, len(b))
	}
}

// GuestAddr returns the guest physical address of b if b is guest memory.
func (c *Client) GuestAddr(b []byte) (uint64, bool) {
	if len(b) == 0 || c.mem == nil {
		return 0, false
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	if p < c.base || p+uintptr(len(b)) > c.base+uintptr(len(c.mem)) {
		return 0, false
	}
	return uint64(p - c.base), true
}

// Memory returns the whole guest memory (for tests that craft requests).
func (c *Client) Memory() []byte { return c.mem }

// NumQueues returns the number of queues.
func (c *Client) NumQueues() int { return len(c.queues) }

// Submit makes r available on queue q; done is called with the result on
// the queue's completion goroutine. It returns ErrRingFull when the ring
// has no room.
func (c *Client) Submit(q int, r *BlkRequest, done func(Result)) error {
	if q < 0 || q >= len(c.queues) {
		return fmt.Errorf("vhost client: queue %d of %d", q, len(c.queues))
	}
	cq := c.queues[q]
	var descs [maxSlotTable]virtio.Desc
	n := 0
	// Header, written into the head's slot once the head is known.
	descs[n] = virtio.Desc{Len: virtio.BlkHeaderSize}
	n++
	dataWrite := r.Type == virtio.BlkTypeIn || r.Type == virtio.BlkTypeGetID
	for _, b := range r.Data {
		g, ok := c.GuestAddr(b)
		if !ok {
			return errors.New("vhost client: request data is not guest memory")
		}
		if n >= maxSlotTable-2 {
			return errors.New("vhost client: too many data buffers")
		}
		d := virtio.Desc{Addr: g, Len: uint32(len(b))}
		if dataWrite {
			d.Flags = virtio.DescFlagWrite
		}
		descs[n] = d
		n++
	}
	if len(r.Ranges) > 0 {
		if len(r.Ranges) > (slotTableOff-slotRangesOff)/virtio.BlkDiscardSize {
			return errors.New("vhost client: too many ranges")
		}
		descs[n] = virtio.Desc{Len: uint32(len(r.Ranges) * virtio.BlkDiscardSize)}
		n++
	}
	descs[n] = virtio.Desc{Len: 1, Flags: virtio.DescFlagWrite}
	n++
	indirect := c.cfg.Indirect && c.features&virtio.FeatureIndirectDesc != 0
	ring := n
	if indirect {
		ring = 1
	}
	cq.mu.Lock()
	if cq.dead {
		cq.mu.Unlock()
		return ErrClientClosed
	}
	if len(cq.free) < ring {
		cq.mu.Unlock()
		return ErrRingFull
	}
	idx := cq.free[len(cq.free)-ring:]
	cq.free = cq.free[:len(cq.free)-ring]
	head := idx[len(idx)-1]
	slot := cq.slots[int(head)*slotSize : (int(head)+1)*slotSize]
	sg := cq.sGPA + uint64(head)*slotSize
	le.PutUint32(slot[0:], r.Type)
	le.PutUint32(slot[4:], 0)
	le.PutUint64(slot[8:], r.Sector)
	slot[slotStatusOff] = 0xff
	descs[0].Addr = sg
	descs[n-1].Addr = sg + slotStatusOff
	if len(r.Ranges) > 0 {
		for i, rg := range r.Ranges {
			o := slotRangesOff + i*virtio.BlkDiscardSize
			le.PutUint64(slot[o:], rg.Sector)
			le.PutUint32(slot[o+8:], rg.Sectors)
			le.PutUint32(slot[o+12:], rg.Flags)
		}
		descs[n-2].Addr = sg + slotRangesOff
	}
	used := make([]uint16, ring)
	copy(used, idx)
	if indirect {
		for i := 0; i < n; i++ {
			d := descs[i]
			if i < n-1 {
				d.Flags |= virtio.DescFlagNext
				d.Next = uint16(i + 1)
			}
			virtio.WriteDesc(slot[slotTableOff+i*virtio.DescSize:], d)
		}
		virtio.WriteDesc(cq.desc[int(head)*virtio.DescSize:], virtio.Desc{Addr: sg + slotTableOff, Len: uint32(n * virtio.DescSize), Flags: virtio.DescFlagIndirect})
	} else {
		// Chain head first: head, then the other indices in order.
		order := make([]uint16, 0, n)
		order = append(order, head)
		for i := 0; i < n-1; i++ {
			order = append(order, idx[i])
		}
		for i := 0; i < n; i++ {
			d := descs[i]
			if i < n-1 {
				d.Flags |= virtio.DescFlagNext
				d.Next = order[i+1]
			}
			virtio.WriteDesc(cq.desc[int(order[i])*virtio.DescSize:], d)
		}
	}
	cq.pend[head] = clientPending{inUse: true, descs: used, done: done}
	cq.publishLocked(head)
	return nil
}

// SubmitChain makes available a chain built by the caller (for tests of
// hostile drivers): n descriptor indices are reserved, build returns the
// descriptors to write at them, and idx[0] is made available as the head.
// The descriptors are freed when the head is used.
func (c *Client) SubmitChain(q int, n int, build func(idx []uint16) []Desc, done func(Result)) error {
	if q < 0 || q >= len(c.queues) {
		return fmt.Errorf("vhost client: queue %d of %d", q, len(c.queues))
	}
	cq := c.queues[q]
	cq.mu.Lock()
	if cq.dead {
		cq.mu.Unlock()
		return ErrClientClosed
	}
	if n < 1 || len(cq.free) < n {
		cq.mu.Unlock()
		return ErrRingFull
	}
	idx := make([]uint16, n)
	copy(idx, cq.free[len(cq.free)-n:])
	cq.free = cq.free[:len(cq.free)-n]
	descs := build(idx)
	for i, d := range descs {
		if i < n {
			virtio.WriteDesc(cq.desc[int(idx[i])*virtio.DescSize:], d)
		}
	}
	cq.pend[idx[0]] = clientPending{inUse: true, raw: true, descs: idx, done: done}
	cq.publishLocked(idx[0])
	return nil
}

// publishLocked puts head in the available ring, publishes the index and
// kicks if the device wants it (or defers the kick to the end of a
// completion burst). cq.mu is held; it is released.
func (q *clientQueue) publishLocked(head uint16) {
	le.PutUint16(q.avail[4+2*int(q.availIdx&(q.num-1)):], head)
	q.availIdx++
	virtio.StoreWord(q.avail, 0, q.availIdx) // release: the descriptors first
	if q.deferKick {
		q.kickPending = true
		q.mu.Unlock()
		return
	}
	k := q.needKickLocked()
	q.mu.Unlock()
	if k {
		q.kick()
	}
}

// HoldKicks defers the kicks of queue q: requests submitted until
// ReleaseKicks are made available without a kick, as a driver publishes a
// batch (completions meanwhile may kick).
func (c *Client) HoldKicks(q int) {
	cq := c.queues[q]
	cq.mu.Lock()
	cq.deferKick = true
	cq.mu.Unlock()
}

// ReleaseKicks ends HoldKicks and kicks queue q once if the device asked
// for a kick for what was published meanwhile; it reports whether it
// kicked.
func (c *Client) ReleaseKicks(q int) bool {
	cq := c.queues[q]
	cq.mu.Lock()
	cq.deferKick = false
	k := cq.kickPending && cq.needKickLocked()
	cq.kickPending = false
	cq.mu.Unlock()
	if k {
		cq.kick()
	}
	return k
}

// needKickLocked decides whether the device must be kicked for the entries
// published since the last decision (virtio 1.x 2.7.13.4).
func (q *clientQueue) needKickLocked() bool {
	old, new := q.kickedIdx, q.availIdx
	q.kickedIdx = new
	if old == new {
		return false
	}
	atomic.AddUint32(&q.fence, 1)
	if q.eventIdx {
		return virtio.NeedEvent(virtio.Load16(q.used, 4+8*int(q.num), &q.fence), new, old)
	}
	flags, _ := virtio.LoadWord(q.used)
	return flags&virtio.UsedFlagNoNotify == 0
}

func (q *clientQueue) kick() {
	var one [8]byte
	le.PutUint64(one[:], 1)
	unix.Write(q.kickFD, one[:])
}

// complete is the queue's completion goroutine: it waits for the call
// eventfd and runs the callbacks of used requests.
func (q *clientQueue) complete() {
	defer close(q.done)
	var buf [8]byte
	for {
		q.drainUsed()
		if _, err := q.call.Read(buf[:]); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			return
		}
	}
}

// drainUsed completes every used element, then re-arms the interrupt.
func (q *clientQueue) drainUsed() {
	q.mu.Lock()
	q.deferKick = true
	q.mu.Unlock()
	for {
		_, usedIdx := virtio.LoadWord(q.used)
		if usedIdx-q.lastUsed > q.num {
			q.strays.Add(1) // a broken device; wait for a sane index
			break
		}
		for q.lastUsed != usedIdx {
			off := 4 + 8*int(q.lastUsed&(q.num-1))
			id := le.Uint32(q.used[off:])
			n := le.Uint32(q.used[off+4:])
			q.lastUsed++
			q.finish(id, n)
		}
		if q.eventIdx {
			virtio.Store16(q.avail, 4+2*int(q.num), q.lastUsed, &q.fence)
		} else {
			atomic.AddUint32(&q.fence, 1)
		}
		if _, again := virtio.LoadWord(q.used); again == q.lastUsed {
			break
		}
	}
	q.mu.Lock()
	q.deferKick = false
	k := q.kickPending && q.needKickLocked()
	q.kickPending = false
	q.mu.Unlock()
	if k {
		q.kick()
	}
}

// finish completes the request whose head is id.
func (q *clientQueue) finish(id, n uint32) {
	q.mu.Lock()
	if id >= uint32(q.num) || !q.pend[id].inUse {
		q.mu.Unlock()
		q.strays.Add(1)
		return
	}
	p := q.pend[id]
	q.pend[id] = clientPending{}
	status := q.slots[int(id)*slotSize+slotStatusOff]
	q.free = append(q.free, p.descs...)
	q.mu.Unlock()
	select {
	case q.space <- struct{}{}:
	default:
	}
	if p.done != nil {
		p.done(Result{Status: status, Len: n})
	}
}

// Strays returns how many used elements named no request in flight.
func (c *Client) Strays() uint64 {
	var n uint64
	for _, q := range c.queues {
		n += q.strays.Load()
	}
	return n
}

// Do submits r on queue q and waits for its result, waiting for ring space
// if needed.
func (c *Client) Do(ctx context.Context, q int, r *BlkRequest) (Result, error) {
	ch := make(chan Result, 1)
	for {
		err := c.Submit(q, r, func(res Result) { ch <- res })
		if err == nil {
			break
		}
		if !errors.Is(err, ErrRingFull) {
			return Result{}, err
		}
		select {
		case <-c.queues[q].space:
		case <-ctx.Done():
			return Result{}, ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	select {
	case res := <-ch:
		return res, res.Err
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// do runs a request with data copied through guest memory when p is not
// guest memory already, and turns a bad status into an error.
func (c *Client) do(ctx context.Context, q int, typ uint32, sector uint64, p []byte, ranges []Range) (Result, error) {
	r := &BlkRequest{Type: typ, Sector: sector, Ranges: ranges}
	var bounce []byte
	if len(p) > 0 {
		if _, ok := c.GuestAddr(p); ok {
			r.Data = [][]byte{p}
		} else {
			b, err := c.Buf(len(p))
			if err != nil {
				return Result{}, err
			}
			defer c.FreeBuf(b)
			if typ == virtio.BlkTypeOut {
				copy(b, p)
			}
			bounce = b
			r.Data = [][]byte{b}
		}
	}
	res, err := c.Do(ctx, q, r)
	if err != nil {
		return res, err
	}
	if bounce != nil && (typ == virtio.BlkTypeIn || typ == virtio.BlkTypeGetID) {
		copy(p, bounce)
	}
	if res.Status != virtio.BlkStatusOK {
		return res, &StatusError{Status: res.Status}
	}
	return res, nil
}

// ReadAt reads len(p) bytes at sector on queue q.
func (c *Client) ReadAt(ctx context.Context, q int, p []byte, sector uint64) error {
	_, err := c.do(ctx, q, virtio.BlkTypeIn, sector, p, nil)
	return err
}

// WriteAt writes p at sector on queue q.
func (c *Client) WriteAt(ctx context.Context, q int, p []byte, sector uint64) error {
	_, err := c.do(ctx, q, virtio.BlkTypeOut, sector, p, nil)
	return err
}

// Flush sends a flush on queue q.
func (c *Client) Flush(ctx context.Context, q int) error {
	_, err := c.do(ctx, q, virtio.BlkTypeFlush, 0, nil, nil)
	return err
}

// Discard discards sectors at sector.
func (c *Client) Discard(ctx context.Context, q int, sector uint64, sectors uint32) error {
	_, err := c.do(ctx, q, virtio.BlkTypeDiscard, 0, nil, []Range{{Sector: sector, Sectors: sectors}})
	return err
}

// WriteZeroes zeroes sectors at sector, letting the device deallocate them
// if unmap is set.
func (c *Client) WriteZeroes(ctx context.Context, q int, sector uint64, sectors uint32, unmap bool) error {
	rg := Range{Sector: sector, Sectors: sectors}
	if unmap {
		rg.Flags = virtio.BlkDiscardUnmap
	}
	_, err := c.do(ctx, q, virtio.BlkTypeWriteZeroes, 0, nil, []Range{rg})
	return err
}

// GetID returns the device's serial (GET_ID), without NUL padding.
func (c *Client) GetID(ctx context.Context, q int) (string, error) {
	var id [virtio.BlkIDBytes]byte
	if _, err := c.do(ctx, q, virtio.BlkTypeGetID, 0, id[:], nil); err != nil {
		return "", err
	}
	n := 0
	for n < len(id) && id[n] != 0 {
		n++
	}
	return string(id[:n]), nil
}

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
		q.call.Close()
		<-q.done
		q.call = nil
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

// StartDirtyLog starts dirty-page logging as QEMU does for migration: it
// shares a log bitmap (SET_LOG_BASE), sets VHOST_F_LOG_ALL and asks each
// ring to log used-ring writes.
func (c *Client) StartDirtyLog() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.protocol&wire.ProtocolLogSHMFD == 0 {
		return errors.New("vhost client: back end lacks LOG_SHMFD")
	}
	size := alignUp(uint64(len(c.mem))/pageSize/8+1, pageSize)
	fd, err := unix.MemfdCreate("vhostdm-log", unix.MFD_CLOEXEC)
	if err != nil {
		return err
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return err
	}
	m, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return err
	}
	c.logFD, c.logMem = fd, m
	h, _, rfds, err := c.request(wire.ReqSetLogBase, wire.LogDesc{Size: size}, []int{fd}, true)
	wire.CloseFDs(rfds)
	if err != nil {
		return err
	}
	_ = h
	c.features |= virtio.FeatureLogAll
	if err := c.setU64(wire.ReqSetFeatures, c.features); err != nil {
		return err
	}
	for _, q := range c.queues {
		if err := c.send(wire.ReqSetVringAddr, q.addr(wire.VringAddrFlagLog), nil); err != nil {
			return err
		}
	}
	return nil
}

// Dirty reports whether the dirty log marks the guest page holding gpa.
func (c *Client) Dirty(gpa uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := gpa / pageSize
	if c.logMem == nil || p/8 >= uint64(len(c.logMem)) {
		return false
	}
	w := (*uint32)(unsafe.Pointer(&c.logMem[p/8&^3]))
	return atomic.LoadUint32(w)>>(p%32)&1 != 0
}

// ClearDirtyLog clears the dirty bitmap.
func (c *Client) ClearDirtyLog() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := 0; i+4 <= len(c.logMem); i += 4 {
		atomic.StoreUint32((*uint32)(unsafe.Pointer(&c.logMem[i])), 0)
	}
}

// UsedRingGPA returns the guest address of queue q's used ring.
func (c *Client) UsedRingGPA(q int) uint64 { return c.queues[q].uGPA }

// AvailRingGPA returns the guest address of queue q's available ring (for
// tests that play a driver misbehaving).
func (c *Client) AvailRingGPA(q int) uint64 { return c.queues[q].aGPA }

// pageAlloc hands out page runs of the guest memory heap.
type pageAlloc struct {
	mu    sync.Mutex
	start uint64
	used  []bool
	hint  int
}

func (a *pageAlloc) init(start, end uint64) {
	a.start = start
	a.used = make([]bool, (end-start)/pageSize)
}

func (a *pageAlloc) alloc(n int) (uint64, bool) {
	if n <= 0 {
		n = 1
	}
	pages := (n + pageSize - 1) / pageSize
	a.mu.Lock()
	defer a.mu.Unlock()
	total := len(a.used)
	for pass := 0; pass < 2; pass++ {
		run := 0
		from := a.hint
		if pass == 1 {
			from = 0
		}
		for i := from; i < total; i++ {
			if a.used[i] {
				run = 0
				continue
			}
			run++
			if run == pages {
				s := i - pages + 1
				for j := s; j <= i; j++ {
					a.used[j] = true
				}
				a.hint = i + 1
				return a.start + uint64(s)*pageSize, true
			}
		}
	}
	return 0, false
}

func (a *pageAlloc) free(gpa uint64, n int) {
	if gpa < a.start || n <= 0 {
		return
	}
	pages := (n + pageSize - 1) / pageSize
	a.mu.Lock()
	defer a.mu.Unlock()
	s := int((gpa - a.start) / pageSize)
	for j := s; j < s+pages && j < len(a.used); j++ {
		a.used[j] = false
	}
	if s < a.hint {
		a.hint = s
	}
}
