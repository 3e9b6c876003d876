package vhost

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhostdm/vhostdm/internal/unixsock"
	"github.com/vhostdm/vhostdm/mapper"
)

// Device is what an export serves; *mapper.Device implements it.
//
// Submit may be called from many goroutines at once. The Data slices of the
// requests point into guest memory: they are valid until Submit returns and
// must not be retained. While the device is suspended Submit waits.
type Device interface {
	Submit(r *mapper.Request) error
	Size() uint64 // sectors
	ReadOnly() bool
	OnResize(fn func(oldSize, newSize uint64)) (cancel func())
}

// ExportConfig configures an export.
type ExportConfig struct {
	ID     string // export id; default Serial
	Socket string // unix socket path (see NewExport)
	// SocketOwner and SocketGroup (names or numeric ids; "" keeps the
	// daemon's) and SocketMode (0: 0600) are the socket file's, from the
	// first instant it exists.
	SocketOwner, SocketGroup string
	SocketMode               fs.FileMode
	NumQueues                int // 1 to MaxQueues; default 1
	Writable                 bool
	LogicalBlockSize         uint32 // power of two, 512 to 2 MiB; default 512
	Serial                   string // answered to GET_ID; default ID; at most 20 bytes
	Logger                   *slog.Logger
	// OnConnect and OnDisconnect are called when a front end connects or
	// goes away (for QMP events). They may be nil and must not block.
	OnConnect, OnDisconnect func()

	// Poll is how long a queue busy-polls its available ring after it
	// runs dry before it sleeps on the kick eventfd (the configuration's
	// export.poll-us; docs/PERFORMANCE.md), whatever the queue served
	// before. Zero or negative: no fixed poll (the default), adaptive
	// polling instead unless NoAdaptivePoll.
	//
	// Reads and writes that the device can serve without blocking
	// (NowaitDevice) run on the queue's ring goroutine; there is no
	// setting for it.
	Poll time.Duration

	// NoAdaptivePoll turns off adaptive polling. By default (and unless
	// Poll is set) each queue that runs dry polls its available ring for
	// as long as the run it served itself was deep (queue.pollFor): 1 µs
	// per request, up to 256 µs, so that an idle queue never spins and a
	// poll that finds nothing costs at most 1 µs per request served.
	NoAdaptivePoll bool

	// Table, when set, tells which of discard and write-zeroes the
	// device's table serves, and when a reload may have changed that;
	// *mapper.Device implements it. Writable exports offer
	// VIRTIO_BLK_F_DISCARD and VIRTIO_BLK_F_WRITE_ZEROES only when the
	// table serves them. Nil: both are offered.
	Table TableCaps

	// NegotiationTimeout is how long a new front end has to complete
	// negotiation (send SET_OWNER, as QEMU does right after connecting)
	// before the connection is closed, and how long the rest of a message
	// may take once its first byte arrived. Zero: 10 s; negative: none.
	NegotiationTimeout time.Duration
}

// DefaultNegotiationTimeout is ExportConfig.NegotiationTimeout's default.
const DefaultNegotiationTimeout = 10 * time.Second

// TableCaps is what an export asks of the table behind its device.
type TableCaps interface {
	// Discards reports whether the live table serves discards and
	// write-zeroes.
	Discards() (discard, writeZeroes bool)
	// OnReload registers fn, called after a new table went live.
	OnReload(fn func()) (cancel func())
}

// Limits of ExportConfig.
const (
	MaxQueues        = 64
	MaxSerialLen     = 20 // VIRTIO_BLK_ID_BYTES
	minLogicalBlock  = 512
	maxLogicalBlock  = 2 << 20
	defaultBlockSize = 512
)

// Export serves one Device on one unix socket to one vhost-user-blk front end
// at a time (QEMU's vhost-user-blk-pci, or Client). Its methods may be called
// from any goroutine.
type Export struct {
	// Immutable after NewExport.
	cfg      ExportConfig
	dev      Device
	log      *slog.Logger
	ln       *unixsock.Listener
	readOnly bool

	connected atomic.Bool
	closed    atomic.Bool
	connSeq   atomic.Uint64
	discard   atomic.Bool  // the table serves discards (see TableCaps)
	zeroes    atomic.Bool  // the table serves write-zeroes
	freedAt   atomic.Int64 // mono time of the last releaseMemory
	// renotifies counts the queues' second looks that found a driver
	// owed an interrupt and signalled it again (queue.renotify).
	renotifies atomic.Uint64

	mu      sync.Mutex
	conn    *conn         // the connection being served, or nil
	busy    chan struct{} // closed when conn's goroutine ends; nil if none
	serving chan struct{} // closed when Serve returns; nil if not serving
	cancel  func()        // unregisters the resize watcher
}

// NewExport validates cfg and listens on cfg.Socket with the configured
// owner, group and mode. A stale socket file is replaced; a socket that a
// server answers on (another export, a QMP socket, another daemon) is not,
// and neither is any other kind of file. Serve accepts front ends.
func NewExport(cfg ExportConfig, dev Device) (*Export, error) {
	if dev == nil {
		return nil, errors.New("export: no device")
	}
	if cfg.ID == "" {
		cfg.ID = cfg.Serial
	}
	if cfg.Serial == "" {
		cfg.Serial = cfg.ID
	}
	if cfg.ID == "" {
		return nil, errors.New("export: needs an id or a serial")
	}
	if len(cfg.Serial) > MaxSerialLen {
		return nil, fmt.Errorf("export %s: serial %q longer than %d bytes", cfg.ID, cfg.Serial, MaxSerialLen)
	}
	if cfg.Socket == "" {
		return nil, fmt.Errorf("export %s: no socket path", cfg.ID)
	}
	if cfg.NumQueues == 0 {
		cfg.NumQueues = 1
	}
	if cfg.NumQueues < 1 || cfg.NumQueues > MaxQueues {
		return nil, fmt.Errorf("export %s: num-queues %d: must be 1 to %d", cfg.ID, cfg.NumQueues, MaxQueues)
	}
	if cfg.LogicalBlockSize == 0 {
		cfg.LogicalBlockSize = defaultBlockSize
	}
	// QEMU's check_block_size: a power of two between 512 B and 2 MiB.
	if b := cfg.LogicalBlockSize; b < minLogicalBlock || b > maxLogicalBlock || b&(b-1) != 0 {
		return nil, fmt.Errorf("export %s: logical-block-size %d: must be a power of two from 512 to 2097152", cfg.ID, b)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.Poll = max(cfg.Poll, 0)
	if cfg.NegotiationTimeout == 0 {
		cfg.NegotiationTimeout = DefaultNegotiationTimeout
	}
	ln, err := unixsock.Listen(cfg.Socket, unixsock.Perm{Owner: cfg.SocketOwner, Group: cfg.SocketGroup, Mode: cfg.SocketMode})
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", cfg.ID, err)
	}
	e := &Export{cfg: cfg, dev: dev, ln: ln, readOnly: !cfg.Writable || dev.ReadOnly(),
		log: cfg.Logger.With("export", cfg.ID)}
	e.cancel = dev.OnResize(e.resized)
	e.watchCaps()
	e.log.Info("export listening", "socket", cfg.Socket, "queues", cfg.NumQueues,
		"logical_block_size", cfg.LogicalBlockSize, "readonly", e.readOnly)
	return e, nil
}

// Config returns the export's configuration with defaults filled in.
func (e *Export) Config() ExportConfig { return e.cfg }

// Connected reports whether a front end is connected.
func (e *Export) Connected() bool { return e.connected.Load() }

// ReadOnly reports whether the export refuses writes.
func (e *Export) ReadOnly() bool { return e.readOnly }

// Serve accepts one front end at a time and serves it until it goes away,
// then accepts the next, until ctx is done or Close is called; then it
// returns nil. Other errors are those of the listening socket.
func (e *Export) Serve(ctx context.Context) error {
	e.mu.Lock()
	if e.serving != nil {
		e.mu.Unlock()
		return errors.New("export: already serving")
	}
	done := make(chan struct{})
	e.serving = done
	e.mu.Unlock()
	defer close(done)
	var conns sync.WaitGroup
	defer conns.Wait()
	stop := context.AfterFunc(ctx, func() { e.shutdown() })
	defer stop()
	for {
		uc, err := e.ln.AcceptUnix()
		if err != nil {
			if e.closed.Load() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			e.log.Warn("accept failed", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		e.admit(uc, &conns)
	}
}

// serveConn serves one front end until it disconnects; admit made it the
// export's connection.
func (e *Export) serveConn(c *conn) {
	e.connected.Store(true)
	if e.cfg.OnConnect != nil {
		e.cfg.OnConnect()
	}
	c.serve()
	e.mu.Lock()
	e.conn = nil
	e.mu.Unlock()
	e.connected.Store(false)
	if e.cfg.OnDisconnect != nil {
		e.cfg.OnDisconnect()
	}
}

// QueueDepths returns, per virtqueue, the requests popped from the ring
// and not yet completed; nil while no front end is connected.
func (e *Export) QueueDepths() []int {
	e.mu.Lock()
	c := e.conn
	e.mu.Unlock()
	if c == nil {
		return nil
	}
	out := make([]int, len(c.dev.queues))
	for i, q := range c.dev.queues {
		out[i] = int(q.depth.Load())
	}
	return out
}

// Renotifies returns how many times a queue of this export found, a second
// after the last kick, that the driver had not consumed completions it was
// told of, and signalled its call eventfd again: an interrupt lost between
// the back end and the guest. It stays 0 on a healthy host.
func (e *Export) Renotifies() uint64 { return e.renotifies.Load() }

// shutdown stops accepting and closes the connection's socket; the
// connection then finishes its in-flight requests and tears down.
func (e *Export) shutdown() {
	e.closed.Store(true)
	e.ln.Close()
	e.mu.Lock()
	c := e.conn
	e.mu.Unlock()
	if c != nil {
		c.close()
	}
}

// Close stops accepting, waits for the connection to finish its in-flight
// I/O and go away, and removes the socket.
func (e *Export) Close() error {
	e.shutdown()
	e.mu.Lock()
	serving := e.serving
	cancel := e.cancel
	e.cancel = nil
	e.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if serving != nil {
		<-serving
	}
	return nil
}

// resized is the device's resize watcher: the front end is told with
// CONFIG_CHANGE_MSG and reads the new capacity with GET_CONFIG.
func (e *Export) resized(oldSize, newSize uint64) {
	e.log.Info("device resized", "old_sectors", oldSize, "new_sectors", newSize)
	e.mu.Lock()
	c := e.conn
	e.mu.Unlock()
	if c != nil {
		c.configChanged()
	}
}

// capacity returns the device size in 512-byte sectors, rounded down to
// the logical block size.
func (e *Export) capacity() uint64 {
	per := uint64(e.cfg.LogicalBlockSize / mapper.SectorSize)
	return e.dev.Size() / per * per
}
