package hub

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/vhostdm/vhostdm/internal/rawsock"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// Volume states reported by the hub.
const (
	StateSyncing      = "syncing"       // reading the source into the recovery volume
	StateProtecting   = "protecting"    // in sync; mirrored writes are journaled in order
	StateDisconnected = "disconnected"  // no agent connection
	StateFailoverTest = "failover-test" // no longer entered: failover tests run on materialised copies (kept for clients that match it)
	// StateStoreError: writing, preallocating or syncing the volume's
	// store failed (an fsync error, ENOSPC). Its durable state stays as
	// last saved before the failure: nothing more is marked synced. The
	// hub stops the agent's mirroring (STOP_PROTECT): the agent keeps
	// every change the hub did not acknowledge as dirty regions. The hub
	// tries the store again with backoff while the agent stays connected
	// (and when it reconnects); once it works, the volume resyncs those
	// regions (StateSyncing) before it is protecting again.
	StateStoreError = "store-error"
)

// Connection limits.
const (
	// DefaultMaxConns is Config.MaxConns's default.
	DefaultMaxConns = 1024
	// DefaultMaxConnsPerPeer is Config.MaxConnsPerPeer's default: one
	// host's vhostdm processes (one agent connection each) share it.
	DefaultMaxConnsPerPeer = 64
)

// Config configures a Hub.
type Config struct {
	Store string // directory of recovery volumes and state (DirBackend)
	// Backend, when set, keeps the hub's state, journals and replicas
	// instead of the directory Store (which is then ignored); the hub
	// closes it. The Ceph build's backend is one.
	Backend Backend
	Name    string // the hub's name in HELLO; default the host name
	// TLS, when set, wraps every accepted connection (see
	// wire.TLSFiles.TLSConfig with server true).
	TLS *tls.Config
	// Authorize, with TLS, names the VMs each certificate identity may
	// claim in HELLO; a HELLO for any other VM is refused. With TLS,
	// either Authorize or AllowAnyIdentity must be set; without TLS
	// neither may be.
	Authorize *Authorizations
	// AllowAnyIdentity lets any certificate that the CA signed claim any
	// VM name.
	AllowAnyIdentity bool
	// MaxConns bounds the agent connections open at once, counting those
	// that have not sent HELLO yet. Default DefaultMaxConns.
	MaxConns int
	// MaxConnsPerPeer bounds the connections open at once from one peer
	// IP address. Default DefaultMaxConnsPerPeer.
	MaxConnsPerPeer int
	Logger          *slog.Logger
	// SyncChunkSectors is the size of remote reads during sync. Default
	// 2048 (1 MiB); at most MaxIOSectors.
	SyncChunkSectors uint32
	// SyncWindow is the number of remote reads outstanding per volume.
	// Default 4; the connection's total is capped at 16.
	SyncWindow int
	// RegionSectors is the granularity of the hub's sync bitmaps. Default
	// DefaultRegionSectors.
	RegionSectors uint32
	// Heartbeat is the interval of heartbeats; an agent silent for four
	// of them is taken as gone. Default 2 s.
	Heartbeat time.Duration
	// CheckpointInterval bounds how long applied writes wait for fsync
	// and acknowledgement while frames keep arriving. Default 50 ms.
	CheckpointInterval time.Duration
	// MaxPayload bounds received frames. Default DefaultMaxPayload.
	MaxPayload uint32
	// OnEvent is called, in order and from one goroutine, when a volume
	// changes state. May be nil.
	OnEvent func(Event)

	// StoreRetry bounds the backoff between the hub's attempts to leave
	// StateStoreError on a live connection: it reopens the VM's journal
	// (with a write probe) and starts protection again. The first attempt
	// comes min(1 s, StoreRetry) after the failure, each failed attempt
	// doubles the wait up to StoreRetry; attempts run at heartbeats. The
	// hub also tries when the agent reconnects. Default 30 s.
	StoreRetry time.Duration

	// ApplyDelay pauses before each journaled mirrored write: tests use
	// it to model a slow store. Zero in production.
	ApplyDelay time.Duration

	// Retain keeps each VM's journaled writes this long before the
	// applier writes them into the replica images (the point-in-time
	// recovery window). 0 applies them promptly.
	Retain time.Duration
	// RetainBytes caps each VM's unapplied journal; 0: no cap.
	RetainBytes int64
	// ApplyInterval is the applier's period (default 100 ms).
	ApplyInterval time.Duration
	// CsumResync makes a full resync of a replica that holds data (the
	// agent restarted after an unclean end without a trusted activity
	// log) a checksum resync: regions are compared by checksum and only
	// those that differ are read (DRBD's csums-alg). A seeded replica is
	// always resynchronised by checksums.
	CsumResync bool
	// Shared says the store is shared with other hubs (several
	// repagent-hub processes on one Ceph pool): a VM's journal is opened,
	// and the store's hold on the VM (its lease) taken, only when its
	// agent attaches; a HELLO for a VM that another hub holds is refused
	// (REFUSED naming wire.ReasonHeldElsewhere: the agent tries its next hub);
	// the VM's state is read from the store again when the hold is
	// taken; and a VM whose hold is lost (LeaseHolder) is dropped: its
	// connection cut, its journal closed, nothing more saved for it.
	Shared bool

	// openReplica opens a recovery volume's image (tests inject faults).
	openReplica func(path string) (replicaFile, error)
	// faultHook is the journal's fault hook (tests inject faults).
	faultHook func(op, path string) error
}

// Event is a volume state change.
type Event struct {
	VM, Volume string
	State      string
	Previous   string
	Reason     string
}

// Hub is the replication hub engine: it accepts agents, keeps one recovery
// volume per protected volume in the store, synchronises it with remote
// reads and then applies mirrored writes in order. Its state survives a
// restart. Its methods may be called from any goroutine.
type Hub struct {
	// Immutable.
	cfg     Config
	log     *slog.Logger
	session uint64

	mu    sync.Mutex
	vms   map[string]*hubVM
	conns map[*hubConn]struct{}
	peers map[string]int // open connections by peer IP address
	// refusedAt and refused rate-limit the log of refused connections.
	refusedAt time.Time
	refused   int
	lns       map[net.Listener]struct{}
	closed    bool
	wg        sync.WaitGroup

	events chan Event
	// arenas are frame buffers of ended connections (frames.go).
	arenas chan *arena
	evDone chan struct{}
}

// hubVM is one VM in the store. Fields guarded by Hub.mu.
type hubVM struct {
	name     string
	uuid     string
	dir      string
	conn     *hubConn
	vols     map[string]*hubVolume
	failover *failoverTest
	// j is the VM's write journal (opened when the hub starts or the VM
	// first attaches); the replica images are its base images.
	j *journal.Journal
	// jBroken: j was closed after a store error and no reopen has
	// passed its probe yet.
	jBroken bool
	// lease is j's store when it can lose its hold on the VM (nil
	// otherwise); set with j.
	lease LeaseHolder
	// resync: a resync set is open in j (owned by the connection's
	// engine while connected).
	resync bool
	// promoted: Promote made the recovery volumes the new sources; the
	// VM's agent is refused and its journal closed.
	promoted bool
	// resyncEpoch counts the resync sets opened (an online verify's
	// answer is compared only if none opened while it was out).
	resyncEpoch uint64
	// currentAt is the last instant the journal was known to hold every
	// write of the source (connected, no resync outstanding).
	currentAt time.Time
}

// isGroup reports whether vm's volumes were last protected as a
// consistency group; Hub.mu held.
func (vm *hubVM) isGroup() bool {
	for _, v := range vm.vols {
		if v.st.Group {
			return true
		}
	}
	return false
}

// groupInconsistent reports whether vm's volumes are a consistency group
// whose source said they are not a prefix of its write order (it is
// resynchronising them), now or when last connected; Hub.mu held.
func (vm *hubVM) groupInconsistent() bool {
	for _, v := range vm.vols {
		if v.st.GroupInconsistent {
			return true
		}
	}
	return false
}

// hubVolume is one recovery volume. Fields guarded by Hub.mu unless noted.
type hubVolume struct {
	// Immutable.
	vm   *hubVM
	name string
	log  *slog.Logger

	file replicaFile // owned by the connection's engine while connected
	st   volState    // durable state as last saved, updated at checkpoints
	// Runtime.
	state  string
	reason string
	// reportedChanged: the agent's report said the volume's data
	// changed behind it (CHANGED); protect resynchronises it in full and
	// clears this once that plan is saved.
	reportedChanged bool
	conn            *hubConn
	id              uint64
	mirror          bool
	sectors         uint64
	need            *roaring.Bitmap // regions to read from the source
	inRead          *roaring.Bitmap // regions of outstanding remote reads
	stale           *roaring.Bitmap // regions of inRead discarded or failed meanwhile: read again
	held            *roaring.Bitmap // regions of deferred writes (engine-owned)
	reads           int             // outstanding remote reads
	cursor          uint64          // where the next read starts
	waitingInitial  bool            // START_PROTECT sent, initial DIRTY_MAP not yet in
	readErrors      int
	syncTotal       uint64 // regions queued for reading in this sync
	syncDone        uint64 // regions read in this sync
	remoteBytes     uint64 // bytes read with remote IO since the hub started
	appliedBytes    uint64 // mirrored bytes applied since the hub started
	applied         uint64 // last applied sequence
	backlog         wire.Backlog
	changed         bool // state to save at the next checkpoint
	wrote           bool // data to fsync at the next checkpoint
	// storeErr is the store failure that put the volume in
	// StateStoreError; while set, nothing of the volume is saved.
	storeErr    error
	storeErrAt  time.Time // when storeErr was last set
	wantMirror  bool      // the connection's agent reported it protected
	storeErrors uint64    // store failures since the hub started
	// storeRetries counts the failed attempts to leave StateStoreError
	// since the hub started.
	storeRetries uint64
	// epoch counts the volume's entries into StateStoreError: remote
	// reads and deferred writes of an older epoch are dropped.
	epoch uint64
	// agentMirror: a START_PROTECT with mirroring was queued for this
	// connection's agent and no STOP_PROTECT since.
	agentMirror bool
	// stopped: STOP_PROTECT was queued; the volume's writes and dirty
	// maps in flight are dropped (the agent puts them back into its
	// dirty bitmap) until the initial DIRTY_MAP that answers the next
	// START_PROTECT. initialsOwed counts START_PROTECTs with mirroring
	// whose initial DIRTY_MAP has not arrived.
	stopped      bool
	initialsOwed int
	testDirty    *roaring.Bitmap
	csum         csumVolume // checksum resync (csum.go)
	// lastVerify is the last online verify's result; verifyRuns and
	// verifyMismatches count verifies and mismatching regions found.
	lastVerify       *VolumeVerify
	verifyRuns       uint64
	verifyMismatches uint64
}

// New opens (creating if needed) the store and loads its state.
func New(cfg Config) (*Hub, error) {
	if cfg.Backend == nil {
		if cfg.Store == "" {
			return nil, errors.New("repagent hub: no store directory")
		}
		cfg.Backend = DirBackend(cfg.Store)
	}
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
		if wire.CheckName(cfg.Name) != nil {
			cfg.Name = "repagent-hub"
		}
	}
	if cfg.SyncChunkSectors == 0 {
		cfg.SyncChunkSectors = 2048
	}
	cfg.SyncChunkSectors = min(cfg.SyncChunkSectors, wire.MaxIOSectors)
	if cfg.SyncWindow <= 0 {
		cfg.SyncWindow = 4
	}
	if cfg.RegionSectors == 0 {
		cfg.RegionSectors = wire.DefaultRegionSectors
	}
	if rs := cfg.RegionSectors; rs < 8 || rs > 1<<21 || rs&(rs-1) != 0 {
		return nil, fmt.Errorf("repagent hub: region size %d sectors: must be a power of two from 8 to %d", rs, 1<<21)
	}
	if cfg.SyncChunkSectors < cfg.RegionSectors {
		cfg.SyncChunkSectors = cfg.RegionSectors
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 2 * time.Second
	}
	if cfg.CheckpointInterval <= 0 {
		cfg.CheckpointInterval = 50 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	switch {
	case cfg.TLS == nil && (cfg.Authorize != nil || cfg.AllowAnyIdentity):
		return nil, errors.New("repagent hub: identities are checked only with TLS: set the TLS files too")
	case cfg.TLS != nil && cfg.Authorize != nil && cfg.AllowAnyIdentity:
		return nil, errors.New("repagent hub: an authorization file and allowing any identity exclude each other")
	case cfg.TLS != nil && cfg.Authorize == nil && !cfg.AllowAnyIdentity:
		return nil, errors.New("repagent hub: with TLS, name the VMs each certificate may claim (an authorization file), or allow any identity explicitly")
	}
	if cfg.StoreRetry <= 0 {
		cfg.StoreRetry = 30 * time.Second
	}
	if cfg.openReplica == nil {
		cfg.openReplica = openReplica
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxConnsPerPeer <= 0 {
		cfg.MaxConnsPerPeer = DefaultMaxConnsPerPeer
	}
	var sb [8]byte
	rand.Read(sb[:])
	h := &Hub{cfg: cfg, log: cfg.Logger.With("component", "repagent-hub"), session: binary.LittleEndian.Uint64(sb[:]),
		vms: map[string]*hubVM{}, conns: map[*hubConn]struct{}{}, peers: map[string]int{}, lns: map[net.Listener]struct{}{},
		events: make(chan Event, 1024), evDone: make(chan struct{}), arenas: make(chan *arena, maxSpareArenas)}
	go h.deliverEvents()
	listing, err := cfg.Backend.VMs()
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("repagent hub: %w", err)
	}
	for name, vols := range listing {
		vm := h.vmLocked(name)
		if b, err := cfg.Backend.GetVM(name); err == nil && b != nil {
			var meta vmMeta
			if json.Unmarshal(b, &meta) == nil {
				vm.uuid = meta.UUID
			}
		}
		if !cfg.Shared {
			if err := h.openJournal(vm); err != nil {
				h.Close()
				return nil, fmt.Errorf("repagent hub: vm %s: %w", name, err)
			}
		}
		for _, vn := range vols {
			v := h.newVolume(vm, vn)
			st, err := loadState(cfg.Backend, name, vn)
			if err != nil {
				h.Close()
				return nil, fmt.Errorf("repagent hub: %w", err)
			}
			if st.FailoverTest {
				// The hub stopped during a failover test: what the test
				// VM wrote is unknown, so everything is read again.
				st.Need = []wire.Extent{{Start: 0, Count: wire.RegionCount(st.Sectors, st.RegionSectors)}}
				st.FailoverTest = false
				st.Synced = false
			}
			v.st = *st
			wire.AddExtents(v.need, st.Need, st.RegionSectors, cfg.RegionSectors, wire.RegionCount(st.Sectors, cfg.RegionSectors))
			v.sectors = st.Sectors
			v.applied = st.AppliedSeq
			vm.vols[vn] = v
		}
	}
	h.log.Info("store opened", "store", cfg.Backend.String(), "vms", len(h.vms), "shared", cfg.Shared)
	if cfg.Shared {
		go h.watchLeases()
	}
	return h, nil
}

// LeaseHolder is implemented by a journal.Store whose hold on its VM can
// be lost (the Ceph store's lease, when its renewal fails): LeaseErr is
// non-nil from then on.
type LeaseHolder interface {
	LeaseErr() error
}

// leaseErrLocked is why the hub no longer holds vm's store, or nil; h.mu
// held.
func (vm *hubVM) leaseErrLocked() error {
	if vm == nil || vm.lease == nil {
		return nil
	}
	return vm.lease.LeaseErr()
}

// watchLeases drops the VMs whose hold on the shared store was lost:
// their connection is cut (the agent goes to the hub that holds them
// now) and their journal closed once it is gone.
func (h *Hub) watchLeases() {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for range t.C {
		h.mu.Lock()
		if h.closed {
			h.mu.Unlock()
			return
		}
		for _, vm := range h.vms {
			err := vm.leaseErrLocked()
			if err == nil || vm.j == nil {
				continue
			}
			if c := vm.conn; c != nil {
				h.log.Error("lease lost: dropping the VM's agent connection", "vm", vm.name, "err", err)
				c.graceful = false
				c.shut()
				continue // detach releases the journal
			}
			h.releaseLocked(vm)
		}
		h.mu.Unlock()
	}
}

// releaseLocked closes vm's journal after its hold on the shared store
// was lost, so that a later attach takes it again; h.mu held.
func (h *Hub) releaseLocked(vm *hubVM) {
	if vm.j == nil {
		return
	}
	h.log.Warn("vm released: this hub does not hold it any more", "vm", vm.name)
	vm.j.Close()
	vm.j, vm.lease, vm.jBroken = nil, nil, false
}

// reloadLocked reads vm's identity and volume states from the shared
// store again, after this hub took its hold (another hub may have
// changed them); h.mu held, vm not connected.
func (h *Hub) reloadLocked(vm *hubVM) error {
	b, err := h.cfg.Backend.GetVM(vm.name)
	if err != nil {
		return err
	}
	if b != nil {
		var meta vmMeta
		if json.Unmarshal(b, &meta) == nil {
			vm.uuid = meta.UUID
		}
	}
	listing, err := h.cfg.Backend.VMs()
	if err != nil {
		return err
	}
	vols := map[string]*hubVolume{}
	for _, vn := range listing[vm.name] {
		st, err := loadState(h.cfg.Backend, vm.name, vn)
		if err != nil {
			return err
		}
		v := h.newVolume(vm, vn)
		if st.FailoverTest {
			st.Need = []wire.Extent{{Start: 0, Count: wire.RegionCount(st.Sectors, st.RegionSectors)}}
			st.FailoverTest = false
			st.Synced = false
		}
		v.st = *st
		wire.AddExtents(v.need, st.Need, st.RegionSectors, h.cfg.RegionSectors, wire.RegionCount(st.Sectors, h.cfg.RegionSectors))
		v.sectors = st.Sectors
		v.applied = st.AppliedSeq
		vols[vn] = v
	}
	vm.vols = vols
	return nil
}

// openJournal opens vm's journal, or reopens it after a sticky store
// error (the store is tried again); h.mu held or the hub not yet shared.
func (h *Hub) openJournal(vm *hubVM) error {
	if vm.j != nil {
		if vm.j.Err() == nil && vm.j.ApplyErr() == nil {
			return nil
		}
		vm.j.Close()
		vm.j = nil
		vm.jBroken = true
	}
	// A journal closed after a store error is probed at every reopen
	// until one works (a failed reopen leaves vm.j nil).
	reopen := vm.jBroken
	j, store, err := h.dialJournal(vm)
	if err != nil {
		return err
	}
	if h.cfg.Shared {
		// Taken the hold just now: what the store says wins over what
		// this hub last knew.
		if err := h.reloadLocked(vm); err != nil {
			j.Close()
			return fmt.Errorf("read the vm's state: %w", err)
		}
	}
	if reopen {
		// Opening only read the journal: try a write before the volumes
		// leave store-error, so that a store that is still full is
		// reported as such and not as syncing.
		if err := j.Probe(); err != nil {
			j.Close()
			return err
		}
	}
	vm.jBroken = false
	vm.j = j
	vm.lease, _ = store.(LeaseHolder)
	vm.resync = j.InResync()
	return nil
}

// dialJournal opens vm's journal on its store; it changes nothing of vm.
func (h *Hub) dialJournal(vm *hubVM) (*journal.Journal, journal.Store, error) {
	store := h.cfg.Backend.Journal(vm.name)
	j, err := journal.Open(vm.dir, journal.Options{Retain: h.cfg.Retain, MaxBytes: h.cfg.RetainBytes,
		ApplyInterval: h.cfg.ApplyInterval, Logger: h.log.With("vm", vm.name), FaultHook: h.cfg.faultHook,
		Store: store})
	return j, store, err
}

// vmLocked returns the VM named name, creating its record.
func (h *Hub) vmLocked(name string) *hubVM {
	vm := h.vms[name]
	if vm == nil {
		vm = &hubVM{name: name, dir: filepath.Join(h.cfg.Store, name), vols: map[string]*hubVolume{}}
		if h.cfg.Store == "" {
			vm.dir = h.cfg.Backend.Journal(name).String()
		}
		h.vms[name] = vm
	}
	return vm
}

func (h *Hub) newVolume(vm *hubVM, name string) *hubVolume {
	return &hubVolume{vm: vm, name: name, state: StateDisconnected,
		log:  h.log.With("vm", vm.name, "volume", name),
		need: roaring.New(), inRead: roaring.New(), stale: roaring.New(), held: roaring.New(), testDirty: roaring.New()}
}

// deliverEvents calls OnEvent in order.
func (h *Hub) deliverEvents() {
	defer close(h.evDone)
	for e := range h.events {
		if h.cfg.OnEvent != nil {
			h.cfg.OnEvent(e)
		}
	}
}

// setState changes a volume's state and queues the event; h.mu held.
func (h *Hub) setState(v *hubVolume, state, reason string) {
	if v.state == state {
		return
	}
	prev := v.state
	v.state, v.reason = state, reason
	v.log.Info("volume state", "state", state, "previous", prev, "reason", reason)
	select {
	case h.events <- Event{VM: v.vm.name, Volume: v.name, State: state, Previous: prev, Reason: reason}:
	default:
		v.log.Warn("event dropped: queue full", "state", state)
	}
}

// storeFailed puts v into StateStoreError for err; h.mu held. Its
// durable state is not written again until protection restarts from it.
// An agent that mirrors v is told to stop (STOP_PROTECT, queued before
// any later frame): it keeps what the hub did not acknowledge as dirty.
func (h *Hub) storeFailed(v *hubVolume, err error) {
	v.storeErrors++
	if v.storeErr == nil {
		v.epoch++
		v.log.Error("store error: the recovery volume is not protected until the store works again (the hub retries)", "err", err)
	}
	v.storeErr = err
	v.storeErrAt = time.Now()
	v.mirror = false
	v.wrote, v.changed = false, false
	if c := v.conn; c != nil && v.agentMirror {
		v.agentMirror = false
		v.stopped = true
		c.queueCtl(&wire.StopProtect{Volume: v.id})
		c.poke()
	}
	h.setState(v, StateStoreError, err.Error())
}

// Listen listens on addr ("host:port") for agents. Plain TCP (no TLS
// configured) is refused on a non-loopback address unless insecure.
func (h *Hub) Listen(addr string, insecure bool) (net.Listener, error) {
	if h.cfg.TLS == nil {
		if err := wire.CheckPlain(addr, insecure); err != nil {
			return nil, fmt.Errorf("repagent hub: listen %w", err)
		}
	}
	return net.Listen("tcp", addr)
}

// Serve accepts agents on ln until ctx is done or Close is called.
func (h *Hub) Serve(ctx context.Context, ln net.Listener) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		ln.Close()
		return errors.New("repagent hub: closed")
	}
	h.lns[ln] = struct{}{}
	h.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		nc, err := ln.Accept()
		if err != nil {
			h.mu.Lock()
			closed := h.closed
			delete(h.lns, ln)
			h.mu.Unlock()
			if closed || ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("repagent hub: accept: %w", err)
		}
		h.mu.Lock()
		if h.closed {
			h.mu.Unlock()
			nc.Close()
			return nil
		}
		peer := peerIP(nc.RemoteAddr())
		if why := h.overLimitLocked(peer); why != "" {
			h.refusedLocked(peer, why)
			h.mu.Unlock()
			nc.Close()
			continue
		}
		c := newHubConn(h, nc)
		c.peer = peer
		h.conns[c] = struct{}{}
		h.peers[peer]++
		h.wg.Add(1)
		h.mu.Unlock()
		go func() {
			defer h.wg.Done()
			c.serve()
			h.mu.Lock()
			delete(h.conns, c)
			if h.peers[peer]--; h.peers[peer] <= 0 {
				delete(h.peers, peer)
			}
			h.mu.Unlock()
		}()
	}
}

// peerIP returns the IP address of a connection's peer.
func peerIP(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// overLimitLocked says why a new connection from peer would exceed a
// connection cap, or "".
func (h *Hub) overLimitLocked(peer string) string {
	if len(h.conns) >= h.cfg.MaxConns {
		return fmt.Sprintf("%d connections open, the maximum", len(h.conns))
	}
	if n := h.peers[peer]; n >= h.cfg.MaxConnsPerPeer {
		return fmt.Sprintf("%d connections open from this address, the maximum per peer", n)
	}
	return ""
}

// refusedLocked logs a connection refused by a cap, at most once a second
// (a flood must not flood the log too).
func (h *Hub) refusedLocked(peer, why string) {
	h.refused++
	if now := time.Now(); now.Sub(h.refusedAt) >= time.Second {
		h.log.Warn("connection refused", "peer", peer, "reason", why, "refused_since_last_log", h.refused)
		h.refusedAt, h.refused = now, 0
	}
}

// Close disconnects every agent after a last checkpoint, stops
// listening, stops failover tests and closes the store.
func (h *Hub) Close() error { return h.stop(true) }

// Abort stops the hub as a killed process stops: connections are cut
// without a last checkpoint. Tests use it to model a crash.
func (h *Hub) Abort() { h.stop(false) }

func (h *Hub) stop(graceful bool) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	for ln := range h.lns {
		ln.Close()
	}
	var tests []*failoverTest
	for _, vm := range h.vms {
		if vm.failover != nil {
			tests = append(tests, vm.failover)
		}
	}
	for c := range h.conns {
		c.graceful = graceful
		c.shut()
	}
	h.mu.Unlock()
	h.wg.Wait()
	for _, t := range tests {
		t.close()
	}
	h.mu.Lock()
	for _, vm := range h.vms {
		if vm.j != nil {
			vm.j.Close()
			vm.j = nil
		}
	}
	h.mu.Unlock()
	close(h.events)
	<-h.evDone
	if err := h.cfg.Backend.Close(); err != nil {
		h.log.Warn("closing the store", "store", h.cfg.Backend.String(), "err", err)
	}
	return nil
}

// hubConn is one agent connection. Its engine goroutine owns the writer,
// the volumes' files and the outstanding requests.
type hubConn struct {
	h      *Hub
	nc     net.Conn
	log    *slog.Logger
	w      *wire.Writer
	frames chan *frameBatch // batches of frames, in order
	// sorted is byID's volumes by id, nil when byID changed (h.mu).
	sorted []*hubVolume
	// arena holds the payloads of the frames being handled (engine).
	arena    *arena
	readErr  chan error
	kick     chan struct{}
	done     chan struct{}
	once     sync.Once
	graceful bool     // guarded by h.mu: checkpoint on shutdown
	peer     string   // the peer's IP address, for the per-peer cap
	ids      []string // the peer certificate's identities (TLS)

	// Owned by the engine goroutine.
	vm      *hubVM
	session uint64
	group   bool // the agent's volumes are a consistency group (FlagGroup)
	// groupConsistent is the last GROUP_STATE's (false before the first).
	groupConsistent bool
	byID            map[uint64]*hubVolume
	nextID          uint64
	reqs            map[uint64]*readReq
	nextReq         uint64
	lastSeq         uint64 // last sequence received
	// seqBase is added to the agent's sequence numbers in the journal,
	// whose numbers increase over its life: an agent process that
	// restarted numbers from 1 again (seqMapped: chosen at the first
	// journaled write of the connection).
	seqBase   uint64
	seqMapped bool
	lastCkpt  time.Time
	pending   bool // applied or changed since the last checkpoint
	shutdown  bool // AGENT_SHUTDOWN received
	// mustSave: the regions to read grew because of a frame with a
	// sequence number; it is acknowledged only after the state is saved.
	mustSave bool
	// lastPending is the journal submission of the last records.
	lastPending *journal.Pending
	// refRecs are mirrored writes of the frame batch being handled whose
	// data stays in its arena, journaled together (one submission, one
	// reference on the arena) at the end of the batch, before any other
	// record, or once they hold refFlushBytes (flushRefs); refBytes is
	// their data.
	refRecs  []journal.Record
	refBytes int
	// pw is the PROTECTED_WRITE being handled, decoded in place.
	pw wire.ProtectedWrite
	// deferred are mirrored writes into regions being read, journaled
	// after the read's data, in arrival order.
	deferred []deferredWrite
	// ackQueued is the highest sequence handed to the acker.
	ackQueued uint64
	// endPending is the submission of the last resync end until durable.
	endPending *journal.Pending
	// ckpts are checkpoints that arrived during a resync set, journaled
	// after its end (h.mu).
	ckpts []string

	// peerVersion is the protocol level of the agent's HELLO.
	peerVersion uint16
	// reportGen is the generation of the agent's last report (level 3;
	// 0 below), echoed in START_PROTECT so the agent can tell which
	// report it answers (h.mu).
	reportGen uint64
	// csum holds outstanding CSUM_REQs (csum.go).
	csum csumConn

	wmu     sync.Mutex // serialises the writer between engine and acker
	acks    chan ackItem
	ackDone chan struct{}

	// ctl are control frames (START_PROTECT, STOP_PROTECT) queued under
	// h.mu in the order decided; every write sends them first, so a
	// STOP_PROTECT precedes any WRITE_ACK sent after the decision.
	ctlMu sync.Mutex
	ctl   []wire.Message
	// storeGen counts the journal reopens of this connection: a journal
	// error of an older generation is not the current store's.
	storeGen atomic.Uint64
	// retryAt and retryWait schedule the next attempt to leave
	// StateStoreError (engine).
	retryAt   time.Time
	retryWait time.Duration
}

// queueCtl queues a control frame; h.mu held where the decision is.
func (c *hubConn) queueCtl(m wire.Message) {
	c.ctlMu.Lock()
	c.ctl = append(c.ctl, m)
	c.ctlMu.Unlock()
}

// writeCtl writes the queued control frames; wmu held.
func (c *hubConn) writeCtl() error {
	c.ctlMu.Lock()
	msgs := c.ctl
	c.ctl = nil
	c.ctlMu.Unlock()
	for _, m := range msgs {
		if err := c.w.WriteMessage(m); err != nil {
			return err
		}
	}
	return nil
}

// storeFault is a journal or state error that put volumes into
// StateStoreError: the connection goes on (the hub retries the store).
type storeFault struct{ err error }

func (e storeFault) Error() string { return e.err.Error() }
func (e storeFault) Unwrap() error { return e.err }

// fatal reports whether err ends the connection: a store fault does not.
func fatal(err error) bool {
	if err == nil {
		return false // before sf: errors.As moves it to the heap, an allocation per frame
	}
	var sf storeFault
	return !errors.As(err, &sf)
}

// deferredWrite is a mirrored write held until the remote reads of its
// regions are journaled.
type deferredWrite struct {
	v       *hubVolume
	regions *roaring.Bitmap
	rec     journal.Record
	seq     uint64
	epoch   uint64 // v.epoch when deferred
}

// ackItem asks the acker to acknowledge seq once p is durable.
type ackItem struct {
	p   *journal.Pending
	seq uint64
	gen uint64 // the connection's storeGen when p was submitted
}

// readReq is an outstanding remote read.
type readReq struct {
	v            *hubVolume
	first, count uint64 // regions
	sector       uint64
	sectors      uint32
	epoch        uint64 // v.epoch when sent
}

func newHubConn(h *Hub, nc net.Conn) *hubConn {
	return &hubConn{h: h, nc: nc, log: h.log.With("peer", nc.RemoteAddr().String()),
		frames: make(chan *frameBatch, 64), readErr: make(chan error, 1), kick: make(chan struct{}, 1),
		done: make(chan struct{}), byID: map[uint64]*hubVolume{}, reqs: map[uint64]*readReq{}, graceful: true,
		acks: make(chan ackItem, 4096), ackDone: make(chan struct{})}
}

func (c *hubConn) shut() {
	c.once.Do(func() {
		close(c.done)
		c.nc.Close()
	})
}

// poke wakes the engine (state changed from outside).
func (c *hubConn) poke() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// protoErr ends the connection with a logged reason.
type protoErr struct{ err error }

func (e protoErr) Error() string { return e.err.Error() }
func (e protoErr) Unwrap() error { return e.err }

func (c *hubConn) bad(format string, args ...any) error {
	return protoErr{wire.Malformed(format, args...)}
}

// serve runs the connection: TLS, HELLO, then the engine.
func (c *hubConn) serve() {
	defer c.shut()
	h := c.h
	if h.cfg.TLS != nil {
		tc := tls.Server(c.nc, h.cfg.TLS)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := tc.HandshakeContext(ctx)
		cancel()
		if err != nil {
			c.log.Warn("tls handshake failed: connection refused", "err", err)
			return
		}
		cn := "(none)"
		if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 {
			cn = pc[0].Subject.CommonName
			c.ids = Identities(pc[0])
		}
		c.log = c.log.With("client_cert", cn)
		c.nc = tc
	}
	// Nothing larger than a HELLO is read before the peer said who it is.
	var rw io.ReadWriter = c.nc
	if rc := rawsock.New(c.nc); rc != nil {
		rw = rc // a plain socket: raw calls (internal/rawsock)
	}
	r := newFrameReader(rw, wire.MaxHelloPayload, c.done, h.arenas)
	c.w = wire.NewWriter(rw)
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	f, err := r.ReadFrame()
	if err != nil {
		c.log.Warn("no hello", "err", err)
		return
	}
	m, err := wire.Decode(f)
	hello, ok := m.(*wire.Hello)
	if err == nil && (!ok || hello.Reply) {
		err = wire.Malformed("%s where HELLO was expected", f.Cmd)
	}
	if err != nil {
		c.log.Error("closing connection: bad frame", "reason", err)
		return
	}
	if a := h.cfg.Authorize; a != nil {
		id, ok := a.Allows(c.ids, hello.Name)
		if !ok {
			c.log.Warn("hello refused: the certificate is not authorised for this vm", "vm", hello.Name,
				"identities", strings.Join(c.ids, ","))
			c.refuse(fmt.Sprintf("the certificate is not authorised for vm %q", hello.Name))
			return
		}
		c.log = c.log.With("identity", id)
	}
	r.SetMaxPayload(h.cfg.MaxPayload)
	if err := c.attach(hello); err != nil {
		c.log.Error("closing connection", "reason", err)
		c.refuse(err.Error())
		return
	}
	c.log.Info("agent connected", "session", fmt.Sprintf("%016x", hello.Session))
	if err := c.send(&wire.Hello{Reply: true, MaxVersion: wire.MaxVersion, Session: h.session, Name: h.cfg.Name}); err != nil {
		c.detach(err)
		return
	}
	go c.readLoop(r)
	go c.acker()
	err = c.engine()
	c.detach(err)
	<-c.ackDone
}

// acker sends WRITE_ACK for what the engine queued, once the journal
// made it durable: one acknowledgement per group commit, however many
// writes it held. A journal error is not acknowledged: the volumes go to
// StateStoreError (their STOP_PROTECT precedes any later WRITE_ACK, so
// the agent keeps what was lost as dirty) and the engine retries the
// store.
func (c *hubConn) acker() {
	defer close(c.ackDone)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-c.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	var next *ackItem
	var acked uint64
	for {
		it := next
		next = nil
		if it == nil {
			select {
			case x := <-c.acks:
				it = &x
			case <-c.done:
				return
			}
		}
		if it.p != nil {
			if _, err := it.p.Wait(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				c.ackFailed(it, err)
				continue
			}
		}
		seq := it.seq
	coalesce:
		for next == nil {
			select {
			case x := <-c.acks:
				if x.p != nil {
					select {
					case <-x.p.Done():
					default:
						next = &x
						continue
					}
					if _, err := x.p.Wait(ctx); err != nil {
						if ctx.Err() != nil {
							return
						}
						c.ackFailed(&x, err)
						break coalesce
					}
				}
				seq = max(seq, x.seq)
			default:
				break coalesce
			}
		}
		if seq > acked {
			acked = seq
			if err := c.send(&wire.WriteAck{Seq: seq}); err != nil {
				c.shut()
				return
			}
		}
	}
}

// ackFailed handles a journal submission that failed: unless it was made
// to a journal since reopened, the store failed now.
func (c *hubConn) ackFailed(it *ackItem, err error) {
	if it.gen == c.storeGen.Load() {
		c.failStore(err)
	}
}

// failStore puts the connection's protected volumes into StateStoreError
// for a journal error.
func (c *hubConn) failStore(err error) {
	c.h.mu.Lock()
	defer c.h.mu.Unlock()
	c.failStoreLocked(err)
}

// failStoreLocked is failStore with h.mu held.
func (c *hubConn) failStoreLocked(err error) {
	for _, v := range c.byID {
		if v.storeErr != nil && !v.mirror {
			continue // stopped already, by this failure or an earlier one
		}
		if v.mirror || v.wantMirror {
			c.h.storeFailed(v, fmt.Errorf("journal: %w", err))
		}
	}
}

// submit journals recs in order after everything submitted before; h.mu
// not held.
func (c *hubConn) submit(recs ...journal.Record) error {
	return c.submitWith(c.failStore, recs)
}

// submitLocked is submit with h.mu held (a journal error must not take it
// again).
func (c *hubConn) submitLocked(recs ...journal.Record) error {
	return c.submitWith(c.failStoreLocked, recs)
}

func (c *hubConn) submitWith(fail func(error), recs []journal.Record) error {
	if err := c.flushRefs(fail); err != nil {
		return err
	}
	p, err := c.vm.j.Submit(recs...)
	return c.submitted(p, err, fail)
}

// submitted records what a journal submission of the connection
// returned: p becomes the last submission; a store error is handled by
// fail and returned as a storeFault, the journal's refusal as it is.
func (c *hubConn) submitted(p *journal.Pending, err error, fail func(error)) error {
	if err != nil {
		if !errors.Is(err, journal.ErrInvalid) {
			fail(err)
			return storeFault{err}
		}
		return err
	}
	c.lastPending = p
	return nil
}

// refFlushBytes bounds the data of the mirrored writes journaled as one
// submission (refRecs): a journal batch stays near its usual size.
const refFlushBytes = 1 << 20

// flushRefs journals the mirrored writes gathered from the current frame
// batch (refRecs), in order, as one submission holding one reference on
// the arena their data is in: one lock, one Pending and one arena
// reference per batch of frames instead of per write. fail handles a
// store error (h.mu held or not, as the caller's).
func (c *hubConn) flushRefs(fail func(error)) error {
	if len(c.refRecs) == 0 {
		return nil
	}
	recs := c.refRecs
	c.refRecs, c.refBytes = c.refRecs[:0], 0
	defer clear(recs) // no references to the arena stay
	c.arena.hold()
	p, err := c.vm.j.SubmitRef(c.arena, recs...)
	if err != nil {
		c.arena.Release() // not taken
	}
	return c.submitted(p, err, fail)
}

// queueAck hands the acker the highest sequence that may be acknowledged
// once the journal's last submission is durable: everything up to the
// first deferred write, unless a state must be saved first.
func (c *hubConn) queueAck() error {
	if c.mustSave {
		return nil
	}
	ackable := c.lastSeq
	if len(c.deferred) > 0 {
		ackable = c.deferred[0].seq - 1
	}
	if ackable <= c.ackQueued {
		return nil
	}
	c.ackQueued = ackable
	select {
	case c.acks <- ackItem{p: c.lastPending, seq: ackable, gen: c.storeGen.Load()}:
		return nil
	case <-c.done:
		return errors.New("connection closed")
	}
}

// attach binds the connection to its VM, replacing an older connection of
// the same VM (an agent that reconnects before the hub saw the old link
// die).
func (c *hubConn) attach(hello *wire.Hello) error {
	h := c.h
	uuid := hex.EncodeToString(hello.UUID[:])
	for {
		h.mu.Lock()
		if h.closed {
			h.mu.Unlock()
			return errors.New("hub closing")
		}
		vm := h.vmLocked(hello.Name)
		if vm.promoted {
			h.mu.Unlock()
			return fmt.Errorf("vm %q was promoted on this hub: its recovery volumes are the sources now", hello.Name)
		}
		if h.cfg.Shared && vm.conn == nil {
			if err := vm.leaseErrLocked(); err != nil {
				h.releaseLocked(vm)
			}
			if vm.j == nil {
				if err := h.openJournal(vm); err != nil {
					h.mu.Unlock()
					if errors.Is(err, journal.ErrInUse) {
						return fmt.Errorf("vm %q is %s: %w", hello.Name, wire.ReasonHeldElsewhere, err)
					}
					return fmt.Errorf("open journal: %w", err)
				}
				h.log.Info("vm taken: this hub holds it now", "vm", vm.name)
			}
		}
		if vm.uuid != "" && vm.uuid != uuid {
			h.mu.Unlock()
			return fmt.Errorf("vm %q is registered with uuid %s, agent says %s", hello.Name, vm.uuid, uuid)
		}
		if old := vm.conn; old != nil && old != c {
			h.mu.Unlock()
			c.log.Info("replacing the VM's previous connection")
			old.shut()
			select {
			case <-old.done:
			case <-time.After(10 * time.Second):
				return errors.New("previous connection did not go away")
			}
			// detach clears vm.conn; wait for it.
			for i := 0; i < 1000; i++ {
				h.mu.Lock()
				gone := vm.conn != old
				h.mu.Unlock()
				if gone {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			continue
		}
		if vm.uuid == "" {
			b, _ := json.Marshal(vmMeta{Name: vm.name, UUID: uuid})
			if err := h.cfg.Backend.PutVM(vm.name, b); err != nil {
				h.mu.Unlock()
				return err
			}
			vm.uuid = uuid
		}
		if err := h.openJournal(vm); err != nil {
			h.mu.Unlock()
			return fmt.Errorf("open journal: %w", err)
		}
		vm.conn = c
		c.vm = vm
		c.session = hello.Session
		c.peerVersion = hello.MaxVersion
		c.group = hello.Group
		c.log = c.log.With("vm", vm.name)
		h.mu.Unlock()
		return nil
	}
}

// detach ends the connection: outstanding reads go back to need, the
// state is checkpointed (unless the hub is being killed) and the volumes
// are disconnected.
func (c *hubConn) detach(err error) {
	c.shut()
	c.csumDetach()
	h := c.h
	var pe protoErr
	switch {
	case errors.As(err, &pe):
		c.log.Error("closing connection: bad frame", "reason", pe.err)
	case err != nil && !c.shutdown:
		c.log.Warn("agent connection lost", "err", err)
	default:
		c.log.Info("agent disconnected")
	}
	h.mu.Lock()
	graceful := c.graceful
	for _, v := range c.byID {
		v.need.Or(v.inRead)
		v.inRead.Clear()
		v.stale.Clear()
		v.held.Clear()
		v.reads = 0
		v.changed = true
	}
	// Deferred writes were never acknowledged: the agent sends their
	// regions again.
	c.deferred = nil
	h.mu.Unlock()
	if graceful {
		c.checkpoint(false)
	}
	h.mu.Lock()
	for _, v := range c.byID {
		v.conn = nil
		v.id = 0
		v.mirror = false
		v.agentMirror, v.stopped, v.initialsOwed = false, false, 0
		v.backlog = wire.Backlog{}
		if v.state != StateFailoverTest && v.storeErr == nil {
			reason := "agent disconnected"
			if c.shutdown {
				reason = "agent shut down cleanly"
			}
			h.setState(v, StateDisconnected, reason)
		}
	}
	if c.vm != nil && c.vm.conn == c {
		c.vm.conn = nil
		if c.vm.leaseErrLocked() != nil {
			h.releaseLocked(c.vm)
		}
	}
	h.mu.Unlock()
}

// readLoop feeds frames to the engine, in batches of what one read of
// the socket brought: one hand-off per batch, not per frame.
func (c *hubConn) readLoop(r *frameReader) {
	defer r.close()
	for {
		c.nc.SetReadDeadline(time.Now().Add(wire.PeerTimeout(c.h.cfg.Heartbeat)))
		f, err := r.ReadFrame()
		if err != nil {
			c.readErr <- err
			return
		}
		b := r.batch()
		b.frames = append(b.frames, f)
		// Only frames already in the arena: a batch holds one arena.
		for len(b.frames) < maxFrameBatch && r.complete() {
			if f, err = r.ReadFrame(); err != nil {
				break
			}
			b.frames = append(b.frames, f)
		}
		r.seal(b)
		select {
		case c.frames <- b:
		case <-c.done:
			b.release()
			return
		}
		if err != nil {
			c.readErr <- err
			return
		}
	}
}

// maxFrameBatch bounds the frames readLoop hands over at once.
const maxFrameBatch = 256

// send writes one message and flushes.
func (c *hubConn) send(m wire.Message) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(wire.PeerTimeout(c.h.cfg.Heartbeat)))
	if err := c.writeCtl(); err != nil {
		return err
	}
	if err := c.w.WriteMessage(m); err != nil {
		return err
	}
	return c.w.Flush()
}

func (c *hubConn) write(m wire.Message) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(wire.PeerTimeout(c.h.cfg.Heartbeat)))
	if err := c.writeCtl(); err != nil {
		return err
	}
	return c.w.WriteMessage(m)
}

// flush sends the queued control frames and what is buffered.
func (c *hubConn) flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(wire.PeerTimeout(c.h.cfg.Heartbeat)))
	if err := c.writeCtl(); err != nil {
		return err
	}
	return c.w.Flush()
}

// engine handles frames in order, issues remote reads, checkpoints and
// acknowledges, until the connection ends.
func (c *hubConn) engine() error {
	h := c.h
	hb := time.NewTicker(h.cfg.Heartbeat)
	defer hb.Stop()
	ckpt := time.NewTimer(time.Hour)
	ckpt.Stop()
	armed := false
	c.lastCkpt = time.Now()
	for {
		select {
		case <-c.done:
			return errors.New("connection closed")
		case err := <-c.readErr:
			if errors.Is(err, io.EOF) && c.shutdown {
				return nil
			}
			if errors.Is(err, wire.ErrMalformed) {
				return protoErr{err}
			}
			return err
		case fs := <-c.frames:
			if err := c.handleAll(fs); fatal(err) {
				return err
			}
			// Handle what is already here before deciding to
			// checkpoint, within the interval.
		batch:
			for time.Since(c.lastCkpt) < h.cfg.CheckpointInterval {
				select {
				case fs := <-c.frames:
					if err := c.handleAll(fs); fatal(err) {
						return err
					}
				default:
					break batch
				}
			}
		case <-c.kick:
			c.pending = true // state changed from outside: save it
		case <-ckpt.C:
			armed = false
		case <-hb.C:
			if err := c.write(&wire.Heartbeat{}); err != nil {
				return err
			}
			if err := c.vm.j.ApplyErr(); err != nil && c.mirroring() {
				// The applier could not advance the replica images: the
				// store is failing; nothing more is acknowledged.
				c.failStore(fmt.Errorf("applier: %w", err))
			}
			c.retryStore()
		}
		if err := c.pump(); fatal(err) {
			return err
		}
		if c.mustSave {
			if err := c.checkpoint(true); fatal(err) {
				return err
			}
		}
		if err := c.queueAck(); err != nil {
			return err
		}
		if c.pending {
			if wait := minCheckpointGap - time.Since(c.lastCkpt); wait > 0 && len(c.frames) == 0 {
				if !armed {
					ckpt.Reset(wait)
					armed = true
				}
			} else if err := c.checkpoint(true); fatal(err) {
				return err
			}
		}
		if err := c.flush(); err != nil {
			return err
		}
	}
}

// mirroring reports whether a volume of the connection is mirrored.
func (c *hubConn) mirroring() bool {
	c.h.mu.Lock()
	defer c.h.mu.Unlock()
	for _, v := range c.byID {
		if v.mirror {
			return true
		}
	}
	return false
}

// firstStoreRetry is the wait before the first attempt to leave
// StateStoreError (at most Config.StoreRetry).
const firstStoreRetry = time.Second

// retryStore tries the store again for the connection's volumes in
// StateStoreError, with backoff: it reopens the VM's journal if it is
// broken (with a write probe) and starts protection again (a resync of
// what the durable state and the agent's dirty regions name; the volumes
// are syncing until it completes). A failed attempt is logged with its
// cause, counted, and doubles the wait up to StoreRetry. It runs on the
// engine, at heartbeats; the store is opened without h.mu, so other VMs
// go on while it hangs or fails.
func (c *hubConn) retryStore() {
	h := c.h
	now := time.Now()
	h.mu.Lock()
	var vols []*hubVolume
	var since time.Time
	for _, v := range c.sortedVolumes() {
		if v.storeErr != nil && v.wantMirror {
			vols = append(vols, v)
			if v.storeErrAt.After(since) {
				since = v.storeErrAt
			}
		}
	}
	if len(vols) == 0 {
		c.retryAt, c.retryWait = time.Time{}, 0
		h.mu.Unlock()
		return
	}
	if c.retryAt.IsZero() {
		c.retryWait = min(firstStoreRetry, h.cfg.StoreRetry)
		c.retryAt = since.Add(c.retryWait)
	}
	if now.Before(c.retryAt) {
		h.mu.Unlock()
		return
	}
	j := c.vm.j
	broken := j == nil || j.Err() != nil || j.ApplyErr() != nil
	h.mu.Unlock()
	var err error
	if broken {
		err = c.reopenJournal()
	}
	h.mu.Lock()
	if err == nil {
		for _, v := range vols {
			if v.storeErr == nil || v.conn != c {
				continue
			}
			if err = c.protect(v, v.sectors); err != nil {
				h.storeFailed(v, fmt.Errorf("protect: %w", err))
				break
			}
			c.startMirror(v)
			v.log.Warn("store works again: protection restarting; the regions changed meanwhile are resynchronised before the volume is protecting")
		}
	}
	if err != nil {
		for _, v := range vols {
			if v.storeErr != nil {
				v.storeRetries++
				v.storeErr = err
				v.reason = err.Error()
			}
		}
		c.retryWait = min(2*c.retryWait, h.cfg.StoreRetry)
		c.retryAt = time.Now().Add(c.retryWait)
		c.log.Warn("store still failing: the VM's volumes stay in store-error", "err", err, "next_retry_in", c.retryWait)
	} else {
		c.retryAt, c.retryWait = time.Time{}, 0
	}
	h.mu.Unlock()
	c.poke()
}

// reopenJournal closes the VM's broken journal and opens it again with a
// write probe, without h.mu (a hung store holds up only this VM); engine.
// A journal that does not open stays the closed one (its methods fail).
func (c *hubConn) reopenJournal() error {
	h := c.h
	vm := c.vm
	h.mu.Lock()
	old := vm.j
	vm.jBroken = true
	h.mu.Unlock()
	if old != nil {
		old.Close() // its sticky error is the one being retried
	}
	j, store, err := h.dialJournal(vm)
	if err == nil {
		if err = j.Probe(); err != nil {
			j.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("reopen journal: %w", err)
	}
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		j.Close()
		return errors.New("hub closing")
	}
	vm.j = j
	vm.jBroken = false
	vm.lease, _ = store.(LeaseHolder)
	vm.resync = j.InResync()
	h.mu.Unlock()
	// Submissions to the old journal are over: their errors are not the
	// new one's.
	c.storeGen.Add(1)
	c.lastPending = nil
	c.endPending = nil
	c.log.Warn("journal reopened after a store error")
	return nil
}

// minCheckpointGap is the least time between two checkpoints: writes
// arriving one by one are fsynced and acknowledged in small batches.
const minCheckpointGap = 5 * time.Millisecond

// handleAll processes a batch of frames in order, then gives their
// buffer back: what handling keeps of a payload it copies (the journal
// copies a write's data; a deferred write is cloned).
func (c *hubConn) handleAll(b *frameBatch) error {
	defer b.release()
	c.arena = b.arena
	defer func() {
		clear(c.refRecs) // after a fatal error: never journaled
		c.refRecs, c.refBytes = c.refRecs[:0], 0
		c.arena = nil
	}()
	for _, f := range b.frames {
		// A store fault stopped volumes: the frames after it are
		// handled (they may concern other volumes or the connection).
		if err := c.handle(f); fatal(err) {
			return err
		}
	}
	if err := c.flushRefs(c.failStore); fatal(err) {
		return err
	}
	return nil
}

// handle processes one frame.
func (c *hubConn) handle(f wire.Frame) error {
	if f.Cmd == wire.CmdProtectedWrite {
		// The hot path: decoded into the connection's message, no
		// allocation per write.
		if err := wire.DecodeProtectedWrite(f, &c.pw); err != nil {
			return protoErr{err}
		}
		if c.shutdown {
			return c.bad("%s after AGENT_SHUTDOWN", f.Cmd)
		}
		return c.protectedWrite(&c.pw)
	}
	// Every other frame sees the mirrored writes before it journaled.
	if err := c.flushRefs(c.failStore); fatal(err) {
		return err
	}
	m, err := wire.Decode(f)
	if err != nil {
		return protoErr{err}
	}
	if c.shutdown {
		return c.bad("%s after AGENT_SHUTDOWN", f.Cmd)
	}
	switch m := m.(type) {
	case *wire.ReportVolumes:
		return c.report(m)
	case *wire.DirtyMap:
		return c.dirtyMap(m)
	case *wire.RemoteIORes:
		return c.remoteIORes(m)
	case *wire.Heartbeat:
		h := c.h
		h.mu.Lock()
		for _, b := range m.Backlog {
			if v := c.byID[b.Volume]; v != nil {
				v.backlog = b
			}
		}
		h.mu.Unlock()
		return nil
	case *wire.GroupState:
		return c.groupState(m)
	case *wire.Checkpoint:
		return c.checkpointFrame(m)
	case *wire.CsumRes:
		return c.csumRes(m)
	case *wire.AgentShutdown:
		if m.Reply {
			return c.bad("%s with the reply flag from an agent", f.Cmd)
		}
		return c.agentShutdown()
	}
	return c.bad("%s is not sent by an agent", f.Cmd)
}

// report handles REPORT_VM_VOLUMES: new volumes get an id and, when the
// agent asks for protection, the decision of what to resync.
func (c *hubConn) report(m *wire.ReportVolumes) error {
	h := c.h
	h.mu.Lock()
	if m.Gen != 0 || c.reportGen != 0 {
		if c.peerVersion < 3 || m.Gen <= c.reportGen {
			h.mu.Unlock()
			return c.bad("%s: generation %d after %d (agent level %d)", m.Cmd(), m.Gen, c.reportGen, c.peerVersion)
		}
	}
	c.reportGen = m.Gen // what its START_PROTECTs answer
	reported := map[string]bool{}
	for _, vi := range m.Volumes {
		reported[vi.Name] = true
		if wire.RegionCount(vi.Sectors, h.cfg.RegionSectors) > wire.MaxTrackedRegions {
			h.mu.Unlock()
			return c.bad("%s: volume %q of %d sectors is too large", m.Cmd(), vi.Name, vi.Sectors)
		}
		v := c.vm.vols[vi.Name]
		if v != nil && v.conn == c {
			if v.mirror && vi.Protect && vi.Changed && v.sectors == vi.Sectors {
				// A table reload re-pointed the mirrored volume.
				c.changedInPlace(v)
				continue
			}
			if v.sectors == vi.Sectors && v.mirror == vi.Protect {
				continue
			}
			if v.mirror && v.sectors != vi.Sectors {
				// Resized: resync all of it.
				if err := c.resize(v, vi.Sectors); err != nil {
					h.mu.Unlock()
					return err
				}
				continue
			}
		}
		if v == nil {
			v = h.newVolume(c.vm, vi.Name)
			c.vm.vols[vi.Name] = v
		}
		if v.conn != c {
			c.nextID++
			v.id = c.nextID
			v.conn = c
			v.agentMirror, v.stopped, v.initialsOwed = false, false, 0
			c.byID[v.id] = v
			c.sorted = nil
		}
		v.mirror = vi.Protect
		v.wantMirror = vi.Protect
		v.reportedChanged = vi.Changed
		if !vi.Protect {
			v.sectors = vi.Sectors
			v.agentMirror = false // not protected at the agent
			c.queueCtl(&wire.StartProtect{Volume: v.id, Name: v.name, Gen: c.reportGen})
			continue
		}
		if err := c.protect(v, vi.Sectors); err != nil {
			// Not protected for now (the store is retried); the
			// others go on.
			v.sectors = vi.Sectors
			h.storeFailed(v, fmt.Errorf("protect: %w", err))
			continue
		}
		c.startMirror(v)
	}
	for id, v := range c.byID {
		if !reported[v.name] {
			delete(c.byID, id)
			c.sorted = nil
			v.conn, v.id, v.mirror = nil, 0, false
			v.need.Or(v.inRead)
			v.inRead.Clear()
			if v.state != StateFailoverTest {
				h.setState(v, StateDisconnected, "no longer reported")
			}
		}
	}
	h.mu.Unlock()
	return c.flush()
}

// startMirror queues the START_PROTECT that has the agent mirror v (its
// initial DIRTY_MAP answers it); h.mu held.
func (c *hubConn) startMirror(v *hubVolume) {
	v.mirror = true
	v.agentMirror = true
	v.initialsOwed++
	c.queueCtl(&wire.StartProtect{Volume: v.id, Name: v.name, Mirror: true, Gen: c.reportGen})
}

// protect opens a volume's recovery file and decides what to resync;
// h.mu held.
func (c *hubConn) protect(v *hubVolume, sectors uint64) error {
	h := c.h
	if err := errors.Join(v.vm.j.Err(), v.vm.j.ApplyErr()); err != nil {
		// The journal is broken until it is reopened.
		return fmt.Errorf("journal: %w", err)
	}
	if v.storeErr != nil {
		// Start again from what the store last made durable: the
		// in-memory state may have moved past it. Remote reads of the
		// failed epoch are dropped when they arrive.
		v.reads = 0
		st, err := loadState(h.cfg.Backend, v.vm.name, v.name)
		if err != nil {
			return err
		}
		v.st = volState{}
		if st != nil {
			v.st = *st
		}
		if v.file != nil {
			v.file.Close()
			v.file = nil
		}
	}
	fresh := v.st.Version == 0
	if !journal.ValidName(v.name) {
		return fmt.Errorf("volume name %q cannot be journaled (letters, digits, '.', '_', '-')", v.name)
	}
	size := int64(sectors) * wire.SectorSize
	known := false
	for _, jv := range v.vm.j.Volumes() {
		if jv.Name == v.name {
			known = true
			if jv.Size == size {
				size = 0
			}
		}
	}
	if !known {
		fresh = true
	}
	if size != 0 {
		// The applier creates (preallocated) or resizes the base image.
		if err := c.submitLocked(journal.Record{Kind: journal.KindVolume, Volume: v.name, Size: size}); err != nil {
			return err
		}
	}
	regions := wire.RegionCount(sectors, h.cfg.RegionSectors)
	v.need.Clear()
	v.inRead.Clear()
	v.stale.Clear()
	v.held.Clear()
	v.cursor = 0
	v.readErrors = 0
	var reason string
	full := false
	switch {
	case fresh:
		full, reason = true, "initial sync"
	case v.st.Sectors != sectors || v.st.RegionSectors != h.cfg.RegionSectors:
		full, reason = true, fmt.Sprintf("full resync: size changed from %d to %d sectors", v.st.Sectors, sectors)
	case v.reportedChanged && !c.group:
		full, reason = true, "full resync: the agent reports that the volume's data changed behind it (its backing was written while it was not served, or is another one)"
	case !v.st.Synced:
		wire.AddExtents(v.need, v.st.Need, v.st.RegionSectors, h.cfg.RegionSectors, regions)
		reason = "resuming the initial sync"
	case v.st.Clean:
		wire.AddExtents(v.need, v.st.Need, v.st.RegionSectors, h.cfg.RegionSectors, regions)
		reason = "resume after clean agent shutdown: no resync"
	case v.st.Session == c.session:
		wire.AddExtents(v.need, v.st.Need, v.st.RegionSectors, h.cfg.RegionSectors, regions)
		reason = "resync after unclean disconnect: the agent's dirty map and what was in flight"
	default:
		full, reason = true, "full resync: the agent restarted after an unclean disconnect, neither side can tell what changed"
	}
	if c.group {
		// A consistency group's source resynchronises it in its write
		// order and says when it is consistent (GROUP_STATE): reading
		// it here would put newer data beside older.
		v.need.Clear()
		full, reason = false, "consistency group: the source resynchronises"
		v.st.Synced = true
		// A new volume holds nothing until the source has copied it.
		v.st.GroupInconsistent = !c.groupConsistent || fresh
	}
	v.st.Group = c.group
	full, reason = c.csumPlan(v, full, fresh, v.reportedChanged, reason, sectors, regions)
	if full {
		v.need.AddRange(0, regions)
	}
	v.sectors = sectors
	v.syncTotal, v.syncDone = v.need.GetCardinality()+v.csum.need.GetCardinality(), 0
	v.waitingInitial = true
	v.st.Sectors = sectors
	v.st.RegionSectors = h.cfg.RegionSectors
	v.st.Session = c.session
	v.st.Clean = false
	v.st.Need = wire.ExtentsOf(v.need)
	v.st.Protecting = false
	if full {
		v.st.Synced = false
	}
	// Recorded before anything else happens, so that a crash from now on
	// is an unclean disconnect of this session.
	if err := saveState(h.cfg.Backend, v.vm.name, v.name, &v.st); err != nil {
		return err
	}
	v.reportedChanged = false // the resync is planned durably
	if v.storeErr != nil {
		v.log.Info("store error cleared", "was", v.storeErr)
		v.storeErr = nil
	}
	v.log.Info("protection starting", "reason", reason, "resync_regions", v.need.GetCardinality(), "id", v.id)
	if v.state != StateFailoverTest {
		h.setState(v, StateSyncing, reason)
	} else {
		v.reason = reason
	}
	return nil
}

// resize handles a protected volume reported with a new size; h.mu held.
func (c *hubConn) resize(v *hubVolume, sectors uint64) error {
	v.log.Warn("volume resized: full resync", "old_sectors", v.sectors, "new_sectors", sectors,
		"resync_bytes", sectors*wire.SectorSize)
	if err := c.submitLocked(journal.Record{Kind: journal.KindVolume, Volume: v.name, Size: int64(sectors) * wire.SectorSize}); err != nil {
		c.h.storeFailed(v, fmt.Errorf("resize: %w", err))
		return fmt.Errorf("volume %s: resize: %w", v.name, err)
	}
	regions := wire.RegionCount(sectors, c.h.cfg.RegionSectors)
	v.sectors = sectors
	v.need.Or(v.inRead)
	v.need.RemoveRange(regions, wire.MaxTrackedRegions)
	v.need.AddRange(0, regions)
	v.syncTotal, v.syncDone = regions, 0
	v.st.Sectors = sectors
	v.changed = true
	c.pending = true
	c.mustSave = true
	if v.state != StateFailoverTest {
		c.h.setState(v, StateSyncing, "full resync: size changed")
	}
	return nil
}

// changedInPlace resynchronises a mirrored volume whose data the agent
// reports changed on this connection (a table reload re-pointed it): by
// checksums when the replica is in sync and no other comparison is under
// way, by reading every region otherwise. Regions being read are read
// again: their data may predate the change. h.mu held.
func (c *hubConn) changedInPlace(v *hubVolume) {
	h := c.h
	regions := wire.RegionCount(v.sectors, h.cfg.RegionSectors)
	if !v.st.Synced || c.group || c.peerVersion < 2 || v.csum.busy() || !v.need.IsEmpty() {
		v.log.Warn("the agent reports the volume's data changed (a table reload): reading it in full", "bytes", v.sectors*wire.SectorSize)
		all := roaring.New()
		all.AddRange(0, regions)
		c.markNeed(v, all)
		return
	}
	csumAll(v, regions)
	v.stale.Or(v.inRead)
	v.syncTotal += regions
	v.changed = true
	c.mustSave = true
	c.pending = true
	v.log.Warn("the agent reports the volume's data changed (a table reload): comparing every region by checksum", "bytes", v.sectors*wire.SectorSize)
	if v.state == StateProtecting {
		h.setState(v, StateSyncing, "resync by checksums: the agent reports the volume's data changed (a table reload)")
	}
}

// mirrored returns the mirrored volume of id or a protocol error.
func (c *hubConn) mirrored(cmd wire.Cmd, id uint64) (*hubVolume, error) {
	v := c.byID[id]
	if v == nil {
		return nil, c.bad("%s: unknown volume id %d", cmd, id)
	}
	if !v.mirror {
		return nil, c.bad("%s: volume %q is not protected", cmd, v.name)
	}
	return v, nil
}

// nextSeq checks that sequence numbers increase.
func (c *hubConn) nextSeqOK(cmd wire.Cmd, seq uint64) error {
	if seq <= c.lastSeq {
		return c.bad("%s: sequence %d after %d", cmd, seq, c.lastSeq)
	}
	c.lastSeq = seq
	return nil
}

// dirtyMap adds the agent's dirty regions to what must be read.
func (c *hubConn) dirtyMap(m *wire.DirtyMap) error {
	h := c.h
	h.mu.Lock()
	defer h.mu.Unlock()
	if v := c.byID[m.Volume]; v != nil {
		if m.Initial && v.initialsOwed > 0 {
			v.initialsOwed--
		}
		if v.stopped {
			if !m.Initial || v.initialsOwed > 0 || !v.mirror || !v.waitingInitial {
				// Sent before the agent saw STOP_PROTECT: it is back
				// in its dirty bitmap.
				return c.nextSeqOK(m.Cmd(), m.Seq)
			}
			v.stopped = false // the answer to the latest START_PROTECT
		}
	}
	v, err := c.mirrored(m.Cmd(), m.Volume)
	if err != nil {
		return err
	}
	if err := c.nextSeqOK(m.Cmd(), m.Seq); err != nil {
		return err
	}
	if m.Initial != v.waitingInitial {
		return c.bad("%s: initial flag %v when %v was expected", m.Cmd(), m.Initial, v.waitingInitial)
	}
	if c.group && len(m.Extents) > 0 {
		return c.bad("%s: dirty regions from a consistency group, whose source resynchronises itself", m.Cmd())
	}
	limit := wire.RegionCount(v.sectors, m.RegionSectors)
	if n := len(m.Extents); n > 0 && m.Extents[n-1].Start+m.Extents[n-1].Count > limit {
		return c.bad("%s: extents beyond the %d regions of volume %q", m.Cmd(), limit, v.name)
	}
	add := roaring.New()
	wire.AddExtents(add, m.Extents, m.RegionSectors, h.cfg.RegionSectors, wire.RegionCount(v.sectors, h.cfg.RegionSectors))
	c.markNeed(v, add)
	v.waitingInitial = false
	if n := add.GetCardinality(); n > 0 {
		v.log.Info("dirty map received", "regions", n, "initial", m.Initial)
	}
	v.changed = true
	c.pending = true
	return nil
}

// markNeed adds regions to be read; regions being read are marked stale so
// they are read again. h.mu held.
func (c *hubConn) markNeed(v *hubVolume, add *roaring.Bitmap) {
	if add.IsEmpty() {
		return
	}
	inFlight := roaring.And(add, v.inRead)
	v.stale.Or(inFlight)
	add.AndNot(v.inRead)
	before := v.need.GetCardinality()
	v.need.Or(add)
	v.syncTotal += v.need.GetCardinality() - before + inFlight.GetCardinality()
	v.changed = true
	c.mustSave = true
	if v.state == StateProtecting {
		c.h.setState(v, StateSyncing, "resync of regions the agent could not mirror")
	}
}

// protectedWrite journals a mirrored write. A write into regions whose
// remote read is outstanding waits until the read's data is journaled and
// follows it, so the read never needs repeating.
func (c *hubConn) protectedWrite(m *wire.ProtectedWrite) error {
	h := c.h
	h.mu.Lock()
	if v := c.byID[m.Volume]; v != nil && v.stopped {
		// Sent before the agent saw STOP_PROTECT: it is back in its
		// dirty bitmap.
		err := c.nextSeqOK(m.Cmd(), m.Seq)
		h.mu.Unlock()
		return err
	}
	v, err := c.mirrored(m.Cmd(), m.Volume)
	if err == nil {
		err = c.nextSeqOK(m.Cmd(), m.Seq)
	}
	if err == nil && v.waitingInitial {
		err = c.bad("%s: write before the initial DIRTY_MAP of volume %q", m.Cmd(), v.name)
	}
	if err == nil && (m.Sector >= v.sectors || uint64(m.Sectors) > v.sectors-m.Sector) {
		err = c.bad("%s: %d sectors at %d outside volume %q of %d sectors", m.Cmd(), m.Sectors, m.Sector, v.name, v.sectors)
	}
	if err != nil {
		h.mu.Unlock()
		return err
	}
	v.applied = m.Seq
	var regions *roaring.Bitmap
	if m.Status != wire.StatusOK || m.Discard || !v.inRead.IsEmpty() || !v.held.IsEmpty() {
		// The common case, nothing being read, needs no bitmap.
		regions = roaring.New()
		wire.AddSectors(regions, m.Sector, uint64(m.Sectors), h.cfg.RegionSectors)
	}
	if m.Status != wire.StatusOK || m.Discard {
		// The source's content is unknown (failed write) or whatever
		// the target makes of a discard: read it back.
		c.markNeed(v, regions)
		h.mu.Unlock()
		return nil
	}
	n := int64(m.Sectors) * wire.SectorSize
	rec := journal.Record{Volume: v.name, Offset: int64(m.Sector) * wire.SectorSize, Seq: c.journalSeq(m.Seq), HasSeq: true}
	if m.Zeroes {
		rec.Kind, rec.Length = journal.KindZero, n
	} else {
		rec.Kind, rec.Data = journal.KindWrite, joinData(m.Data)
		v.appliedBytes += uint64(n)
	}
	if regions != nil && (regions.Intersects(v.inRead) || regions.Intersects(v.held)) {
		// Journaled after the read, without its sequence number (the
		// journal's sequence numbers increase; it lies inside the
		// resync set, where no consistent point is).
		rec.HasSeq = false
		rec.Data = bytes.Clone(rec.Data) // the frame's payload is reused
		c.deferred = append(c.deferred, deferredWrite{v: v, regions: regions, rec: rec, seq: m.Seq, epoch: v.epoch})
		v.held.Or(regions)
		h.mu.Unlock()
		return nil
	}
	if !c.vm.resync {
		// A resync planned since the last pump (a DIRTY_MAP handled in
		// the same batch of frames) opens its set before this write is
		// journaled: the write is newer than the regions' lost data, so
		// no point after it is consistent until they are read.
		if work, _ := c.resyncWork(); work {
			if err := c.openResyncSet(); err != nil {
				h.mu.Unlock()
				return err
			}
		}
	}
	h.mu.Unlock()
	if d := h.cfg.ApplyDelay; d > 0 {
		time.Sleep(d)
	}
	if c.arena != nil && rec.Kind == journal.KindWrite {
		// The journal writes the data from the frame's buffer, with
		// the batch's other writes (flushRefs).
		c.refRecs = append(c.refRecs, rec)
		if c.refBytes += len(rec.Data); c.refBytes >= refFlushBytes {
			return c.flushRefs(c.failStore)
		}
		return nil
	}
	return c.submit(rec)
}

// journalSeq maps an agent's sequence number to the journal's. The same
// agent process continues its numbering across connections; a restarted
// one starts again from 1, below the journal's last number, and its
// numbers are then shifted past it for the whole connection.
func (c *hubConn) journalSeq(seq uint64) uint64 {
	if !c.seqMapped {
		c.seqMapped = true
		if last := c.vm.j.LastSeq(); seq <= last {
			c.seqBase = last
			c.log.Info("agent sequence numbers restarted: journaled after the journal's", "agent_seq", seq, "journal_seq", last)
		}
	}
	return c.seqBase + seq
}

// joinData returns a frame's data as one slice.
func joinData(d [][]byte) []byte {
	if len(d) == 1 {
		return d[0]
	}
	var out []byte
	for _, b := range d {
		out = append(out, b...)
	}
	return out
}

// releaseDeferred journals the deferred writes, oldest first, whose
// regions are no longer being read; h.mu held. It returns them.
func (c *hubConn) releaseDeferred() []journal.Record {
	c.dropStaleDeferred()
	n := 0
	for n < len(c.deferred) && !c.deferred[n].regions.Intersects(c.deferred[n].v.inRead) {
		n++
	}
	if n == 0 {
		return nil
	}
	recs := make([]journal.Record, n)
	for i := range n {
		recs[i] = c.deferred[i].rec
	}
	c.deferred = c.deferred[n:]
	for _, v := range c.byID {
		v.held.Clear()
	}
	for _, d := range c.deferred {
		d.v.held.Or(d.regions)
	}
	return recs
}

// dropStaleDeferred drops the deferred writes of volumes that entered
// StateStoreError since (the agent keeps them as dirty); h.mu held.
func (c *hubConn) dropStaleDeferred() {
	stale := false
	for _, d := range c.deferred {
		stale = stale || d.epoch != d.v.epoch
	}
	if !stale {
		return
	}
	c.deferred = slices.DeleteFunc(c.deferred, func(d deferredWrite) bool { return d.epoch != d.v.epoch })
	for _, v := range c.byID {
		v.held.Clear()
	}
	for _, d := range c.deferred {
		d.v.held.Or(d.regions)
	}
}

// checkpointFrame journals a named checkpoint at this point of the write
// stream; inside an open resync set it waits for the set's end.
func (c *hubConn) checkpointFrame(m *wire.Checkpoint) error {
	if err := c.nextSeqOK(m.Cmd(), m.Seq); err != nil {
		return err
	}
	if m.Refused {
		return c.bad("%s with the refused flag from an agent", m.Cmd())
	}
	c.h.mu.Lock()
	if c.vm.j.HasCheckpoint(m.Name) || slices.Contains(c.ckpts, m.Name) {
		c.h.mu.Unlock()
		return c.refuseCheckpoint(m, "the name is already used in the VM's journal")
	}
	open := c.vm.resync || len(c.deferred) > 0 || len(c.ckpts) > 0 ||
		slices.ContainsFunc(c.sortedVolumes(), func(v *hubVolume) bool { return v.storeErr != nil && v.wantMirror })
	if open {
		c.ckpts = append(c.ckpts, m.Name)
		c.log.Warn("checkpoint during a resync: journaled when the resync set completes", "checkpoint", m.Name, "seq", m.Seq)
	}
	c.h.mu.Unlock()
	if open {
		return nil
	}
	err := c.submit(journal.Record{Kind: journal.KindCheckpoint, Checkpoint: m.Name})
	if errors.Is(err, journal.ErrInvalid) {
		return c.refuseCheckpoint(m, err.Error())
	}
	if err == nil {
		c.log.Info("checkpoint journaled", "checkpoint", m.Name, "seq", m.Seq)
	}
	return err
}

// refuse tells the agent why its HELLO is not accepted (REFUSED); the
// caller closes the connection.
func (c *hubConn) refuse(reason string) {
	if err := c.send(&wire.Refused{Reason: wire.Reason(reason)}); err != nil {
		c.log.Debug("refusal not sent", "err", err)
	}
}

// refuseCheckpoint tells the agent that its checkpoint m is refused and
// journals nothing for it. The refusal is sent before any WRITE_ACK that
// covers m (acks are queued only after this frame is handled), so the
// agent's caller learns of it; the connection stays up.
func (c *hubConn) refuseCheckpoint(m *wire.Checkpoint, why string) error {
	c.log.Warn("checkpoint refused", "checkpoint", m.Name, "seq", m.Seq, "reason", why)
	return c.send(&wire.Checkpoint{Seq: m.Seq, Name: m.Name, Refused: true})
}

// groupState records whether the consistency group's replicas are a
// prefix of its write order now that every frame before this one is
// applied.
func (c *hubConn) groupState(m *wire.GroupState) error {
	h := c.h
	h.mu.Lock()
	defer h.mu.Unlock()
	if !c.group {
		return c.bad("%s from an agent without the group flag", m.Cmd())
	}
	if err := c.nextSeqOK(m.Cmd(), m.Seq); err != nil {
		return err
	}
	c.groupConsistent = m.Consistent
	for _, v := range c.byID {
		if v.mirror && v.st.GroupInconsistent == m.Consistent {
			v.st.GroupInconsistent = !m.Consistent
			v.changed = true
		}
	}
	if !m.Consistent {
		// Volumes that are not reported (yet) belong to the group too.
		for _, v := range c.vm.vols {
			if v.st.Version != 0 && !v.st.GroupInconsistent {
				v.st.GroupInconsistent = true
				v.changed = true
			}
		}
	}
	c.log.Info("consistency group state", "consistent", m.Consistent, "seq", m.Seq)
	c.pending = true
	return nil
}

// remoteIORes journals a remote read's data inside the VM's resync set,
// then the mirrored writes that waited for it.
func (c *hubConn) remoteIORes(m *wire.RemoteIORes) error {
	h := c.h
	rq := c.reqs[m.ID]
	if rq == nil {
		return c.bad("%s: unknown request id %d", m.Cmd(), m.ID)
	}
	if rq.v.id != m.Volume || rq.sectors != m.Sectors || m.Written {
		return c.bad("%s: request %d was %d sectors of volume id %d, answer is %d sectors of %d",
			m.Cmd(), m.ID, rq.sectors, rq.v.id, m.Sectors, m.Volume)
	}
	delete(c.reqs, m.ID)
	v := rq.v
	h.mu.Lock()
	stale := rq.epoch != v.epoch
	h.mu.Unlock()
	if stale {
		// Sent before the volume's store failed: protection restarts
		// from the durable state, which still lists these regions.
		return nil
	}
	var recs []journal.Record
	if m.Status == wire.StatusOK {
		rec := journal.Record{Kind: journal.KindWrite, Volume: v.name, Offset: int64(rq.sector) * wire.SectorSize}
		if m.Zero {
			rec.Kind, rec.Length = journal.KindZero, int64(m.Sectors)*wire.SectorSize
		} else {
			rec.Data = joinData(m.Data)
		}
		recs = append(recs, rec)
	}
	h.mu.Lock()
	v.reads--
	v.inRead.RemoveRange(rq.first, rq.first+rq.count)
	recs = append(recs, c.releaseDeferred()...)
	if m.Status != wire.StatusOK {
		v.readErrors++
		v.log.Warn("remote read failed", "sector", rq.sector, "sectors", rq.sectors, "status", m.Status)
		v.need.AddRange(rq.first, rq.first+rq.count)
	} else {
		v.readErrors = 0
		v.changed = true
		c.pending = true
		v.remoteBytes += uint64(m.Sectors) * wire.SectorSize
		v.syncDone += rq.count
		// Regions discarded or failed while this read was out: read
		// them again.
		again := roaring.New()
		again.AddRange(rq.first, rq.first+rq.count)
		again.And(v.stale)
		v.stale.AndNot(again)
		v.need.Or(again)
	}
	h.mu.Unlock()
	if len(recs) == 0 {
		return nil
	}
	if err := c.submit(recs...); err != nil {
		return fmt.Errorf("volume %s: journal remote read: %w", v.name, err)
	}
	return nil
}

// maxReadsPerConn caps a connection's outstanding remote reads below the
// agent's concurrency, so that the agent never stops reading.
const maxReadsPerConn = 16

// sortedVolumes returns the connection's volumes by id; h.mu held.
func (c *hubConn) sortedVolumes() []*hubVolume {
	if c.sorted != nil {
		return c.sorted
	}
	vols := make([]*hubVolume, 0, len(c.byID))
	for _, v := range c.byID {
		vols = append(vols, v)
	}
	slices.SortFunc(vols, func(a, b *hubVolume) int { return int(a.id) - int(b.id) })
	c.sorted = vols
	return vols
}

// resyncWork reports whether the VM has resync work outstanding (regions
// to read or being read, writes deferred behind reads, a checksum
// comparison, a consistency group not yet consistent) and whether a volume
// still waits for its initial DIRTY_MAP; h.mu held.
func (c *hubConn) resyncWork() (work, waiting bool) {
	work = len(c.deferred) > 0
	mirrored := false
	for _, v := range c.byID {
		if v.storeErr != nil && v.wantMirror {
			// Its writes since the failure are missing from the
			// journal until it is resynchronised: no consistent point.
			work = true
			continue
		}
		if !v.mirror {
			continue
		}
		mirrored = true
		work = work || !v.need.IsEmpty() || !v.inRead.IsEmpty() || v.csum.busy()
		waiting = waiting || v.waitingInitial
	}
	if c.group && mirrored && !c.groupConsistent {
		work = true
	}
	return work, waiting
}

// openResyncSet journals the start of the VM's resync set; h.mu held, so
// that nothing is journaled between the decision and the record (Submit
// does not block on the store).
func (c *hubConn) openResyncSet() error {
	if err := c.submitLocked(journal.Record{Kind: journal.KindResyncBegin}); err != nil {
		return fmt.Errorf("journal resync mark: %w", err)
	}
	c.vm.resync = true
	c.vm.resyncEpoch++
	var bytes uint64
	for _, v := range c.byID {
		bytes += (v.need.GetCardinality() + v.inRead.GetCardinality()) * uint64(c.h.cfg.RegionSectors) * wire.SectorSize
	}
	c.log.Warn("resync set opened: the newest consistent point stays the one before it until it completes",
		"resync_bytes", bytes, "consistent_point", c.vm.j.Newest().Seq)
	return nil
}

// pump issues remote reads for syncing volumes and declares those that
// converged protected.
func (c *hubConn) pump() error {
	h := c.h
	h.mu.Lock()
	var reqs []*wire.RemoteIOReq
	vols := c.sortedVolumes()
	// The VM's resync set: opened when a resync is planned (here, or by
	// the first write journaled after it was planned), closed when every
	// region is journaled; until then the newest consistent point stays
	// the one before it.
	c.dropStaleDeferred()
	work, waiting := c.resyncWork()
	mirrored := slices.ContainsFunc(vols, func(v *hubVolume) bool { return v.mirror })
	// A broken journal takes no mark until it is reopened.
	broken := c.vm.j.Err() != nil || c.vm.j.ApplyErr() != nil
	var mark *journal.Record
	switch {
	case broken:
	case work && !c.vm.resync:
		if err := c.openResyncSet(); err != nil {
			h.mu.Unlock()
			return err
		}
	case !work && !waiting && c.vm.resync:
		mark = &journal.Record{Kind: journal.KindResyncEnd}
		c.vm.resync = false
		c.log.Info("resync set complete: a new consistent point")
	}
	if mark != nil {
		// Submitted under h.mu: nothing may slip between the decision
		// and the record. Submit does not block on the store.
		if err := c.submitLocked(*mark); err != nil {
			h.mu.Unlock()
			return fmt.Errorf("journal resync mark: %w", err)
		}
		if mark.Kind == journal.KindResyncEnd && len(c.ckpts) > 0 {
			for _, n := range c.ckpts {
				err := c.submitLocked(journal.Record{Kind: journal.KindCheckpoint, Checkpoint: n})
				if errors.Is(err, journal.ErrInvalid) {
					c.log.Warn("checkpoint refused", "checkpoint", n, "err", err)
				} else if err != nil {
					h.mu.Unlock()
					return fmt.Errorf("journal checkpoint: %w", err)
				}
			}
			c.ckpts = nil
		}
		if mark.Kind == journal.KindResyncEnd {
			// Protecting only once the set's end is durable: wake the
			// engine then.
			p := c.lastPending
			c.endPending = p
			go func() {
				select {
				case <-p.Done():
					c.poke()
				case <-c.done:
				}
			}()
		}
	}
	if c.endPending != nil {
		select {
		case <-c.endPending.Done():
			c.endPending = nil
		default:
		}
	}
	if !c.vm.resync && !waiting && mirrored && c.endPending == nil {
		c.vm.currentAt = time.Now()
	}
	var csumReqs []*csumReq
	for _, v := range vols {
		if !v.mirror || v.waitingInitial || v.state == StateFailoverTest {
			continue
		}
		if c.vm.resync {
			csumReqs = append(csumReqs, c.csumPump(v)...)
		}
		chunk := uint64(h.cfg.SyncChunkSectors / h.cfg.RegionSectors)
		cand := v.need
		if !v.held.IsEmpty() && !v.need.IsEmpty() {
			// A region a deferred write waits on is read only after
			// that write is journaled.
			cand = roaring.AndNot(v.need, v.held)
		}
		for v.reads < h.cfg.SyncWindow && len(c.reqs) < maxReadsPerConn && !cand.IsEmpty() && v.readErrors < 5 {
			first, count := nextRun(cand, v.cursor, chunk)
			if cand != v.need {
				cand.RemoveRange(first, first+count)
			}
			v.need.RemoveRange(first, first+count)
			v.inRead.AddRange(first, first+count)
			v.cursor = first + count
			v.reads++
			sector := first * uint64(h.cfg.RegionSectors)
			sectors := min(count*uint64(h.cfg.RegionSectors), v.sectors-sector)
			c.nextReq++
			rq := &readReq{v: v, first: first, count: count, sector: sector, sectors: uint32(sectors), epoch: v.epoch}
			c.reqs[c.nextReq] = rq
			reqs = append(reqs, &wire.RemoteIOReq{ID: c.nextReq, Volume: v.id, Sector: sector, Sectors: uint32(sectors)})
		}
		if v.readErrors >= 5 && v.state == StateSyncing && v.reads == 0 {
			if v.reason != "remote reads failing" {
				v.reason = "remote reads failing"
				v.log.Error("sync stalled: remote reads keep failing; retrying after the next reconnect")
			}
		}
		if v.state == StateSyncing && v.need.IsEmpty() && v.inRead.IsEmpty() && !v.csum.busy() && !c.vm.resync && c.endPending == nil {
			v.syncTotal, v.syncDone = 0, 0
			v.st.Synced = true
			v.changed = true
			c.pending = true
			h.setState(v, StateProtecting, "in sync")
		}
	}
	h.mu.Unlock()
	for _, r := range reqs {
		if err := c.write(r); err != nil {
			return err
		}
	}
	for _, rq := range csumReqs {
		if err := c.sendCsum(rq); err != nil {
			return err
		}
	}
	return nil
}

// nextRun returns the first run of set bits at or after cursor (wrapping
// to 0), at most max long; bm is not empty.
func nextRun(bm *roaring.Bitmap, cursor, maxLen uint64) (first, count uint64) {
	it := bm.Iterator()
	it.AdvanceIfNeeded(uint32(min(cursor, wire.MaxTrackedRegions-1)))
	if !it.HasNext() {
		it = bm.Iterator()
	}
	first = uint64(it.Next())
	count = 1
	for count < maxLen && it.HasNext() && uint64(it.PeekNext()) == first+count {
		it.Next()
		count++
	}
	return first, count
}

// checkpoint saves changed volume states once the journal holds
// everything submitted before (a region leaves the saved list of regions
// to read only when its data is durable), then queues the acknowledgement.
func (c *hubConn) checkpoint(ack bool) error {
	h := c.h
	type save struct {
		v      *hubVolume
		st     volState
		mirror bool
	}
	var saves []save
	h.mu.Lock()
	if err := c.vm.leaseErrLocked(); err != nil {
		// Another hub may hold the VM now: nothing of it is saved here.
		h.mu.Unlock()
		return err
	}
	for _, v := range c.byID {
		if v.storeErr != nil || !v.changed {
			continue
		}
		if v.mirror {
			need := v.need.Clone()
			need.Or(v.inRead)
			v.st.Need = wire.ExtentsOf(need)
			v.st.CsumNeed = nil
			if v.st.Seeded && v.csum.busy() {
				v.st.CsumNeed = wire.ExtentsOf(roaring.Or(v.csum.need, v.csum.in))
			}
			v.st.AppliedSeq = v.applied
			v.st.Protecting = v.state == StateProtecting
			v.st.FailoverTest = false
		}
		saves = append(saves, save{v: v, st: v.st, mirror: v.mirror})
		v.changed, v.wrote = false, false
	}
	h.mu.Unlock()
	if len(saves) > 0 && c.lastPending != nil {
		if _, err := c.lastPending.Wait(context.Background()); err != nil {
			// Nothing of this checkpoint is saved; the volumes stop
			// and the next checkpoint has none of them.
			c.failStore(err)
			return storeFault{fmt.Errorf("journal: %w", err)}
		}
	}
	var errs []error
	for _, s := range saves {
		if !s.mirror || s.st.Version == 0 {
			continue
		}
		if err := saveState(h.cfg.Backend, s.v.vm.name, s.v.name, &s.st); err != nil {
			h.mu.Lock()
			h.storeFailed(s.v, fmt.Errorf("save state: %w", err))
			h.mu.Unlock()
			errs = append(errs, fmt.Errorf("volume %s: save state: %w", s.v.name, err))
		}
	}
	if len(errs) > 0 {
		return storeFault{errors.Join(errs...)}
	}
	c.pending = false
	c.mustSave = false
	c.lastCkpt = time.Now()
	if ack {
		return c.queueAck()
	}
	return nil
}

// agentShutdown records a clean stop: every volume resumes without resync
// next time.
func (c *hubConn) agentShutdown() error {
	h := c.h
	h.mu.Lock()
	// Writes still waiting for a remote read are read again next time.
	for _, d := range c.deferred {
		d.v.need.Or(d.regions)
	}
	c.deferred = nil
	for _, v := range c.byID {
		v.held.Clear()
		if v.mirror && !v.waitingInitial {
			v.st.Clean = true
			v.changed = true
		}
	}
	h.mu.Unlock()
	c.pending = true
	if err := c.checkpoint(false); err != nil {
		return err
	}
	if c.lastPending != nil {
		if _, err := c.lastPending.Wait(context.Background()); err != nil {
			c.failStore(err)
			return fmt.Errorf("journal: %w", err)
		}
	}
	if c.lastSeq > 0 {
		if err := c.send(&wire.WriteAck{Seq: c.lastSeq}); err != nil {
			return err
		}
	}
	c.shutdown = true
	c.log.Info("agent shut down cleanly")
	return c.send(&wire.AgentShutdown{Reply: true})
}

// VolumeStatus is one recovery volume in the hub's status.
type VolumeStatus struct {
	Volume          string  `json:"volume"`
	State           string  `json:"state"`
	Reason          string  `json:"reason"`
	Sectors         uint64  `json:"sectors"`
	SyncTotalBytes  uint64  `json:"sync-total-bytes"` // of this sync pass
	SyncDoneBytes   uint64  `json:"sync-done-bytes"`
	SyncProgress    float64 `json:"sync-progress"`   // 0 to 1; 1 when protecting
	ResyncBytes     uint64  `json:"resync-bytes"`    // still to read from the source
	BacklogIOs      uint64  `json:"backlog-ios"`     // agent's unacknowledged writes
	BacklogBytes    uint64  `json:"backlog-bytes"`   // their bytes
	BacklogSeconds  float64 `json:"backlog-seconds"` // age of the oldest
	SyncMirroring   bool    `json:"sync-mirroring"`  // past fall-behind
	AppliedSeq      uint64  `json:"applied-sequence"`
	AppliedBytes    uint64  `json:"applied-bytes"`     // since the hub started
	RemoteReadBytes uint64  `json:"remote-read-bytes"` // since the hub started
	Replica         string  `json:"replica"`
	StoreError      string  `json:"store-error,omitempty"` // why the volume is in store-error
	StoreErrors     uint64  `json:"store-errors"`          // store failures since the hub started
	StoreRetries    uint64  `json:"store-retries"`         // failed attempts to leave store-error since the hub started
	// Checksum resync: bytes still to compare, and regions found equal
	// (not read) and different (read) since the hub started.
	CsumPendingBytes uint64 `json:"csum-pending-bytes"`
	CsumMatchedBytes uint64 `json:"csum-matched-bytes"`
	CsumDifferBytes  uint64 `json:"csum-differ-bytes"`
	// Online verify: runs and mismatching regions found since the hub
	// started, and the last run's result.
	VerifyRuns       uint64        `json:"verify-runs"`
	VerifyMismatches uint64        `json:"verify-mismatches"`
	LastVerify       *VolumeVerify `json:"last-verify,omitempty"`
}

// VMStatus is one VM in the hub's status.
type VMStatus struct {
	VM        string `json:"vm"`
	UUID      string `json:"uuid"`
	Connected bool   `json:"connected"`
	// Held: this hub holds the VM's journal (with a shared store, its
	// lease: it is the one hub that may write it); a hub on its own
	// store holds every VM.
	Held    bool           `json:"held"`
	Peer    string         `json:"peer,omitempty"`
	Volumes []VolumeStatus `json:"volumes"`
	// Group: the volumes are a consistency group (a group agent);
	// GroupConsistent: their replicas hold a prefix of its write order.
	Group           bool `json:"group,omitempty"`
	GroupConsistent bool `json:"group-consistent,omitempty"`
	// Journal is the VM's write journal: its newest consistent point
	// and the recovery window (nil before the VM's first connection).
	Journal *JournalStatus `json:"journal,omitempty"`
	// Promoted: repagent-hub promote made the recovery volumes the
	// sources; the agent is refused and nothing more is applied.
	Promoted bool `json:"promoted,omitempty"`
}

// JournalStatus is a VM's journal in the hub's status.
type JournalStatus struct {
	// ConsistentSeq and ConsistentTime name the newest consistent point:
	// all the VM's volumes after one prefix of the agent's write order.
	ConsistentSeq  uint64    `json:"consistent-seq"`
	ConsistentTime time.Time `json:"consistent-time"`
	// ConsistentAge is how far behind the source the newest consistent
	// point may be, in seconds: 0 while the journal is known to hold
	// every write of a connected agent; otherwise the time since the
	// point's write, or since the hub last knew the journal current,
	// whichever is later. It keeps growing while disconnected or
	// resyncing.
	ConsistentAge float64 `json:"consistent-age-seconds"`
	// Resyncing: a resync set is open; the consistent point stays the
	// one before it until every region is journaled.
	Resyncing bool `json:"resyncing"`
	// OldestSeq and OldestTime: the oldest recoverable point.
	OldestSeq  uint64    `json:"oldest-seq"`
	OldestTime time.Time `json:"oldest-time"`
	// Bytes is the journal's unapplied size; AppliedSeq the point the
	// replica images hold.
	Bytes       int64    `json:"bytes"`
	AppliedSeq  uint64   `json:"applied-seq"`
	Checkpoints []string `json:"checkpoints"`
	StoreError  string   `json:"store-error,omitempty"`
	// Records and Commits count the records made durable and the group
	// commits (one fdatasync each) since the hub started.
	Records uint64 `json:"records"`
	Commits uint64 `json:"commits"`
}

// journalStatus reports vm's journal; h.mu held.
func journalStatus(vm *hubVM, now time.Time) *JournalStatus {
	if vm.j == nil {
		return nil
	}
	st := vm.j.Stats()
	js := &JournalStatus{ConsistentSeq: st.Newest.Seq, ConsistentTime: st.Newest.Time, Resyncing: vm.resync || st.InResync,
		OldestSeq: st.Oldest.Seq, OldestTime: st.Oldest.Time, Bytes: st.Bytes, AppliedSeq: st.Applied.Seq, Checkpoints: []string{},
		Records: st.Appends, Commits: st.Fsyncs}
	for _, cp := range vm.j.Checkpoints() {
		js.Checkpoints = append(js.Checkpoints, cp.Name)
	}
	if err := errors.Join(st.Err, st.ApplyErr); err != nil {
		js.StoreError = err.Error()
	}
	current := vm.conn != nil && !js.Resyncing && js.StoreError == ""
	if current {
		for _, v := range vm.vols {
			if v.conn == vm.conn && v.mirror && (v.state != StateProtecting || len(v.conn.deferred) > 0) {
				current = false
			}
		}
	}
	if current && !vm.currentAt.IsZero() {
		vm.currentAt = now
	}
	since := st.Newest.Time
	if vm.currentAt.After(since) {
		since = vm.currentAt
	}
	if !since.IsZero() && !current {
		js.ConsistentAge = max(0, now.Sub(since).Seconds())
	}
	return js
}

// Status returns every VM and volume, sorted by name.
func (h *Hub) Status() []VMStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := []VMStatus{}
	for _, vm := range h.vms {
		s := VMStatus{VM: vm.name, UUID: formatUUID(vm.uuid), Connected: vm.conn != nil, Volumes: []VolumeStatus{},
			Held: !h.cfg.Shared || vm.j != nil && vm.leaseErrLocked() == nil}
		if s.Group = vm.isGroup(); s.Group {
			s.GroupConsistent = !vm.groupInconsistent()
		}
		if vm.conn != nil {
			s.Peer = vm.conn.nc.RemoteAddr().String()
		}
		s.Journal = journalStatus(vm, time.Now())
		s.Promoted = vm.promoted
		for _, v := range vm.vols {
			if !v.mirror && v.st.Version == 0 && v.storeErr == nil {
				continue // reported, never protected
			}
			rs := uint64(h.cfg.RegionSectors) * wire.SectorSize
			vs := VolumeStatus{Volume: v.name, State: v.state, Reason: v.reason, Sectors: v.sectors,
				SyncTotalBytes: v.syncTotal * rs, SyncDoneBytes: v.syncDone * rs,
				ResyncBytes: (v.need.GetCardinality() + v.inRead.GetCardinality()) * rs,
				BacklogIOs:  v.backlog.IOs, BacklogBytes: v.backlog.Bytes, BacklogSeconds: float64(v.backlog.AgeMillis) / 1000,
				SyncMirroring: v.backlog.Sync, AppliedSeq: v.applied, AppliedBytes: v.appliedBytes,
				StoreErrors: v.storeErrors, StoreRetries: v.storeRetries,
				RemoteReadBytes: v.remoteBytes, Replica: h.cfg.Backend.Replica(vm.name, v.name)}
			if v.storeErr != nil {
				vs.StoreError = v.storeErr.Error()
			}
			if v.csum.need != nil {
				vs.CsumPendingBytes = (v.csum.need.GetCardinality() + v.csum.in.GetCardinality()) * rs
			}
			vs.CsumMatchedBytes, vs.CsumDifferBytes = v.csum.matched*rs, v.csum.differ*rs
			vs.VerifyRuns, vs.VerifyMismatches, vs.LastVerify = v.verifyRuns, v.verifyMismatches, v.lastVerify
			if v.state == StateDisconnected && v.st.Version != 0 {
				need := uint64(0)
				for _, e := range v.st.Need {
					need += e.Count
				}
				vs.ResyncBytes = max(vs.ResyncBytes, need*rs)
			}
			switch {
			case v.state == StateProtecting:
				vs.SyncProgress = 1
			case v.syncTotal > 0:
				vs.SyncProgress = min(1, float64(v.syncDone)/float64(v.syncTotal))
			}
			s.Volumes = append(s.Volumes, vs)
		}
		slices.SortFunc(s.Volumes, func(a, b VolumeStatus) int { return strings.Compare(a.Volume, b.Volume) })
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b VMStatus) int { return strings.Compare(a.VM, b.VM) })
	return out
}

// formatUUID formats 32 hex digits as 8-4-4-4-12.
func formatUUID(h string) string {
	if len(h) != 32 {
		return h
	}
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
