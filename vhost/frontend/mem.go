package frontend

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

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
	if c.cfg.MemDir != "" {
		fd, err = unix.Open(c.cfg.MemDir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	}
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
