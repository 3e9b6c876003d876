// Package nbd serves mapper devices over the Network Block Device protocol
// (NetworkBlockDevice/nbd doc/proto.md), the interface of the QEMU backup
// ecosystem: qemu-img, nbdcopy, nbdinfo, libvirt's backup API and
// incremental backup tools that read the qemu:dirty-bitmap:NAME context.
//
// It speaks fixed newstyle negotiation only (no oldstyle, no
// EXPORT_NAME-first clients without fixed newstyle): NBD_OPT_GO, INFO,
// EXPORT_NAME, LIST, ABORT, STARTTLS, STRUCTURED_REPLY, LIST_META_CONTEXT
// and SET_META_CONTEXT; extended headers are refused (UNSUP) and clients
// fall back to compact requests. Transmission serves READ, WRITE, FLUSH,
// TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS and DISC with the FUA, NO_HOLE,
// DF and REQ_ONE flags. Meta contexts are base:allocation (answered by
// mapper.Device.Allocation: holes of zero and error targets, unmapped thin
// blocks, unallocated ploop clusters, sparse file holes) and
// qemu:dirty-bitmap:NAME for the bitmaps an export names.
//
// Decisions, each the honest answer for a mapper device:
//   - Block size constraints are advertised (minimum 512, preferred 4096,
//     maximum 32 MiB as QEMU's NBD_MAX_BUFFER_SIZE); a read, write, trim
//     or write-zeroes not aligned to 512 bytes fails with EINVAL, since the
//     device works in sectors. Block status and cache take any range.
//   - CAN_MULTI_CONN is advertised: every connection submits to the same
//     mapper.Device, so a read on one connection sees writes completed on
//     any, and a flush on one flushes the device's table, which makes
//     every completed write durable whichever connection (or vhost export)
//     sent it.
//   - FAST_ZERO is honest: a fast write-zeroes succeeds at once where the
//     table says the range already reads as zeros (base:allocation's ZERO
//     flag), and fails with ENOTSUP elsewhere, since the mapper cannot
//     promise that zeroing data is faster than writing it.
//   - CACHE is advisory (the spec allows a no-op): it is checked and
//     acknowledged; the page cache of the backing files does the rest.
//   - Reads are answered as one OFFSET_DATA chunk, so DF always holds.
//
// Hostile input: every length is bounded before anything is allocated
// (options at 64 KiB, discarding up to 16 MiB with ERR_TOO_BIG, strings at
// 4096, requests at 32 MiB, in-flight payload per connection at 64 MiB), a
// bad request fails with an errno and the connection goes on, a request
// header out of step (bad magic) or an oversized write payload closes that
// connection, and negotiation has a deadline. No input reaches a panic.
//
// Libraries read before writing this: github.com/pojntfx/go-nbd (baseline
// protocol only: no structured replies, meta contexts, block status or
// TLS); andrewchambers/gonbdserver, a fork of abligh/gonbdserver (its
// protocol table stops at NBD_OPT_STRUCTURED_REPLY: no SET_META_CONTEXT,
// BLOCK_STATUS or CACHE; backends are files); rclone's serve nbd (no
// authentication, by its own documentation). None offers meta contexts
// over an arbitrary device with QEMU's semantics, so this package is
// written from the spec, with QEMU's nbd/server.c read for the behaviour
// clients expect (context naming, the default export, error texts).
package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// Device is what an export serves; *mapper.Device implements it.
type Device interface {
	Submit(r *mapper.Request) error
	Size() uint64 // sectors
	Allocation(sector, sectors uint64) (uint64, mapper.AllocState, error)
}

// Bitmap is a dirty bitmap an export offers as qemu:dirty-bitmap:NAME;
// *mapper.DirtyBitmap implements it.
type Bitmap interface {
	Name() string
	Extents(off, n uint64, fn func(e mapper.Extent) bool)
}

// Export is one named export of a server.
type Export struct {
	Name        string // the NBD export name
	Description string
	Device      Device
	Writable    bool
	Bitmaps     []Bitmap
}

// Config configures a Server.
type Config struct {
	// TLS, when set, is required: clients must send NBD_OPT_STARTTLS
	// before anything but ABORT, as QEMU with tls-creds.
	TLS    *tls.Config
	Logger *slog.Logger
	// HandshakeTimeout bounds negotiation; default 60s.
	HandshakeTimeout time.Duration
	// MaxConnections bounds concurrent connections; default 256.
	MaxConnections int
}

// Server serves exports to NBD clients. Its methods may be called from any
// goroutine.
type Server struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	exports map[string]*Export
	conns   map[*conn]struct{}
	closed  bool
	lns     []net.Listener
	wg      sync.WaitGroup
}

// NewServer returns a server with no exports.
func NewServer(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = 60 * time.Second
	}
	if cfg.MaxConnections == 0 {
		cfg.MaxConnections = 256
	}
	return &Server{cfg: cfg, log: cfg.Logger, exports: map[string]*Export{}, conns: map[*conn]struct{}{}}
}

// TLS reports whether the server requires TLS.
func (s *Server) TLS() bool { return s.cfg.TLS != nil }

// Add adds an export; its name must be unused and at most 4096 bytes.
func (s *Server) Add(e *Export) error {
	if len(e.Name) > maxStringLen || len(e.Description) > maxStringLen {
		return fmt.Errorf("nbd: export name or description longer than %d bytes", maxStringLen)
	}
	if e.Device == nil {
		return fmt.Errorf("nbd: export %q has no device", e.Name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.exports[e.Name]; dup {
		return fmt.Errorf("nbd: export name '%s' is already in use", e.Name)
	}
	s.exports[e.Name] = e
	return nil
}

// Remove removes the export called name. Without hard it is refused while
// clients are connected to it; with hard they are disconnected, and Remove
// returns once their in-flight requests are done.
func (s *Server) Remove(name string, hard bool) error {
	s.mu.Lock()
	e, ok := s.exports[name]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("nbd: no export %q", name)
	}
	var users []*conn
	for c := range s.conns {
		if c.export() == e {
			users = append(users, c)
		}
	}
	if len(users) > 0 && !hard {
		s.mu.Unlock()
		return fmt.Errorf("nbd: export %q has %d connected clients", name, len(users))
	}
	delete(s.exports, name)
	s.mu.Unlock()
	for _, c := range users {
		c.close()
		<-c.done
	}
	return nil
}

// Clients returns the number of clients in transmission on export name.
func (s *Server) Clients(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		if e := c.export(); e != nil && e.Name == name {
			n++
		}
	}
	return n
}

// Len returns the number of exports.
func (s *Server) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.exports)
}

func (s *Server) lookup(name string) *Export {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.exports[name]; ok {
		return e
	}
	if name == "" && len(s.exports) == 1 { // the default export
		for _, e := range s.exports {
			return e
		}
	}
	return nil
}

// attach makes e the export of c if e is still served: the check and the
// store are atomic with Remove's scan of connections.
func (s *Server) attach(c *conn, e *Export) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exports[e.Name] != e {
		return false
	}
	c.exp.Store(e)
	return true
}

func (s *Server) list() []*Export {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*Export, 0, len(s.exports))
	for _, e := range s.exports {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Serve accepts connections on ln until ctx is done or Close is called;
// each connection runs on its own goroutines and ends with ctx.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.lns = append(s.lns, ln)
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		nc, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed || ctx.Err() != nil {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		s.ServeConn(ctx, nc)
	}
}

// ServeConn serves one connection on new goroutines and returns at once.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) {
	c := newConn(s, nc)
	s.mu.Lock()
	if s.closed || len(s.conns) >= s.cfg.MaxConnections {
		s.mu.Unlock()
		s.log.Warn("nbd: connection refused", "remote", nc.RemoteAddr().String(), "reason", "server closed or connection limit reached")
		nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		c.serve(ctx)
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
}

// Close stops the listeners, disconnects every client once its in-flight
// requests are done, and waits for that.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	lns := s.lns
	s.lns = nil
	var cs []*conn
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
	for _, c := range cs {
		c.close()
	}
	s.wg.Wait()
	return nil
}
