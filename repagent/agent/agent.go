package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/vhostdm/vhostdm/internal/rawsock"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent/actlog"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// Device is what the agent wraps: vhost.Device, implemented by
// *mapper.Device. The wrapper Attach returns implements it too.
type Device interface {
	Submit(r *mapper.Request) error
	Size() uint64 // sectors
	ReadOnly() bool
	OnResize(fn func(oldSize, newSize uint64)) (cancel func())
}

// Config configures an Agent.
type Config struct {
	Hub string // host:port of the hub
	// Hubs, when set, are the hubs to try in turn (host:port each; Hub
	// is then ignored): several hubs sharing one store, each VM held by
	// one of them at a time. The agent stays with a hub while it can and
	// moves to the next on a connection failure or a refusal (another
	// hub holds the VM: the hub's REFUSED names wire.ReasonHeldElsewhere),
	// backing off from MinBackoff to MaxBackoff once per round of the list.
	Hubs []string
	VM   string // the VM's name (CheckName)
	UUID string // the VM's UUID, 8-4-4-4-12 hex digits; empty: all zero
	// TLS, when set, is used to dial (see TLSFiles.TLSConfig). Without it
	// the hub must be on a loopback address or Insecure set.
	TLS      *tls.Config
	Insecure bool
	// QueueBytes bounds the mirrored data not yet acknowledged by the hub;
	// past it writes wait for the hub to make room (RoomWait), and are
	// recorded in the dirty bitmap only if it does not. Default 64 MiB.
	QueueBytes int64
	// RegionSectors is the dirty bitmap's granularity, a power of two from
	// 8 to 1<<21. Default DefaultRegionSectors.
	RegionSectors uint32
	// Heartbeat is the interval of heartbeats; a hub silent for four of
	// them is taken as gone. Default 2 s.
	Heartbeat time.Duration
	// MinBackoff and MaxBackoff bound the delay between connection
	// attempts, doubling from one to the other. Defaults 100 ms and 10 s.
	MinBackoff, MaxBackoff time.Duration
	// RoomWait bounds how long a write that finds the queue (or its
	// volume's share of it) full waits for the connected hub to make
	// room before it goes to the dirty bitmap instead, for a resync to
	// re-read. Default wire.PeerTimeout(Heartbeat), the silence after
	// which the hub is taken as gone: the dirty bitmap holds writes only
	// while the hub is away or stalled.
	RoomWait time.Duration
	// PaceAge is the backlog age past which the completions of a
	// volume's writes wait for the hub (pacing), as past three quarters
	// of its share of the queue. Default 500 ms.
	PaceAge time.Duration
	// DrainTimeout bounds how long Close waits for the hub to acknowledge
	// the queue before AGENT_SHUTDOWN. Default 30 s.
	DrainTimeout time.Duration
	// MaxPayload bounds received frames. Default DefaultMaxPayload.
	MaxPayload uint32
	Logger     *slog.Logger
	// Group makes the protected volumes one consistency group fed by
	// MirrorWrite in the source's write order (a replication log's site
	// link): the hub applies them in that order and reads nothing; the
	// source resynchronises and reports the group's state with
	// SetConsistent. Writes the hub did not acknowledge before a
	// disconnect are not put into the dirty bitmaps: MirrorWrite and Sync
	// fail until Sync has reported the loss.
	Group bool
	// ActivityLog, when its Path is set, keeps the hot extents of the
	// protected volumes on disk (not for a Group), so that after a crash
	// only those are resynchronised.
	ActivityLog ActivityLog

	// Dial, when set, replaces the TCP dialer (TLS is still layered on
	// top); tests use it to cut and restore the link.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
}

// FallBehind is a volume's fall-behind threshold, as dm-replicator's site
// links have: past any non-zero limit the volume mirrors synchronously
// until its backlog is back under all of them.
type FallBehind struct {
	IOs   uint64 // unacknowledged mirrored writes
	Bytes uint64 // their bytes
	// Timeout bounds the age of the oldest unacknowledged write, the
	// RPO: past it, or once that age plus the time the hub needs to
	// acknowledge the backlog (its bytes at the hub's recent rate)
	// would pass it, the volume mirrors synchronously, until the two
	// add up to at most half of it. (The writes queued before the
	// switch still drain at the hub's pace: a switch on age alone lets
	// the RPO grow past the threshold by the whole backlog's drain
	// time.)
	Timeout time.Duration
}

// IsZero reports whether no threshold is set: mirroring stays asynchronous.
func (f FallBehind) IsZero() bool { return f.IOs == 0 && f.Bytes == 0 && f.Timeout == 0 }

// VolumeOptions are a volume's replication settings.
type VolumeOptions struct {
	Protect          bool // mirror writes to the hub
	FallBehind       FallBehind
	AllowRemoteWrite bool // the hub may write with REMOTE_IO_REQ
	// OnHubLoss is what happens to the guest's writes while the hub is
	// away and the volume is past its fall-behind threshold (counting
	// its dirty map): OnHubLossContinue (the default) records them in
	// the dirty map, OnHubLossSuspend holds their completion until the
	// hub is back and has acknowledged them. Either is logged at WARN.
	OnHubLoss OnHubLoss
	// Backing, when set, says what a protected volume maps (its
	// mapper device's Backing). With an activity log the agent keeps it
	// across restarts and reports a volume whose backing changed behind
	// its back to the hub as changed: the hub resynchronises it by
	// checksums (see backing.go).
	Backing func() (mapper.Backing, error)
	// Reloads, when set with Backing, registers fn to be called when
	// the volume's device makes a new table live (its mapper device's
	// OnReload; fn may be called with the device's locks held and only
	// starts work of its own). A table that maps other storage, or maps
	// it otherwise, marks the volume changed: the hub re-reads it.
	Reloads func(fn func()) (cancel func())
	// MarkBacking and ChangedSince, when set with Backing, mark the
	// storage of the volume's backends that the agent cannot look at as
	// files (rbd: images: a snapshot) when the daemon stops writing it,
	// and compare it with the mark at the next attach (its mapper
	// device's MarkBacking and ChangedSince).
	MarkBacking  func(tag string) ([]mapper.BackingMark, error)
	ChangedSince func([]mapper.BackingMark) (string, error)
}

// OnHubLoss is a volume's policy for writes past its fall-behind
// threshold while the hub is away (dm-replicator's and DRBD's fencing).
type OnHubLoss string

// The OnHubLoss policies.
const (
	OnHubLossContinue OnHubLoss = "continue"
	OnHubLossSuspend  OnHubLoss = "suspend"
)

// Agent runs inside vhostdm: it reports volumes to the hub, mirrors the
// writes of protected ones, and serves the hub's remote IO.
//
// A volume is wrapped with Attach before it is exported; the wrapper's
// Submit performs the local I/O, then queues a copy of written data
// (asynchronous mirroring: the guest's write completes with the local
// one). When the queue is full the write waits for the hub to make room;
// while the hub is away (or makes no room for Config.RoomWait), the
// written regions go into the volume's dirty bitmap instead and reach the
// hub as DIRTY_MAP.
// Past the volume's fall-behind threshold, writes complete only once the
// hub has acknowledged them.
//
// Its methods may be called from any goroutine.
type Agent struct {
	// Immutable.
	cfg     Config
	log     *slog.Logger
	session uint64
	uuid    [16]byte

	mu   sync.Mutex
	cond *sync.Cond // queue, acknowledgements, connection state
	// sendCond is where the sender sleeps (senderIdle counts it): a
	// write wakes only the sender, never the writers waiting on cond.
	sendCond   *sync.Cond
	senderIdle int
	lastQueued time.Time // when the last guest write was queued
	vols       map[string]*agentVolume
	order      []string                // attach order, for reports
	nProtect   int64                   // attached volumes with Protect: the queue's shares
	byID       map[uint64]*agentVolume // ids of the current connection
	conn       *agentConn              // nil while disconnected
	hubs       []string                // the hubs' addresses (Reconnect changes them)
	hubAt      int                     // the one connected or tried next
	tls        *tls.Config             // and its TLS configuration
	queue      []*qitem                // to send, in sequence order
	queueBytes int64                   // data of unacknowledged writes
	nextSeq    uint64
	acked      uint64
	reported   bool // the current connection has the current volume list
	connects   int
	hubLevel   uint16 // the protocol level of the connected hub's HELLO
	consistent bool   // Group: the source's last SetConsistent
	lost       bool   // Group: unacknowledged writes died with a connection
	dmWanted   bool   // a mirrored volume overflowed: send its dirty map now
	stopped    bool   // Abort: held writes stop waiting
	// ckpts: the sequence numbers of checkpoints whose Checkpoint call
	// waits, true once the hub refused it.
	ckpts map[uint64]bool
	// refusal: why the hub refused the last HELLO (REFUSED), "" once
	// connected.
	refusal string

	// The sender's batching (see sendReady): the queue's data bytes, whether
	// it holds a frame that must go out at once, the last sequence number
	// handed to the socket, and the timer that bounds how long a small
	// batch is held.
	queuedB int64
	urgent  bool
	sentSeq uint64
	// takenSeq is the last sequence number the sender took off the queue
	// (sentSeq follows once it is encoded): batching waits while frames
	// up to it are unacknowledged.
	takenSeq  uint64
	holdTimer *time.Timer
	holdArmed bool

	runMu   sync.Mutex
	cancel  context.CancelFunc
	runDone chan struct{}

	// The activity log; nil without one. Immutable after New but for
	// alRec (a.mu) and alLost.
	al      *actlog.Log
	alPath  string
	alVols  map[string]int // log volume index by name
	alSizes []uint64
	alRec   map[string]actlog.VolumeRecovery // not yet given to an Attach
	alLost  atomic.Bool
	alSpan  uint64 // the most bytes one write may span in the log (half of al-extents)

	// The protected volumes' backings (backing.go), tracked with the
	// activity log; guarded by backMu, which is never held while taking
	// a.mu. backPath is "" when not tracked and immutable after New.
	backMu    sync.Mutex
	backPath  string
	backCheck *BackingCheck
	backNow   map[string]*backingVolume // what the next start compares with
	backSeen  map[string]bool           // attached in this run
	backMark  map[string]markFunc       // VolumeOptions.MarkBacking of the volumes attached in this run
	backDone  bool                      // RecordStop saved the last record

	bufs bufPool // mirrored data buffers

	// ring holds the frames of mirrored writes, preallocated: the frame
	// of sequence number s lives in ring[s&ringMask] (a.mu). Its length
	// is the credit window: a write whose slot is still held by a frame
	// the hub has not acknowledged waits for the hub (pacing), so the
	// guest's path allocates nothing for its frame.
	ring     []qitem
	ringMask uint64
}

// bufPool keeps the buffers of mirrored data by power-of-two size class
// for reuse, up to limit bytes of free buffers: unlike a sync.Pool it is
// not emptied by the garbage collector, so the steady state allocates
// nothing and the buffers' memory stays mapped (on some hypervisors the
// first touch of fresh memory costs more than the copy itself). It is
// split into shards, each with its own lock, taken in turn: the guest's
// writers (many at once) and the sender do not queue on one lock.
type bufPool struct {
	shards [poolShards]poolShard
	next   atomic.Uint32 // the shard tried first, round robin
	bytes  atomic.Int64  // free bytes in all shards
	limit  int64
}

// poolShard is one shard of a bufPool.
type poolShard struct {
	mu   sync.Mutex
	free [maxPoolClass + 1][][]byte
	// n[c] is len(free[c]), written under mu and read without it: a
	// getter skips a shard with nothing of its class without taking its
	// lock: the sender gives a whole batch's buffers back to one shard,
	// and a getter locked every empty shard on its way to it (a third
	// of getBuf's CPU in BenchmarkGuestWrite's 4 KiB QD32 sink row).
	n [maxPoolClass + 1]atomic.Int32
	_ [64]byte // a cache line of its own
}

// poolShards is the number of shards of a bufPool.
const poolShards = 8

// maxPoolClass is the largest pooled buffer, 2^maxPoolClass bytes.
const maxPoolClass = 22

// minRing and maxRing bound the ring of write frames (the credit window):
// one slot per 4 KiB of the queue, a power of two. With the default 64 MiB
// queue the window holds as many 4 KiB writes as the queue: below that
// (8192 slots, 32 MiB) random 4 KiB writes waited for credit during the
// hub's slower fdatasyncs with the queue half empty (248 bytes a slot).
const (
	minRing = 256
	maxRing = 16384
)

// frames returns how many PROTECTED_WRITE frames a write of sectors takes.
func frames(op mapper.Op, sectors uint64) uint64 {
	per := uint64(^uint32(0))
	if op == mapper.OpWrite {
		per = wire.MaxIOSectors
	}
	return max((sectors+per-1)/per, 1)
}

// slotsFree reports whether the ring slots of the next n sequence numbers
// are free; a.mu held.
func (a *Agent) slotsFree(n uint64) bool {
	for s := a.nextSeq; s < a.nextSeq+n; s++ {
		if a.ring[s&a.ringMask].busy {
			return false
		}
	}
	return true
}

// writeItem returns the item for the write frame of sequence number seq:
// its ring slot, or (a group agent's MirrorWrite, which does not wait for
// credit) a new item when the slot is busy; a.mu held.
func (a *Agent) writeItem(seq uint64) *qitem {
	it := &a.ring[seq&a.ringMask]
	if it.busy {
		return &qitem{}
	}
	*it = qitem{inRing: true, busy: true}
	return it
}

// getBuf returns a buffer of n bytes, pooled for sizes up to 4 MiB.
func (a *Agent) getBuf(n int) []byte {
	c := bits.Len(uint(max(n, 1) - 1))
	if c > maxPoolClass {
		return make([]byte, n)
	}
	p := &a.bufs
	if p.bytes.Load() > 0 {
		first := p.next.Add(1)
		for i := range uint32(poolShards) {
			sh := &p.shards[(first+i)%poolShards]
			if sh.n[c].Load() == 0 {
				continue
			}
			sh.mu.Lock()
			if k := len(sh.free[c]); k > 0 {
				b := sh.free[c][k-1]
				sh.free[c][k-1] = nil
				sh.free[c] = sh.free[c][:k-1]
				sh.n[c].Store(int32(k - 1))
				sh.mu.Unlock()
				p.bytes.Add(-int64(cap(b)))
				return b[:n]
			}
			sh.mu.Unlock()
		}
	}
	return make([]byte, n, 1<<c)
}

// putBufs gives buffers from getBuf back to the pool.
func (a *Agent) putBufs(bs [][]byte) {
	if len(bs) == 0 {
		return
	}
	p := &a.bufs
	sh := &p.shards[p.next.Add(1)%poolShards]
	sh.mu.Lock()
	for _, b := range bs {
		c := bits.Len(uint(max(cap(b), 1) - 1))
		if c > maxPoolClass || cap(b) != 1<<c {
			continue
		}
		if p.bytes.Add(int64(cap(b))) <= max(p.limit, 1<<c) {
			sh.free[c] = append(sh.free[c], b[:0])
			sh.n[c].Store(int32(len(sh.free[c])))
		} else {
			p.bytes.Add(-int64(cap(b)))
		}
	}
	sh.mu.Unlock()
}

// qitem is a queued frame: a mirrored write or a dirty map.
type qitem struct {
	seq   uint64
	vol   *agentVolume
	msg   wire.Message
	bytes int64     // mirrored data bytes
	write bool      // a ProtectedWrite (counts in the backlog)
	t     time.Time // when queued
	// What the hub lacks if this is not acknowledged.
	sector, sectors uint64
	extents         []wire.Extent
	done            chan struct{} // closed on ack or disconnect; sync mode only
	alFull          bool          // the DIRTY_MAP that ends a full resync the activity log asked for
	changed         bool          // a DIRTY_MAP whose acknowledgement ends the volume's change (agentVolume.changed)
	// A PROTECTED_WRITE's frame lives in its item (msg points at pw):
	// one allocation per write besides the pooled data buffer.
	pw  wire.ProtectedWrite
	one [1][]byte
	buf []byte // the pooled data buffer, on the write's last frame
	// inRing: the item is a slot of Agent.ring, busy while queued or
	// unacknowledged.
	inRing, busy bool
}

// agentVolume is an attached volume; it implements Device.
type agentVolume struct {
	// Immutable.
	a    *Agent
	name string
	dev  Device
	opts VolumeOptions
	log  *slog.Logger
	rl   rangeLock

	// Guarded by a.mu.
	id       uint64 // assigned by START_PROTECT on the current connection
	mirror   bool   // the hub asked for mirroring on this connection
	detached bool
	dirty    *roaring.Bitmap
	pending  []*qitem // unacknowledged, in sequence order (pend)
	pendArr  []*qitem // pending's array, whose head ack frees
	pendIOs  int
	pendB    int64
	sync     bool
	stats    VolumeStats
	// The hub's recent acknowledgement rate of this volume's bytes
	// (drainTime): bytes acknowledged since rateFrom, and the rate of
	// the last full window (0: none measured yet).
	ackedB   int64
	rateFrom time.Time
	ackRate  float64 // bytes per second
	cancel   func()
	alVol    int        // index in the activity log; -1: not logged
	alFull   bool       // the activity log asks for a full resync, not yet sent
	resync   ResyncInfo // why the agent last asked for a resync
	// changed is why the volume's backing changed behind the agent's
	// back ("" if not): reported to the hub (CHANGED) until it has
	// acknowledged a DIRTY_MAP queued after such a report (sequence
	// number changedAfter or later; see backing.go); changedMap marks
	// the next DIRTY_MAP as one.
	changed      string
	changedMap   bool
	changedAfter uint64
	cancelReload func() // stops Reloads' calls; nil without
	// changedAgain: v changed again (a table reload) since a report
	// said so: the next report says it again; changedMark: that report
	// is out while v mirrors, and a DIRTY_MAP after it is to be queued.
	changedAgain, changedMark bool
	// dirtySince is when the oldest region of the dirty bitmap became
	// dirty (zero when empty), dirtyReason why the first one did.
	dirtySince  time.Time
	dirtyReason string
	overflowing bool   // writes overflow the queue (logged once per episode)
	ovWrites    uint64 // written to the dirty bitmap in this episode
	ovBytes     uint64
	awayIOs     uint64 // writes dirtied since mirroring last stopped
	awayWarned  bool   // the on-hub-loss policy was logged for this outage
	// Pacing (see pace): an episode starts when the backlog passes the
	// high-water mark (or PaceAge) and ends, releasing every writer
	// it holds at once, when an acknowledgement brings the backlog
	// down to the low-water mark lw (and under PaceAge).
	room      *sync.Cond // on a.mu: paced writers wait here
	pacing    bool       // an episode is on: every write's completion waits
	paceGen   uint64     // episodes ended: a paced writer waits for it to change
	paced     int        // writers waiting on room
	lw        int64      // the low-water mark that ends the episode
	paceWakes uint64     // times a paced writer woke (tests: no spurious wake-ups)
}

// VolumeStats counts what the agent did for a volume.
type VolumeStats struct {
	Mirrored        uint64 // writes queued to the hub
	Dirtied         uint64 // writes recorded in the dirty bitmap instead
	DirtyMapRegions uint64 // regions sent in DIRTY_MAP frames
	SyncWrites      uint64 // writes that waited for the hub (fall-behind)
	SyncEntered     uint64 // times the volume switched to synchronous mirroring
	RemoteReads     uint64 // REMOTE_IO_REQ reads served
	RemoteBytes     uint64 // bytes they returned
	Overflows       uint64 // times the queue (or the volume's share) overflowed
	Suspended       uint64 // writes held while the hub was away (on-hub-loss = suspend)
	Paced           uint64 // writes whose completion waited under the high-water mark
	ResyncRequests  uint64 // non-empty DIRTY_MAPs sent
	ResyncBytes     uint64 // the bytes of their regions
	CsumRegions     uint64 // regions hashed for the hub's verify or checksum resync (CSUM_REQ)
	CsumBytes       uint64 // bytes read to hash them
}

// VolumeStatus is one volume in Status.
type VolumeStatus struct {
	Name         string
	ID           uint64
	Protect      bool
	Mirroring    bool // the hub has started protection on this connection
	Sync         bool // mirroring synchronously (past fall-behind)
	BacklogIOs   int
	BacklogBytes int64
	BacklogAge   time.Duration // age of the oldest unacknowledged write; 0 without one
	DirtyRegions uint64
	// Resync says why the agent last asked the hub for a resync of the
	// volume (after a crash, an overflow, a disconnect) and how many
	// bytes it covered; Stats.RemoteBytes counts what the hub read.
	Resync ResyncInfo
	// RPO is the age of the oldest write acknowledged to the guest that
	// the hub has not acknowledged (mirrored, or in the dirty map,
	// whether or not the hub is connected); 0 when it has all of them.
	RPO time.Duration
	// DirtyAge is the age of the oldest region in the dirty bitmap: a
	// region the hub has not been told about yet; 0 when empty.
	DirtyAge time.Duration
	Stats    VolumeStats
}

// Status is a snapshot of the agent.
type Status struct {
	Connected bool
	Connects  int    // connections made so far
	Acked     uint64 // highest sequence number the hub acknowledged
	Session   uint64 // the session number in HELLO
	// RPO is the largest of the volumes' RPO: the age of the oldest
	// write acknowledged to the guest that the hub has not acknowledged.
	RPO time.Duration
	// ActivityLog is the activity log's state; nil without one.
	ActivityLog *ActivityLogStatus
	Volumes     []VolumeStatus
	// Refused says why the hub refused the last connection attempt
	// (REFUSED), "" once connected.
	Refused string
	// Hub is the address of the hub connected, or tried next.
	Hub string
}

// ActivityLogStatus is the activity log in Status.
type ActivityLogStatus struct {
	Path string
	// Lost is true after the log failed: a crash resyncs in full.
	Lost bool
	actlog.Stats
}

// New checks cfg and returns an agent; Run connects it.
func New(cfg Config) (*Agent, error) {
	if err := wire.CheckName(cfg.VM); err != nil {
		return nil, fmt.Errorf("repagent: vm name %q: %w", cfg.VM, err)
	}
	if len(cfg.Hubs) == 0 && cfg.Hub != "" {
		cfg.Hubs = []string{cfg.Hub}
	}
	if err := checkHubs(cfg.Hubs, cfg.TLS, cfg.Insecure); err != nil {
		return nil, err
	}
	cfg.Hubs = slices.Clone(cfg.Hubs)
	cfg.Hub = cfg.Hubs[0]
	uuid, err := wire.ParseUUID(cfg.UUID)
	if err != nil {
		return nil, fmt.Errorf("repagent: uuid %q: %w", cfg.UUID, err)
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = 64 << 20
	}
	if cfg.RegionSectors == 0 {
		cfg.RegionSectors = wire.DefaultRegionSectors
	}
	if rs := cfg.RegionSectors; rs < 8 || rs > 1<<21 || rs&(rs-1) != 0 {
		return nil, fmt.Errorf("repagent: region size %d sectors: must be a power of two from 8 to %d", rs, 1<<21)
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 2 * time.Second
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(10*time.Second, cfg.MinBackoff)
	}
	if cfg.RoomWait <= 0 {
		cfg.RoomWait = wire.PeerTimeout(cfg.Heartbeat)
	}
	if cfg.PaceAge <= 0 {
		cfg.PaceAge = 500 * time.Millisecond
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	var sb [8]byte
	rand.Read(sb[:])
	a := &Agent{cfg: cfg, uuid: uuid, session: binary.LittleEndian.Uint64(sb[:]) | 1,
		log:  cfg.Logger.With("component", "repagent", "vm", cfg.VM, "peer", cfg.Hub),
		vols: map[string]*agentVolume{}, byID: map[uint64]*agentVolume{}, nextSeq: 1,
		hubs: cfg.Hubs, tls: cfg.TLS}
	a.cond = sync.NewCond(&a.mu)
	a.sendCond = sync.NewCond(&a.mu)
	a.holdTimer = time.AfterFunc(time.Hour, a.holdExpired)
	a.holdTimer.Stop()
	a.bufs.limit = cfg.QueueBytes
	n := uint64(minRing)
	for n < maxRing && int64(n)*4096 < cfg.QueueBytes {
		n *= 2
	}
	a.ring, a.ringMask = make([]qitem, n), n-1
	if cfg.ActivityLog.Path != "" && !cfg.Group {
		if err := a.openActivityLog(cfg.ActivityLog); err != nil {
			return nil, fmt.Errorf("repagent: %w", err)
		}
		for _, v := range cfg.ActivityLog.Volumes {
			a.alSizes = append(a.alSizes, v.Size)
		}
		a.alSpan = uint64(max(a.al.Stats().Capacity/2, 1)) * a.al.ExtentSize()
		a.openBacking(cfg.ActivityLog.Path, cfg.ActivityLog.Backing)
	}
	return a, nil
}

// Reconnect makes the agent reach its hub at hub, with tlsConf (nil:
// plain TCP, allowed off loopback only with insecure), from now on: the
// current connection, if any, is closed, and the next one uses the new
// settings (a rotated certificate, a moved hub). Mirrored writes that
// were not acknowledged are resynchronised as after a link cut. The VM's
// identity and the queue stay as configured.
func (a *Agent) Reconnect(hubs []string, tlsConf *tls.Config, insecure bool) error {
	if err := checkHubs(hubs, tlsConf, insecure); err != nil {
		return err
	}
	a.mu.Lock()
	a.hubs, a.hubAt, a.tls = slices.Clone(hubs), 0, tlsConf
	c := a.conn
	a.mu.Unlock()
	a.log.Info("hub settings changed: reconnecting", "hubs", strings.Join(hubs, ","), "tls", tlsConf != nil)
	if c != nil {
		c.shut()
	}
	return nil
}

// checkHubs checks a list of hub addresses.
func checkHubs(hubs []string, tlsConf *tls.Config, insecure bool) error {
	if len(hubs) == 0 {
		return errors.New("repagent: no hub address")
	}
	for _, h := range hubs {
		if h == "" {
			return errors.New("repagent: an empty hub address")
		}
		if tlsConf == nil {
			if err := wire.CheckPlain(h, insecure); err != nil {
				return fmt.Errorf("repagent: hub %w", err)
			}
		}
	}
	return nil
}

// Attach reports dev to the hub as volume name and returns the device to
// export in its place. With o.Protect its writes are mirrored. Attach may
// be called before or after Run.
func (a *Agent) Attach(name string, dev Device, o VolumeOptions) (Device, error) {
	if err := wire.CheckName(name); err != nil {
		return nil, fmt.Errorf("repagent: volume name %q: %w", name, err)
	}
	if wire.RegionCount(dev.Size(), a.cfg.RegionSectors) > wire.MaxTrackedRegions {
		return nil, fmt.Errorf("repagent: volume %q: %d sectors is too large to track", name, dev.Size())
	}
	a.mu.Lock()
	_, dup := a.vols[name]
	a.mu.Unlock()
	if dup {
		return nil, fmt.Errorf("repagent: volume %q already attached", name)
	}
	// Before the volume's first write: what it maps now, compared with
	// what the agent served under this name before.
	changed, err := a.backingAttach(name, o)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, dup := a.vols[name]; dup {
		return nil, fmt.Errorf("repagent: volume %q already attached", name)
	}
	v := &agentVolume{a: a, name: name, dev: dev, opts: o, dirty: roaring.New(),
		log: a.log.With("volume", name), changed: changed}
	if changed != "" {
		v.log.Warn("the volume's backing changed behind the agent's back: the hub will resynchronise it", "why", changed)
	}
	v.rl.init()
	v.room = sync.NewCond(&a.mu)
	a.attachActivity(v)
	if a.backPath != "" && o.Protect && o.Backing != nil && o.Reloads != nil {
		v.cancelReload = o.Reloads(func() { go a.backingReloaded(v) })
	}
	v.cancel = dev.OnResize(func(_, _ uint64) {
		a.mu.Lock()
		a.reported = false
		a.broadcast()
		a.mu.Unlock()
	})
	a.vols[name] = v
	if o.Protect {
		a.nProtect++
	}
	a.order = append(a.order, name)
	a.reported = false
	if a.cfg.Group {
		// Not in the group's consistent state until the source says
		// so (after it has copied the volume).
		a.consistent = false
	}
	a.broadcast()
	return v, nil
}

// Detach forgets volume name (its export is gone); the hub hears of it
// with the next report.
func (a *Agent) Detach(name string) {
	if a.detach(name) {
		// Nothing of this agent writes the volume's files any more.
		a.backingStopped(name)
	}
}

// detach is Detach but for the backing record; it reports whether a
// protected volume went.
func (a *Agent) detach(name string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.vols[name]
	if !ok {
		return false
	}
	v.detached = true
	v.mirror = false
	a.endPacing(v)
	if v.id != 0 {
		delete(a.byID, v.id)
	}
	delete(a.vols, name)
	if v.opts.Protect {
		a.nProtect--
	}
	for i, n := range a.order {
		if n == name {
			a.order = append(a.order[:i], a.order[i+1:]...)
			break
		}
	}
	if v.cancel != nil {
		v.cancel()
	}
	if v.cancelReload != nil {
		v.cancelReload()
	}
	a.reported = false
	a.broadcast()
	return v.opts.Protect
}

// Status returns a snapshot of the agent and its volumes.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := Status{Connected: a.conn != nil, Connects: a.connects, Acked: a.acked, Session: a.session, Refused: a.refusal, Hub: a.hubs[a.hubAt]}
	if a.al != nil {
		s.ActivityLog = &ActivityLogStatus{Path: a.alPath, Lost: a.alLost.Load(), Stats: a.al.Stats()}
	}
	now := time.Now()
	for _, n := range a.order {
		v := a.vols[n]
		var age, rpo time.Duration
		if t := v.oldest(); !t.IsZero() {
			age = now.Sub(t)
		}
		if t := v.rpoSince(); !t.IsZero() {
			rpo = now.Sub(t)
		}
		s.Volumes = append(s.Volumes, VolumeStatus{Name: n, ID: v.id, Protect: v.opts.Protect,
			Mirroring: v.mirror, Sync: v.sync, BacklogIOs: v.pendIOs, BacklogBytes: v.pendB, BacklogAge: age,
			DirtyRegions: v.dirty.GetCardinality(), Resync: v.resync, RPO: rpo, DirtyAge: v.dirtyAge(now), Stats: v.stats})
		s.RPO = max(s.RPO, rpo)
	}
	return s
}

// Submit implements Device: the local I/O, then for protected volumes the
// mirror of what it changed.
func (v *agentVolume) Submit(r *mapper.Request) error {
	if !r.Op.IsWrite() || !v.opts.Protect {
		return v.dev.Submit(r)
	}
	if span := v.a.alSpan; v.alVol >= 0 && span > 0 && r.Bytes() > span {
		return v.submitSplit(r, span)
	}
	return v.submitOne(r)
}

// submitSplit submits a write larger than the activity log can admit at
// once (a long discard, or a large write with a small log) as pieces
// aligned to span bytes, one after the other; it stops at the first error.
func (v *agentVolume) submitSplit(r *mapper.Request, span uint64) error {
	spanSec := span / wire.SectorSize
	for off := uint64(0); off < r.Sectors; {
		sec := r.Sector + off
		n := min(r.Sectors-off, (sec/spanSec+1)*spanSec-sec)
		p := &mapper.Request{Op: r.Op, Sector: sec, Sectors: n, Unmap: r.Unmap, FUA: r.FUA}
		if r.Data != nil {
			p.Data = mapper.SliceBufs(nil, r.Data, int(off*wire.SectorSize), int(n*wire.SectorSize))
		}
		if err := v.submitOne(p); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// submitOne performs a protected write and mirrors it.
func (v *agentVolume) submitOne(r *mapper.Request) error {
	// Recorded in the activity log before the write may change anything.
	tok, logged := v.a.alBegin(v, r.Sector, r.Sectors)
	// Overlapping writes are ordered: the local order is the mirror order.
	v.rl.lock(r.Sector, r.Sectors)
	err := v.dev.Submit(r)
	seq, dirty, done := v.a.mirror(v, r, err)
	v.rl.unlock(r.Sector, r.Sectors)
	if logged {
		if dirty {
			v.a.alHold(v, r.Sector, r.Sectors)
		}
		v.a.al.End(tok, seq)
	}
	if done != nil {
		<-done
	}
	return err
}

// Size implements Device.
func (v *agentVolume) Size() uint64 { return v.dev.Size() }

// ReadOnly implements Device.
func (v *agentVolume) ReadOnly() bool { return v.dev.ReadOnly() }

// OnResize implements Device.
func (v *agentVolume) OnResize(fn func(oldSize, newSize uint64)) func() { return v.dev.OnResize(fn) }

// mirror queues the copy of a completed write, or records it as dirty. It
// returns the sequence number of its last frame, whether it went to the
// dirty bitmap instead, and a channel to wait on when the volume mirrors
// synchronously.
func (a *Agent) mirror(v *agentVolume, r *mapper.Request, ioErr error) (uint64, bool, chan struct{}) {
	var data []byte
	if ioErr == nil && r.Op == mapper.OpWrite {
		// The one copy of the write: guest memory into a pooled buffer,
		// back to the pool once the frame is on the socket.
		data = a.getBuf(int(r.Bytes()))[:0]
		for _, b := range r.Data {
			data = append(data, b...)
		}
	}
	pre := time.Now() // read before a.mu: the clock is slow on some hypervisors
	a.mu.Lock()
	defer a.mu.Unlock()
	bytes := int64(len(data))
	waited := false
	for !a.canMirror(v) {
		now := time.Now()
		// A connection closing (a.conn still set) is not waited for:
		// its end waits for what it serves, which may wait for this
		// write's range lock.
		if v.opts.OnHubLoss != OnHubLossSuspend || a.stopped || v.detached || (a.conn != nil && a.conn.closing.Load()) || !v.behindAway(now) {
			if !v.awayWarned && v.opts.OnHubLoss == OnHubLossContinue && !v.opts.FallBehind.IsZero() && v.behindAway(now) {
				v.awayWarned = true
				v.log.Warn("hub away and past the fall-behind threshold: writes go to the dirty map (on-hub-loss = continue)",
					"dirty_bytes", v.dirtyBytes(), "dirty_age", v.dirtyAge(now))
			}
			v.awayIOs++
			v.markDirty(r.Sector, r.Sectors, "writes while the hub was away")
			return 0, true, nil
		}
		if !v.awayWarned {
			v.awayWarned = true
			v.log.Warn("hub away and past the fall-behind threshold: holding guest writes until it returns (on-hub-loss = suspend)",
				"dirty_bytes", v.dirtyBytes(), "dirty_age", v.dirtyAge(now))
		}
		v.stats.Suspended++
		waited = true
		a.cond.Wait()
		if a.canMirror(v) {
			v.sync = true // past the threshold: the held write waits for the hub's ack
		}
	}
	share := a.share()
	var roomBy time.Time // when a write waiting for room gives up
	for {
		for a.queueBytes > 0 && (a.queueBytes+bytes > a.cfg.QueueBytes || v.pendB+bytes > share) {
			// The queue (or the volume's share) is full while the hub
			// is connected: the write waits for the hub to make room
			// (pacing), up to RoomWait; only a hub that makes no room
			// for that long (or goes away) sends it to the dirty map,
			// to be re-read by a resync. Synchronous writes wait as
			// long as the hub is connected.
			now := time.Now()
			if roomBy.IsZero() {
				roomBy = now.Add(a.cfg.RoomWait)
				v.stats.Paced++
			}
			if !v.sync && !now.Before(roomBy) {
				a.overflow(v, r.Sector, r.Sectors, bytes, share)
				return 0, true, nil
			}
			if !a.urgent {
				a.urgent = true // the guest waits: what is queued goes now
				a.wakeSender()
			}
			waited = true
			a.waitUntil(roomBy)
			if !a.canMirror(v) || a.stopped {
				v.markDirty(r.Sector, r.Sectors, "writes while the hub was away")
				return 0, true, nil
			}
		}
		if a.slotsFree(frames(r.Op, r.Sectors)) {
			break
		}
		// The credit window is used up: the ring slot of this write's
		// sequence number still holds a frame the hub has not
		// acknowledged. The guest waits for the hub, as when paced.
		v.stats.Paced++
		if !a.urgent {
			a.urgent = true
			a.wakeSender()
		}
		waited = true
		a.cond.Wait()
		if !a.canMirror(v) || a.stopped {
			v.markDirty(r.Sector, r.Sectors, "writes while the hub was away")
			return 0, true, nil
		}
	}
	if v.overflowing {
		v.overflowing = false
		v.log.Warn("mirror queue has room again: writes are mirrored", "dirtied_writes", v.ovWrites, "dirtied_bytes", v.ovBytes)
	}
	now := pre
	if waited {
		now = time.Now()
	}
	// Queued writes stay in time order (the oldest is the first, for
	// the RPO): a writer that read the clock earlier but took a.mu later
	// is stamped with the time of the write queued before it.
	if now.Before(a.lastQueued) {
		now = a.lastQueued
	}
	a.lastQueued = now
	last := a.queueWrite(v, r.Op, r.Sector, r.Sectors, data, true, ioErr, now)
	v.stats.Mirrored++
	if !v.sync && v.behind(now) {
		v.sync = true
		v.stats.SyncEntered++
		v.log.Warn("fall-behind threshold exceeded: mirroring synchronously",
			"backlog_ios", v.pendIOs, "backlog_bytes", v.pendB)
	}
	if v.sync {
		a.urgent = true // the guest waits for its acknowledgement
	}
	a.kickSender(now)
	if v.sync {
		v.stats.SyncWrites++
		last.done = make(chan struct{})
		return last.seq, false, last.done
	}
	// Past the high-water mark or PaceAge, the completion waits for the
	// hub to catch up.
	a.pace(v, share, now)
	return last.seq, false, nil
}

// pace holds the completion of a write just queued while v is paced: above
// the high-water mark (three quarters of the volume's share of the queue)
// the guest runs at the hub's pace instead of overflowing into the dirty
// map and having the hub re-read what it wrote; so does a backlog older
// than PaceAge, so the RPO stays bounded when the hub acknowledges slowly.
//
// Pacing goes by episodes, with hysteresis: one starts when the backlog
// passes the high-water mark (or PaceAge), every write completed meanwhile
// joins it, and the acknowledgement that brings the backlog down to the
// low-water mark (an eighth of the share lower, and under PaceAge) ends it
// and releases all its writers with one broadcast (endPacing). A released
// writer returns without checking the backlog again: before, every
// acknowledgement under the high-water mark woke every paced writer, and
// those that found the mark passed again by the writes of those woken
// first went back to sleep (10 context switches per 1 MiB write, against
// 3 unprotected). The connection's end, STOP_PROTECT, Detach and Abort end
// the episode too. a.mu held.
func (a *Agent) pace(v *agentVolume, share int64, now time.Time) {
	hw, lw := paceMarks(share)
	if !v.pacing {
		if v.pendB <= hw && !v.tooOld(now) {
			return
		}
		v.pacing = true
	} else if v.pendB <= lw && !v.tooOld(now) {
		// Not reached (only an acknowledgement lowers the backlog or
		// its age, and ack ends the episode), but never wait for what
		// has come.
		a.endPacing(v)
		return
	}
	v.lw = lw
	if !a.urgent {
		// The guest waits for the hub: what is queued goes now.
		a.urgent = true
		a.wakeSender()
	}
	v.stats.Paced++
	gen := v.paceGen
	v.paced++
	for v.paceGen == gen && a.canMirror(v) && !a.stopped {
		v.room.Wait()
		v.paceWakes++
	}
	v.paced--
}

// paceMarks returns the high- and low-water marks of pacing for a volume's
// share of the queue.
func paceMarks(share int64) (hw, lw int64) {
	return share / 4 * 3, share / 8 * 5
}

// endPacing ends v's pacing episode, if any, and releases its writers; a.mu
// held.
func (a *Agent) endPacing(v *agentVolume) {
	v.pacing = false
	v.paceGen++
	if v.paced > 0 {
		v.room.Broadcast()
	}
}

// waitUntil waits on a.cond, at most until t (for a synchronous write,
// whose t has passed, until woken); a.mu held.
func (a *Agent) waitUntil(t time.Time) {
	d := time.Until(t)
	if d <= 0 {
		a.cond.Wait()
		return
	}
	tm := time.AfterFunc(d, func() {
		a.mu.Lock()
		a.broadcast()
		a.mu.Unlock()
	})
	a.cond.Wait()
	tm.Stop()
}

// tooOld reports whether v's oldest unacknowledged write is older than
// the pacing age; a.mu held.
func (v *agentVolume) tooOld(now time.Time) bool {
	t := v.oldest()
	return !t.IsZero() && now.Sub(t) > v.a.cfg.PaceAge
}

// share is the part of the mirror queue one protected volume may fill, so
// that one busy disk cannot starve the others; a.mu held.
func (a *Agent) share() int64 {
	return a.cfg.QueueBytes / max(a.nProtect, 1)
}

// overflow records a write that found the queue (or the volume's share)
// full, and the hub making no room for RoomWait, in the dirty bitmap, and has a DIRTY_MAP sent at once, so that the
// hub knows before it could call the volume protected; a.mu held.
func (a *Agent) overflow(v *agentVolume, sector, sectors uint64, bytes, share int64) {
	if !v.overflowing {
		v.overflowing = true
		v.ovWrites, v.ovBytes = 0, 0
		v.stats.Overflows++
		v.log.Warn("mirror queue full and the hub made no room: writes go to the dirty map and the hub resyncs them",
			"queue_bytes", a.queueBytes, "queue_size", a.cfg.QueueBytes, "volume_backlog_bytes", v.pendB, "volume_share", share,
			"room_wait", a.cfg.RoomWait)
	}
	v.ovWrites++
	v.ovBytes += uint64(sectors) * wire.SectorSize
	v.markDirty(sector, sectors, "mirror queue overflow")
	if v.mirror && v.id != 0 {
		// The DIRTY_MAP takes the next sequence number, ahead of every
		// later write: the hub opens its resync set there, so no
		// consistent point it names holds a later write without this
		// one (a map sent with the next batch could follow later writes,
		// and the point before it would not be a prefix of the guest's
		// write order).
		a.queueDirtyMap(v, false)
		return
	}
	a.dmWanted = true
	a.broadcast()
}

// behindAway reports whether a volume whose hub is away is past its
// fall-behind threshold, counting what went to its dirty bitmap; a.mu held.
func (v *agentVolume) behindAway(now time.Time) bool {
	fb := v.opts.FallBehind
	switch {
	case fb.IsZero():
		return false
	case v.sync:
		return true
	case fb.IOs > 0 && v.awayIOs+uint64(v.pendIOs) > fb.IOs:
		return true
	case fb.Bytes > 0 && v.dirtyBytes() > fb.Bytes:
		return true
	case fb.Timeout > 0 && v.dirtyAge(now) > fb.Timeout:
		return true
	}
	return false
}

// dirtyBytes is the size of the regions in v's dirty bitmap; a.mu held.
func (v *agentVolume) dirtyBytes() uint64 {
	return v.dirty.GetCardinality() * uint64(v.a.cfg.RegionSectors) * wire.SectorSize
}

// dirtyAge is how long v's dirty bitmap has held a region; a.mu held.
func (v *agentVolume) dirtyAge(now time.Time) time.Duration {
	if v.dirtySince.IsZero() {
		return 0
	}
	return now.Sub(v.dirtySince)
}

// rpoSince returns since when v has held a write acknowledged to the guest
// that the hub has not acknowledged: the oldest unacknowledged mirrored
// write or DIRTY_MAP (which carries the age of its regions), or the oldest
// region in the dirty bitmap; zero when the hub has everything; a.mu held.
func (v *agentVolume) rpoSince() time.Time {
	t := v.dirtySince
	sawWrite := false
	for _, it := range v.pending {
		if it.write && sawWrite {
			continue // writes are queued in time order: the first is the oldest
		}
		sawWrite = sawWrite || it.write
		if !it.t.IsZero() && (t.IsZero() || it.t.Before(t)) {
			t = it.t
		}
	}
	return t
}

// queueWrite queues the PROTECTED_WRITE frames of one write and returns
// the last; a.mu held.
func (a *Agent) queueWrite(v *agentVolume, op mapper.Op, sector, sectors uint64, data []byte, pooled bool, ioErr error, now time.Time) *qitem {
	var last *qitem
	// Split into frames of at most MaxIOSectors (discards and zeroes of
	// up to 2^32-1 sectors go in one frame).
	for sec, left, off := sector, sectors, 0; left > 0; {
		n := min(left, uint64(^uint32(0)))
		it := a.writeItem(a.nextSeq)
		it.vol, it.write, it.t, it.sector = v, true, now, sec
		pw := &it.pw
		*pw = wire.ProtectedWrite{Volume: v.id, Sector: sec, Status: wire.StatusOK}
		switch {
		case ioErr != nil:
			pw.Status = wire.StatusIOError
		case op == mapper.OpDiscard:
			pw.Discard = true
		case op == mapper.OpWriteZeroes:
			pw.Zeroes = true
		default:
			n = min(left, wire.MaxIOSectors)
			it.one[0] = data[off : off+int(n)*wire.SectorSize]
			pw.Data = it.one[:]
			off += int(n) * wire.SectorSize
			if off == len(data) && pooled {
				it.buf = data // the last frame gives the buffer back
			}
		}
		pw.Sectors = uint32(n)
		it.seq, it.msg, it.sectors = a.nextSeq, pw, n
		if pw.Data != nil {
			it.bytes = int64(n) * wire.SectorSize
		}
		pw.Seq = it.seq
		a.nextSeq++
		a.enqueue(it, false)
		v.pend(it)
		v.pendIOs++
		v.pendB += it.bytes
		a.queueBytes += it.bytes
		sec += n
		left -= n
		last = it
	}
	return last
}

// sendBatchBytes and maxHold bound how the sender batches mirrored writes:
// while frames it sent are unacknowledged, it waits for more writes until
// the queue holds sendBatchBytes of data or its oldest frame is maxHold
// old (Nagle's algorithm with the hub's acknowledgements as the clock).
// One write and one hub commit then carry many guest writes; frames that
// something waits for (a synchronous write, a paced guest, a dirty map, a
// checkpoint, Sync, Close, a write waiting for room in the activity log)
// go at once. At 2 ms and 512 KiB (1 ms and 256 KiB before) a 4 KiB
// random write run at QD32 made 30% fewer writev calls (and hub reads),
// at under 1 ms more RPO.
const (
	sendBatchBytes = 512 << 10
	maxHold        = 2 * time.Millisecond
)

// enqueue appends a frame to the send queue; urgent frames are sent
// without waiting for a batch to fill. a.mu held.
func (a *Agent) enqueue(it *qitem, urgent bool) {
	a.queue = append(a.queue, it)
	a.queuedB += it.bytes
	a.urgent = a.urgent || urgent
}

// sendReady reports whether the sender should write the queue now; a.mu
// held.
func (a *Agent) sendReady(now time.Time) bool {
	if len(a.queue) == 0 {
		return false
	}
	return a.urgent || a.queuedB >= sendBatchBytes || a.takenSeq <= a.acked || now.Sub(a.queue[0].t) >= maxHold ||
		(a.al != nil && a.al.Waiting())
}

// kickSender wakes the sender when the queue is ready to go, or makes
// sure it wakes when the queue's oldest frame has been held for maxHold;
// it reports whether the queue is ready. a.mu held.
func (a *Agent) kickSender(now time.Time) bool {
	if a.sendReady(now) {
		a.wakeSender()
		return true
	}
	if len(a.queue) > 0 && !a.holdArmed {
		a.holdArmed = true
		a.holdTimer.Reset(max(maxHold-now.Sub(a.queue[0].t), time.Microsecond))
	}
	return false
}

// broadcast wakes everything waiting on a.mu's conditions but the paced
// writers (v.room); a.mu held.
func (a *Agent) broadcast() {
	a.cond.Broadcast()
	a.wakeSender()
}

// wakeSender wakes the sender if it sleeps; a.mu held.
func (a *Agent) wakeSender() {
	if a.senderIdle > 0 {
		a.sendCond.Broadcast()
	}
}

// holdExpired wakes the sender when a held batch is maxHold old.
func (a *Agent) holdExpired() {
	a.mu.Lock()
	a.holdArmed = false
	a.wakeSender()
	a.mu.Unlock()
}

// canMirror reports whether v's writes can be queued now: the connection
// is up and not closing (a write waiting for the hub holds its range lock,
// which a CSUM_REQ being served may wait for, and the connection's end
// waits for that), the hub mirrors the volume; a.mu held.
func (a *Agent) canMirror(v *agentVolume) bool {
	return a.conn != nil && !a.conn.closing.Load() && v.mirror && v.id != 0 && !v.detached
}

// markDirty records a sector range in the dirty bitmap, and why; a.mu
// held.
func (v *agentVolume) markDirty(sector, sectors uint64, reason string) {
	v.noteDirty(time.Now(), reason)
	wire.AddSectors(v.dirty, sector, sectors, v.a.cfg.RegionSectors)
	v.stats.Dirtied++
}

// noteDirty records that regions dirty since t are going into the bitmap:
// the RPO counts from the oldest; a.mu held.
func (v *agentVolume) noteDirty(t time.Time, reason string) {
	if v.dirtySince.IsZero() || t.Before(v.dirtySince) {
		v.dirtySince = t
	}
	if v.dirtyReason == "" {
		v.dirtyReason = reason
	}
}

// behind reports whether the backlog is past the fall-behind threshold;
// a.mu held.
func (v *agentVolume) behind(now time.Time) bool {
	fb := v.opts.FallBehind
	switch {
	case fb.IOs > 0 && uint64(v.pendIOs) > fb.IOs:
		return true
	case fb.Bytes > 0 && uint64(v.pendB) > fb.Bytes:
		return true
	case fb.Timeout > 0 && v.pendIOs > 0 && v.rpoAhead(now) > fb.Timeout:
		return true
	}
	return false
}

// caughtUp reports whether a volume mirroring synchronously may go back
// to asynchronous mirroring: the backlog is under every threshold, and
// under half of the timeout (so that it does not switch back and forth
// at the threshold's edge); a.mu held.
func (v *agentVolume) caughtUp(now time.Time) bool {
	if v.behind(now) {
		return false
	}
	to := v.opts.FallBehind.Timeout
	return to <= 0 || v.pendIOs == 0 || v.rpoAhead(now) <= to/2
}

// rpoAhead returns the RPO the backlog is heading for: the age of the
// oldest unacknowledged write plus the time the hub needs, at its recent
// rate, to acknowledge every byte queued now (the newest write's wait);
// a.mu held.
//
// Before a rate is measured (a volume's first burst) the hub has shown
// only that it has not acknowledged the oldest write in all that age: the
// backlog counts as draining at one write of the oldest's size per age.
// That is pessimistic on purpose. A hub that acknowledges its first batch
// late (a group commit of everything sent) would otherwise let the guest
// queue tens of MiB on the age alone, and they drain at the hub's pace
// long after the threshold; the price is a first burst that mirrors
// synchronously until the first window measures the rate.
func (v *agentVolume) rpoAhead(now time.Time) time.Duration {
	first := v.oldestWrite()
	if first == nil {
		return 0
	}
	age := now.Sub(first.t)
	if v.ackRate > 0 {
		return age + time.Duration(float64(v.pendB)/v.ackRate*float64(time.Second))
	}
	return age + time.Duration(float64(age)*float64(v.pendB)/float64(max(first.bytes, 1)))
}

// ackRateWindow is the window over which the hub's acknowledgement rate
// of a volume is measured (rpoAhead).
const ackRateWindow = 20 * time.Millisecond

// noteAcked counts n bytes of v acknowledged at now towards the hub's
// acknowledgement rate; a.mu held. A window counts only if a backlog
// remains at its end: the hub was busy throughout, so the window shows
// what it can acknowledge, not how little an idle guest wrote. The first
// window is a tenth as long, so that a volume's first burst is measured
// before it has queued much.
func (v *agentVolume) noteAcked(n int64, now time.Time) {
	if v.rateFrom.IsZero() {
		v.rateFrom = now
	}
	v.ackedB += n
	d := now.Sub(v.rateFrom)
	if d < ackRateWindow && (v.ackRate > 0 || d < ackRateWindow/10) {
		return // the first estimate comes from a short window
	}
	if v.pendIOs > 0 && v.ackedB > 0 {
		r := float64(v.ackedB) / d.Seconds()
		if v.ackRate > 0 {
			r = (r + v.ackRate) / 2
		}
		v.ackRate = r
	}
	v.ackedB, v.rateFrom = 0, now
}

// oldest returns when the oldest unacknowledged write was queued; a.mu
// held.
func (v *agentVolume) oldest() time.Time {
	if it := v.oldestWrite(); it != nil {
		return it.t
	}
	return time.Time{}
}

// oldestWrite returns the oldest unacknowledged write, or nil; a.mu held.
func (v *agentVolume) oldestWrite() *qitem {
	for _, it := range v.pending {
		if it.write {
			return it
		}
	}
	return nil
}

// ack releases everything up to seq; a.mu held.
func (a *Agent) ack(seq uint64) {
	if seq <= a.acked {
		return
	}
	a.acked = seq
	if a.al != nil {
		a.al.Ack(seq)
	}
	now := time.Now()
	for _, v := range a.vols {
		k := 0
		b0 := v.pendB
		for k < len(v.pending) && v.pending[k].seq <= seq {
			it := v.pending[k]
			if !it.write && it.msg != nil && a.al != nil {
				a.alDirtyMapAcked(v, it)
			}
			if it.changed && v.changed != "" && !v.changedAgain && it.seq >= v.changedAfter {
				// The hub read the report that said so before this
				// frame and has recorded the resync durably; no
				// later change waits for a report.
				v.log.Info("the hub took the changed volume's resync", "why", v.changed)
				v.changed = ""
				a.backingTold(v.name)
			}
			a.release(v, it)
			k++
		}
		if k > 0 {
			clear(v.pending[:k])
			v.pending = v.pending[k:]
		}
		v.noteAcked(b0-v.pendB, now)
		if v.pacing && v.pendB <= v.lw && !v.tooOld(now) {
			a.endPacing(v)
		}
		if v.sync && v.caughtUp(now) {
			v.sync = false
			v.log.Info("backlog under the fall-behind threshold: mirroring asynchronously")
		}
	}
	a.broadcast()
}

// pend appends it to v.pending. ack drops acknowledged items from the
// front: when the array is full and at least half of it is free at the
// head, the items move back to its start instead of into a new array (a
// growing array per few thousand writes, garbage to collect).
func (v *agentVolume) pend(it *qitem) {
	// pending is the tail of pendArr: ack takes from its front, append
	// adds at its end.
	n := len(v.pending)
	if n == cap(v.pending) && cap(v.pendArr)-n >= n && cap(v.pendArr) > 0 {
		copy(v.pendArr, v.pending)
		clear(v.pendArr[n:])
		v.pending = v.pendArr[:n]
	}
	if len(v.pending) == cap(v.pending) {
		// Twice the items: at a steady backlog the array is then at
		// least half free when the items reach its end (append would
		// grow a large slice by a quarter).
		v.pendArr = make([]*qitem, max(2*n, 64))
		v.pending = v.pendArr[:copy(v.pendArr, v.pending)]
	}
	v.pending = append(v.pending, it)
}

// release accounts for an item leaving the pending list; a.mu held.
func (a *Agent) release(v *agentVolume, it *qitem) {
	if it.write {
		v.pendIOs--
		v.pendB -= it.bytes
		a.queueBytes -= it.bytes
	}
	if it.done != nil {
		close(it.done)
		it.done = nil
	}
	if it.inRing {
		it.busy = false
		it.vol, it.msg, it.buf, it.one[0], it.pw.Data = nil, nil, nil, nil, nil
	}
}

// disconnected puts everything the hub may lack back into the dirty
// bitmaps and forgets the connection's volume ids; a.mu held.
func (a *Agent) disconnected() {
	a.conn = nil
	a.queue = nil
	a.queuedB, a.urgent, a.sentSeq, a.takenSeq = 0, false, a.acked, a.acked
	for _, v := range a.vols {
		for _, it := range v.pending {
			if a.cfg.Group {
				// The source's log still has them: Sync reports
				// the loss and the source resynchronises.
				a.lost = a.lost || it.write
			} else if it.write {
				v.noteDirty(it.t, "writes unacknowledged when the hub connection ended")
				wire.AddSectors(v.dirty, it.sector, it.sectors, a.cfg.RegionSectors)
				a.alHold(v, it.sector, it.sectors)
			} else if len(it.extents) > 0 {
				v.noteDirty(it.t, "a dirty map unacknowledged when the hub connection ended")
				wire.AddExtents(v.dirty, it.extents, a.cfg.RegionSectors, a.cfg.RegionSectors, wire.MaxTrackedRegions)
				v.alFull = v.alFull || it.alFull
			} else {
				v.alFull = v.alFull || it.alFull
			}
			a.release(v, it)
		}
		v.pending, v.pendArr = nil, nil
		v.id = 0
		v.mirror = false
		v.sync = false
		v.overflowing = false
		v.changedAgain, v.changedMark = false, false // the next connection's first report says it
		a.endPacing(v)
	}
	a.queueBytes = 0
	a.byID = map[uint64]*agentVolume{}
	a.reported = false
	a.broadcast()
}

// stopMirror handles STOP_PROTECT: the hub journals nothing more of v (its
// store failed) and drops what it has not made durable, so everything of
// v it has not acknowledged goes back into the dirty bitmap, as at the end
// of a connection, and is sent as the initial DIRTY_MAP when the hub
// starts protection again. The items stay queued until acknowledged (a
// later WRITE_ACK covers them); a.mu held.
func (a *Agent) stopMirror(v *agentVolume) {
	v.mirror = false
	v.sync = false
	for _, it := range v.pending {
		switch {
		case a.cfg.Group:
			a.lost = a.lost || it.write
		case it.write:
			v.noteDirty(it.t, "writes unacknowledged when the hub's store failed")
			wire.AddSectors(v.dirty, it.sector, it.sectors, a.cfg.RegionSectors)
			a.alHold(v, it.sector, it.sectors)
		case len(it.extents) > 0:
			v.noteDirty(it.t, "a dirty map unacknowledged when the hub's store failed")
			wire.AddExtents(v.dirty, it.extents, a.cfg.RegionSectors, a.cfg.RegionSectors, wire.MaxTrackedRegions)
			v.alFull = v.alFull || it.alFull
			it.alFull = false // its acknowledgement no longer ends a full resync
		default:
			v.alFull = v.alFull || it.alFull
			it.alFull = false
		}
	}
	a.endPacing(v)
	a.broadcast()
}

// queueDirtyMap moves v's dirty bitmap into a DIRTY_MAP frame; a.mu held.
func (a *Agent) queueDirtyMap(v *agentVolume, initial bool) {
	exts := wire.ExtentsOf(v.dirty)
	regions := v.dirty.GetCardinality()
	since, reason := v.dirtySince, v.dirtyReason
	if since.IsZero() {
		since = time.Now()
	}
	if reason == "" {
		reason = "writes before protection started"
	}
	if regions > 0 {
		b := v.dirtyBytes()
		v.resync = ResyncInfo{Reason: reason, Bytes: b}
		v.stats.ResyncRequests++
		v.stats.ResyncBytes += b
		if reason != "mirror queue overflow" || !v.overflowing {
			v.log.Warn("resync requested: dirty map sent to the hub", "reason", reason, "regions", regions, "bytes", b)
		}
	}
	v.stats.DirtyMapRegions += regions
	v.dirty.Clear()
	v.dirtySince, v.dirtyReason = time.Time{}, ""
	// Keep frames well under the payload limit.
	const per = 256 << 10
	for first := true; first || len(exts) > 0; first = false {
		chunk := exts[:min(len(exts), per)]
		exts = exts[len(chunk):]
		it := &qitem{seq: a.nextSeq, vol: v, t: since, extents: chunk}
		it.msg = &wire.DirtyMap{Seq: it.seq, Volume: v.id, Initial: initial && first, RegionSectors: a.cfg.RegionSectors, Extents: chunk}
		a.nextSeq++
		a.enqueue(it, true)
		v.pend(it)
		if len(exts) == 0 {
			it.alFull, v.alFull = v.alFull, false
			it.changed, v.changedMap = v.changedMap, false
		}
	}
	a.broadcast()
}

// ErrNotMirrored is returned by MirrorWrite and Sync when the hub does not
// have (or may have lost) a consistency group's writes: the caller keeps
// them in its own log or dirty log and resynchronises later.
var ErrNotMirrored = errors.New("repagent: write not mirrored to the hub")

// ErrRefused is wrapped by the error of a connection whose HELLO the hub
// refused (REFUSED: the VM was promoted there, another UUID, an identity
// not authorised for the VM); the agent keeps retrying with backoff.
var ErrRefused = errors.New("repagent: the hub refused this agent")

// ErrCheckpointRefused is wrapped by Checkpoint's error when the hub
// refused the checkpoint (its name is already used in the VM's journal).
var ErrCheckpointRefused = errors.New("repagent: checkpoint refused by the hub")

// MirrorWrite queues a write of a consistency group's volume (an agent
// with Config.Group) for the hub, in call order across the group's
// volumes; the data was already written at the source and is copied. It
// waits while the queue is full, and fails with ErrNotMirrored while the
// hub is away, the volume is not being protected, or writes were lost
// and Sync has not reported it yet.
func (a *Agent) MirrorWrite(name string, op mapper.Op, sector, sectors uint64, data []byte) error {
	if !a.cfg.Group {
		return errors.New("repagent: MirrorWrite needs a group agent")
	}
	if op == mapper.OpWrite {
		if uint64(len(data)) != sectors*wire.SectorSize {
			return fmt.Errorf("repagent: %d bytes of data for %d sectors", len(data), sectors)
		}
		data = bytes.Clone(data)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	v := a.vols[name]
	if v == nil {
		return fmt.Errorf("repagent: volume %q is not attached", name)
	}
	if sector >= v.dev.Size() || sectors > v.dev.Size()-sector || sectors == 0 {
		return fmt.Errorf("repagent: %d sectors at %d outside volume %q", sectors, sector, name)
	}
	for {
		if a.lost || !a.canMirror(v) {
			return fmt.Errorf("volume %q: %w", name, ErrNotMirrored)
		}
		if a.queueBytes == 0 || a.queueBytes+int64(len(data)) <= a.cfg.QueueBytes {
			break
		}
		a.cond.Wait()
	}
	a.queueWrite(v, op, sector, sectors, data, false, nil, time.Now())
	v.stats.Mirrored++
	a.broadcast()
	return nil
}

// Sync waits until the hub has acknowledged every write MirrorWrite
// queued (group agents): they are then durable on the hub. It fails with
// ErrNotMirrored once, and only once, for each loss of unacknowledged
// writes (a disconnect), after which the group counts as inconsistent
// until the next SetConsistent(true), and while the hub is away with
// writes pending.
func (a *Agent) Sync() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	target, conn := a.nextSeq-1, a.conn
	if len(a.queue) > 0 && !a.urgent {
		a.urgent = true // waited for: no batching delay
		a.broadcast()
	}
	for !a.lost && a.acked < target && a.conn == conn && conn != nil {
		a.cond.Wait()
	}
	if a.lost {
		// The hub has a gap until the source resynchronises and says
		// so again.
		a.lost = false
		a.consistent = false
		return fmt.Errorf("writes unacknowledged when the hub connection ended: %w", ErrNotMirrored)
	}
	if a.acked < target {
		return fmt.Errorf("hub away with writes pending: %w", ErrNotMirrored)
	}
	return nil
}

// SetConsistent tells the hub, in order with the writes queued so far,
// whether the group's replicas hold a prefix of the source's write order
// once those writes are applied (group agents). The state is sent again
// on every connection; it starts false.
func (a *Agent) SetConsistent(consistent bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.consistent == consistent {
		return
	}
	a.consistent = consistent
	if a.conn != nil {
		a.queueGroupState()
	}
}

// Checkpoint puts a CHECKPOINT frame named name into the write stream,
// after every write queued so far, and waits until the hub acknowledged
// it (it is then durable in the hub's journal). It fails when the hub is
// not connected or the connection ends first (ask again), or when ctx is
// done.
func (a *Agent) Checkpoint(ctx context.Context, name string) error {
	if err := wire.CheckCheckpointName(name); err != nil {
		return fmt.Errorf("checkpoint name %q: %w", name, err)
	}
	a.mu.Lock()
	conn := a.conn
	if conn == nil {
		a.mu.Unlock()
		return errors.New("checkpoint: the hub is not connected")
	}
	it := &qitem{seq: a.nextSeq, t: time.Now()}
	it.msg = &wire.Checkpoint{Seq: it.seq, Name: name}
	a.nextSeq++
	a.enqueue(it, true)
	if a.ckpts == nil {
		a.ckpts = map[uint64]bool{}
	}
	a.ckpts[it.seq] = false
	a.broadcast()
	stop := context.AfterFunc(ctx, func() {
		a.mu.Lock()
		a.broadcast()
		a.mu.Unlock()
	})
	defer stop()
	for a.acked < it.seq && a.conn == conn && ctx.Err() == nil && !a.ckpts[it.seq] {
		a.cond.Wait()
	}
	acked := a.acked >= it.seq
	refused := a.ckpts[it.seq]
	delete(a.ckpts, it.seq)
	a.mu.Unlock()
	switch {
	case refused:
		a.log.Warn("checkpoint refused by the hub: the name is already used", "checkpoint", name, "seq", it.seq)
		return fmt.Errorf("checkpoint %q: %w: the name is already used in the VM's journal (retention window); nothing was recorded", name, ErrCheckpointRefused)
	case acked:
		a.log.Info("checkpoint recorded by the hub", "checkpoint", name, "seq", it.seq)
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("checkpoint %q: %w", name, ctx.Err())
	}
	return fmt.Errorf("checkpoint %q: the hub connection ended before the hub recorded it", name)
}

// queueGroupState queues a GROUP_STATE frame; a.mu held.
func (a *Agent) queueGroupState() {
	it := &qitem{seq: a.nextSeq, t: time.Now()}
	it.msg = &wire.GroupState{Seq: it.seq, Consistent: a.consistent && !a.lost}
	a.nextSeq++
	a.enqueue(it, true)
	a.broadcast()
}

// Run connects to the hub and keeps reconnecting with backoff until ctx is
// done or Close is called.
func (a *Agent) Run(ctx context.Context) error {
	a.runMu.Lock()
	if a.runDone != nil {
		a.runMu.Unlock()
		return errors.New("repagent: already running")
	}
	ctx, cancel := context.WithCancel(ctx)
	a.cancel = cancel
	done := make(chan struct{})
	a.runDone = done
	a.runMu.Unlock()
	defer close(done)
	defer cancel()
	backoff := a.cfg.MinBackoff
	for {
		start := time.Now()
		err := a.runConn(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > 5*time.Second {
			backoff = a.cfg.MinBackoff
		}
		// Next time the next hub of the list: after a round, back off
		// further.
		a.mu.Lock()
		hub := a.hubs[a.hubAt]
		a.hubAt = (a.hubAt + 1) % len(a.hubs)
		next, round := a.hubs[a.hubAt], a.hubAt == 0
		a.mu.Unlock()
		switch {
		case errors.Is(err, ErrRefused) && strings.Contains(err.Error(), wire.ReasonHeldElsewhere):
			a.log.Info("the hub refused this agent: another hub holds the VM", "hub", hub, "err", err, "next", next, "retry_in", backoff)
		case errors.Is(err, ErrRefused):
			a.log.Error("the hub refused this agent; nothing is replicated until that changes", "hub", hub, "err", err, "next", next, "retry_in", backoff)
		default:
			a.log.Warn("hub connection ended", "hub", hub, "err", err, "next", next, "retry_in", backoff)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		if round {
			backoff = min(2*backoff, a.cfg.MaxBackoff)
		}
	}
}

// agentConn is one connection to the hub.
type agentConn struct {
	a     *Agent
	nc    net.Conn
	log   *slog.Logger
	wmu   sync.Mutex // guards w
	w     *wire.Writer
	r     *wire.Reader
	sem   chan struct{} // bounds concurrent remote IO
	wg    sync.WaitGroup
	bye   chan struct{} // closed when AGENT_SHUTDOWN is answered
	done  chan struct{} // closed when the connection ends
	close sync.Once
	// closing is set by shut: writes stop waiting for this connection.
	closing atomic.Bool
	// named holds every volume name a report on this connection
	// carried, last the volumes of the latest report, and reattached
	// the volumes first reported under a name an earlier volume had on
	// this connection; ids the volume ids the hub gave on it; guarded
	// by a.mu.
	named      map[string]bool
	last       map[string]*agentVolume
	reattached map[*agentVolume]bool
	ids        map[uint64]bool
	// told holds the volumes a report on this connection said changed
	// (CHANGED) since they last changed; guarded by a.mu.
	told map[*agentVolume]bool
	// gen numbers the reports (level 3), firstGen is the report that
	// first carried each volume: a START_PROTECT answering an earlier
	// report was meant for a volume it replaced; guarded by a.mu.
	gen      uint64
	firstGen map[*agentVolume]uint64

	// The sender's batch, reused (sendLoop). The other writers (c.w)
	// flush under wmu: the socket has nothing of theirs buffered.
	vectored bool          // nc takes writev: a TCP or Unix socket
	rc       *rawsock.Conn // nc's socket, written with raw writev calls
	bw       *bufio.Writer // otherwise (TLS), written under wmu
	pooled   [][]byte
	spare    []*qitem // the other queue slice, swapped with Agent.queue
	hdr      []byte
	pieces   []piece
	iov      net.Buffers
}

func (c *agentConn) shut() {
	c.close.Do(func() {
		c.closing.Store(true)
		close(c.done)
		c.nc.Close()
		a := c.a
		a.mu.Lock()
		a.broadcast()
		for _, v := range a.vols {
			a.endPacing(v) // paced writers stop waiting
		}
		a.mu.Unlock()
	})
}

// send writes and flushes one message.
func (c *agentConn) send(m wire.Message) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(wire.PeerTimeout(c.a.cfg.Heartbeat)))
	if err := c.w.WriteMessage(m); err != nil {
		return err
	}
	return c.w.Flush()
}

// dial connects to the hub, with TLS when configured (the handshake is
// left to runConn).
func (a *Agent) dial(ctx context.Context) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	a.mu.Lock()
	hub, tlsConf := a.hubs[a.hubAt], a.tls
	a.mu.Unlock()
	var nc net.Conn
	var err error
	if a.cfg.Dial != nil {
		nc, err = a.cfg.Dial(dctx, hub)
	} else {
		var d net.Dialer
		nc, err = d.DialContext(dctx, "tcp", hub)
	}
	if err != nil || tlsConf == nil {
		return nc, err
	}
	tc := tlsConf.Clone()
	if tc.ServerName == "" {
		if host, _, err := net.SplitHostPort(hub); err == nil {
			tc.ServerName = host
		}
	}
	return tls.Client(nc, tc), nil
}

// runConn runs one connection from dial to disconnect.
func (a *Agent) runConn(ctx context.Context) error {
	nc, err := a.dial(ctx)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	if tc, ok := nc.(*tls.Conn); ok {
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			nc.Close()
			return fmt.Errorf("tls handshake: %w", err)
		}
	}
	c := &agentConn{a: a, nc: nc, log: a.log, w: wire.NewWriter(nc), r: wire.NewReader(nc, wire.MaxHelloPayload),
		sem: make(chan struct{}, 32), bye: make(chan struct{}), done: make(chan struct{}),
		named: map[string]bool{}, last: map[string]*agentVolume{}, reattached: map[*agentVolume]bool{}, ids: map[uint64]bool{},
		told: map[*agentVolume]bool{}, firstGen: map[*agentVolume]uint64{}}
	switch nc.(type) {
	case *net.TCPConn, *net.UnixConn:
		c.rc = rawsock.New(nc)
		c.vectored = c.rc != nil
	}
	stop := context.AfterFunc(ctx, c.shut)
	defer stop()
	defer c.shut()

	// Handshake: HELLO both ways, then the volume report.
	if err := c.send(&wire.Hello{MaxVersion: wire.MaxVersion, Session: a.session, UUID: a.uuid, Name: a.cfg.VM, Group: a.cfg.Group}); err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	f, err := c.r.ReadFrame()
	if err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	m, err := wire.Decode(f)
	if err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	if r, ok := m.(*wire.Refused); ok {
		a.mu.Lock()
		a.refusal = r.Reason
		a.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrRefused, r.Reason)
	}
	h, ok := m.(*wire.Hello)
	if !ok || !h.Reply {
		return fmt.Errorf("hello: hub answered %s: %w", f.Cmd, wire.ErrMalformed)
	}
	c.r.SetMaxPayload(a.cfg.MaxPayload)
	c.log = a.log.With("hub", h.Name)
	a.mu.Lock()
	a.conn = c
	a.hubLevel = h.MaxVersion
	a.connects++
	a.reported = false
	a.refusal = ""
	if a.cfg.Group {
		// First after the report: the hub knows the group's state
		// before any write of this connection.
		a.queueGroupState()
	}
	a.mu.Unlock()
	c.log.Info("connected to hub", "hub_version", h.MaxVersion)
	defer func() {
		c.shut()
		c.wg.Wait()
		a.mu.Lock()
		a.disconnected()
		a.mu.Unlock()
	}()

	c.wg.Add(2)
	go c.sendLoop()
	go c.heartbeatLoop()
	return c.readLoop()
}

// readLoop handles the hub's frames until the connection fails.
func (c *agentConn) readLoop() error {
	a := c.a
	for {
		c.nc.SetReadDeadline(time.Now().Add(wire.PeerTimeout(a.cfg.Heartbeat)))
		f, err := c.r.ReadFrame()
		if err != nil {
			return c.fail(err)
		}
		m, err := wire.Decode(f)
		if err != nil {
			return c.fail(err)
		}
		switch m := m.(type) {
		case *wire.StartProtect:
			if err := c.startProtect(m); err != nil {
				return c.fail(err)
			}
		case *wire.StopProtect:
			a.mu.Lock()
			v := a.byID[m.Volume]
			if v != nil {
				a.stopMirror(v)
			}
			a.mu.Unlock()
			if v == nil {
				return c.fail(wire.Malformed("%s: unknown volume id %d", m.Cmd(), m.Volume))
			}
			v.log.Warn("hub stopped protection (its store failed): writes go to the dirty map until it starts protection again")
		case *wire.RemoteIOReq:
			if err := c.remoteIO(m); err != nil {
				return c.fail(err)
			}
		case *wire.CsumReq:
			if err := c.csumReq(m); err != nil {
				return c.fail(err)
			}
		case *wire.WriteAck:
			a.mu.Lock()
			// Only what was handed to the socket can be acknowledged:
			// an acknowledged frame's ring slot is reused.
			ok := m.Seq <= a.sentSeq || m.Seq <= a.acked
			if ok {
				a.ack(m.Seq)
			}
			a.mu.Unlock()
			if !ok {
				return c.fail(wire.Malformed("%s: sequence %d was never sent", m.Cmd(), m.Seq))
			}
		case *wire.Heartbeat:
		case *wire.Checkpoint:
			// The hub refused a checkpoint: its caller learns why.
			a.mu.Lock()
			ok := m.Refused && m.Seq < a.nextSeq
			_, waiting := a.ckpts[m.Seq]
			if ok && waiting {
				a.ckpts[m.Seq] = true
				a.broadcast()
			}
			a.mu.Unlock()
			if !ok {
				return c.fail(wire.Malformed("%s from the hub for sequence %d (refused %v): only refusals of sent checkpoints", m.Cmd(), m.Seq, m.Refused))
			}
			if !waiting {
				a.log.Warn("the hub refused a checkpoint nobody waits for", "checkpoint", m.Name, "seq", m.Seq)
			}
		case *wire.AgentShutdown:
			if !m.Reply {
				return c.fail(wire.Malformed("%s from the hub without the reply flag", m.Cmd()))
			}
			select {
			case <-c.bye:
			default:
				close(c.bye)
			}
		default:
			return c.fail(wire.Malformed("%s is not sent by a hub", m.Cmd()))
		}
	}
}

// fail logs why the connection ends and returns err.
func (c *agentConn) fail(err error) error {
	select {
	case <-c.done:
		return err // closed on purpose
	default:
	}
	if errors.Is(err, wire.ErrMalformed) {
		c.log.Error("closing hub connection: bad frame", "reason", err)
	}
	return err
}

// startProtect assigns a volume id and, when asked, starts mirroring: the
// volume's dirty bitmap so far goes first, as the initial DIRTY_MAP.
func (c *agentConn) startProtect(m *wire.StartProtect) error {
	a := c.a
	a.mu.Lock()
	defer a.mu.Unlock()
	v := a.vols[m.Name]
	if m.Gen > c.gen {
		return wire.Malformed("%s: answers report %d, but %d were sent", m.Cmd(), m.Gen, c.gen)
	}
	if g := c.firstGen[v]; v != nil && m.Gen != 0 && (g == 0 || m.Gen < g) && c.named[m.Name] {
		// It answers a report sent before this volume was first
		// reported (or it has not been yet): it was meant for the one
		// this volume replaced.
		c.ids[m.Volume] = true
		c.log.Debug("START_PROTECT for the volume's predecessor ignored", "volume", m.Name, "id", m.Volume, "gen", m.Gen, "first_gen", c.firstGen[v])
		return nil
	}
	if m.Gen != 0 && c.firstGen[v] == 0 {
		return wire.Malformed("%s: volume %q was not reported", m.Cmd(), m.Name)
	}
	if c.named[m.Name] {
		c.ids[m.Volume] = true
		if v == nil {
			// Detached since a report named it (a reload replaced or
			// removed its export): the hub answered that report
			// before it read the one that drops the volume, which
			// Detach queued.
			c.log.Debug("START_PROTECT of a detached volume ignored", "volume", m.Name, "id", m.Volume)
			return nil
		}
	}
	if v == nil {
		return wire.Malformed("%s: volume %q was not reported", m.Cmd(), m.Name)
	}
	if o, used := a.byID[m.Volume]; used && o != v {
		return wire.Malformed("%s: volume id %d already names %q", m.Cmd(), m.Volume, o.name)
	}
	// A volume attached under the name of one this connection reported
	// before may first get START_PROTECTs the hub sent for that one,
	// before it read the report that dropped it (reportsLocked); the
	// hub's frames come in order, so the last one is the volume's own.
	// Until it mirrors, a later id replaces the earlier one.
	if v.id != 0 && v.id != m.Volume {
		if !c.reattached[v] || v.mirror {
			return wire.Malformed("%s: volume %q already has id %d", m.Cmd(), m.Name, v.id)
		}
		v.log.Debug("START_PROTECT: an id meant for the volume's predecessor replaced", "old", v.id, "id", m.Volume)
		delete(a.byID, v.id)
		v.id = 0
	}
	if m.Mirror && !v.opts.Protect {
		if c.reattached[v] {
			// Meant for a protected predecessor.
			v.log.Debug("START_PROTECT with MIRROR for the volume's predecessor ignored", "id", m.Volume)
			return nil
		}
		return wire.Malformed("%s: volume %q is not protected here", m.Cmd(), m.Name)
	}
	v.id = m.Volume
	a.byID[v.id] = v
	if m.Mirror && !v.mirror {
		v.mirror = true
		v.awayIOs, v.awayWarned = 0, false
		c.changedResync(v)
		a.queueDirtyMap(v, true)
		v.log.Info("protection started", "id", v.id)
	}
	return nil
}

// requestVolume returns the volume a hub request names, checking that the
// request's sectors lie inside it: an unknown volume or a range outside it
// breaks the protocol.
func (c *agentConn) requestVolume(cmd wire.Cmd, id, sector, sectors uint64) (*agentVolume, error) {
	a := c.a
	a.mu.Lock()
	v := a.byID[id]
	gone := v == nil && c.ids[id]
	a.mu.Unlock()
	if gone {
		return nil, errVolumeGone
	}
	if v == nil {
		return nil, wire.Malformed("%s: unknown volume id %d", cmd, id)
	}
	size := v.dev.Size()
	if sector >= size || sectors > size-sector {
		return nil, wire.Malformed("%s: %d sectors at %d outside volume %q of %d sectors", cmd, sectors, sector, v.name, size)
	}
	return v, nil
}

// errVolumeGone is requestVolume's answer for a volume id the hub gave
// on this connection whose volume was detached since (a reload removed
// or replaced its export): the request crossed the report that drops it,
// so it fails, and the connection goes on.
var errVolumeGone = errors.New("the volume was detached")

// remoteIO validates a REMOTE_IO_REQ and serves it in the background.
func (c *agentConn) remoteIO(m *wire.RemoteIOReq) error {
	a := c.a
	res := &wire.RemoteIORes{ID: m.ID, Volume: m.Volume, Sectors: m.Sectors, Written: m.Write}
	v, err := c.requestVolume(m.Cmd(), m.Volume, m.Sector, uint64(m.Sectors))
	if errors.Is(err, errVolumeGone) {
		c.log.Info("remote IO for a detached volume failed", "id", m.Volume, "sector", m.Sector, "sectors", m.Sectors)
		res.Status = wire.StatusIOError
		return c.send(res)
	}
	if err != nil {
		return err
	}
	var data []byte
	if !m.Write && !v.opts.Protect && !v.opts.AllowRemoteWrite {
		v.log.Warn("remote read refused: the volume is not protected", "sector", m.Sector, "sectors", m.Sectors)
		res.Status = wire.StatusDenied
		return c.send(res)
	}
	if m.Write {
		if !v.opts.AllowRemoteWrite || v.dev.ReadOnly() {
			v.log.Warn("remote write refused: allow-remote-write is off", "sector", m.Sector, "sectors", m.Sectors)
			res.Status = wire.StatusDenied
			return c.send(res)
		}
		data = append([]byte(nil), m.Data[0]...) // the payload buffer is reused
	}
	c.sem <- struct{}{}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() { <-c.sem }()
		var err error
		if m.Write {
			// Through the wrapper: a remote write to a protected
			// volume is mirrored like any other.
			err = v.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: m.Sector, Sectors: uint64(m.Sectors), Data: [][]byte{data}})
		} else {
			// A pooled buffer: a resync reads megabytes; send writes
			// it out before returning, so it goes back to the pool.
			data = a.getBuf(int(m.Sectors) * wire.SectorSize)
			defer a.putBufs([][]byte{data})
			err = v.dev.Submit(&mapper.Request{Op: mapper.OpRead, Sector: m.Sector, Sectors: uint64(m.Sectors), Data: [][]byte{data}})
			if err == nil {
				if allZero(data) {
					res.Zero = true
				} else {
					res.Data = [][]byte{data}
				}
				a.mu.Lock()
				v.stats.RemoteReads++
				v.stats.RemoteBytes += uint64(len(data))
				a.mu.Unlock()
			}
		}
		if err != nil {
			v.log.Warn("remote io failed", "write", m.Write, "sector", m.Sector, "sectors", m.Sectors, "err", err)
			res.Status = wire.StatusIOError
			res.Data = nil
		}
		if err := c.send(res); err != nil {
			c.shut()
		}
	}()
	return nil
}

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// sendLoop writes the volume report when it is stale and the queue in
// order, until the connection ends.
func (c *agentConn) sendLoop() {
	defer c.wg.Done()
	defer c.shut()
	a := c.a
	for {
		a.mu.Lock()
		for a.reported && !a.dmWanted && a.conn == c {
			select {
			case <-c.done:
				a.mu.Unlock()
				return
			default:
			}
			if a.kickSender(time.Now()) {
				break
			}
			a.senderIdle++
			a.sendCond.Wait()
			a.senderIdle--
		}
		if a.conn != c {
			a.mu.Unlock()
			return
		}
		var drop, report *wire.ReportVolumes
		// later: a report on this connection came before; the queued
		// frames were made under it.
		later := len(c.named) > 0
		if !a.reported {
			drop, report = c.reportsLocked()
			a.reported = true
		}
		if a.dmWanted {
			// Overflowed regions go out with this batch, not at the
			// next heartbeat.
			a.dmWanted = false
			for _, n := range a.order {
				if v := a.vols[n]; v.mirror && !v.dirty.IsEmpty() {
					a.queueDirtyMap(v, false)
				}
			}
		}
		items := a.queue
		a.queue, c.spare = c.spare[:0], nil
		a.queuedB, a.urgent = 0, false
		last := a.sentSeq
		for i := len(items) - 1; i >= 0; i-- {
			if items[i].seq != 0 { // a CSUM_RES has none
				last = items[i].seq
				break
			}
		}
		a.takenSeq = max(a.takenSeq, last)
		// The sender owns the batch's data buffers from here.
		pooled := c.pooled[:0]
		for _, it := range items {
			if it.buf != nil {
				pooled = append(pooled, it.buf)
				it.buf = nil
			}
		}
		a.mu.Unlock()

		// The batch is encoded without a.mu, so the guest's writes do
		// not wait for it. Nothing changes its items meanwhile: they
		// are off the queue, the hub may acknowledge (and so free the
		// ring slots of) only frames up to sentSeq, which moves past
		// them only once they are encoded, and they are released on a
		// disconnect only once this goroutine has ended.
		var reports, before, after []wire.Message
		switch {
		case drop != nil:
			reports = []wire.Message{drop, report}
		case report != nil:
			reports = []wire.Message{report}
		}
		if later {
			// The queued frames of a replaced or deleted volume go
			// before the report that drops it. (A volume the report
			// adds has nothing queued: it mirrors only once the hub
			// answered the report with its id.)
			after = reports
		} else {
			before = reports
		}
		c.encode(before, items, after)
		clear(items)
		a.mu.Lock()
		a.sentSeq = max(a.sentSeq, last)
		a.mu.Unlock()

		err := c.writeBatch()
		if report != nil && err == nil {
			a.mu.Lock()
			c.queueChangedMarks()
			a.mu.Unlock()
		}
		a.putBufs(pooled) // written: the kernel has the bytes
		clear(pooled)
		c.pooled, c.spare = pooled[:0], items[:0]
		if err != nil {
			c.log.Warn("send failed", "err", err)
			return
		}
	}
}

// piece is a run of frame headers in the sender's header buffer,
// [start, end), and the data that follows them.
type piece struct {
	start, end int
	data       [][]byte
}

// encode puts the frames of before, items and after, in that order, into
// the sender's batch: their headers into one buffer, their data referenced
// where it lies.
func (c *agentConn) encode(before []wire.Message, items []*qitem, after []wire.Message) {
	hdr, pieces := c.hdr[:0], c.pieces[:0]
	add := func(m wire.Message) {
		start := len(hdr)
		var data [][]byte
		hdr, data = wire.AppendHead(hdr, m)
		if n := len(pieces); n > 0 && pieces[n-1].data == nil && pieces[n-1].end == start {
			pieces[n-1].end, pieces[n-1].data = len(hdr), data // adjacent headers: one piece
			return
		}
		pieces = append(pieces, piece{start, len(hdr), data})
	}
	for _, m := range before {
		add(m)
	}
	for _, it := range items {
		add(it.msg)
	}
	for _, m := range after {
		add(m)
	}
	bufs := c.iov[:0]
	for _, p := range pieces {
		bufs = append(bufs, hdr[p.start:p.end])
		for _, d := range p.data {
			if len(d) > 0 {
				bufs = append(bufs, d)
			}
		}
	}
	clear(pieces)
	c.hdr, c.pieces, c.iov = hdr, pieces[:0], bufs
}

// writeBatch writes the encoded batch: on a TCP or Unix socket with
// vectored writes (writev: the data is not copied again), otherwise (TLS)
// through a buffer.
func (c *agentConn) writeBatch() error {
	all := c.iov
	bufs := all
	defer func() {
		clear(all)
		c.iov = all[:0]
		if cap(c.hdr) > 4<<20 {
			c.hdr = nil // a huge dirty map's: not kept
		}
	}()
	if len(bufs) == 0 {
		return nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	// The deadline bounds a stall, not the whole batch: a large backlog
	// over a slow link is written in pieces of about writePiece bytes,
	// each with a fresh deadline.
	timeout := wire.PeerTimeout(c.a.cfg.Heartbeat)
	if c.vectored {
		for len(bufs) > 0 {
			n := pieceLen(bufs)
			c.nc.SetWriteDeadline(time.Now().Add(timeout))
			if err := c.rc.Writev(bufs[:n:n]); err != nil {
				return err
			}
			bufs = bufs[n:]
		}
		return nil
	}
	if c.bw == nil {
		c.bw = bufio.NewWriterSize(c.nc, 256<<10)
	}
	for _, b := range bufs {
		c.nc.SetWriteDeadline(time.Now().Add(timeout))
		if _, err := c.bw.Write(b); err != nil {
			return err
		}
	}
	c.nc.SetWriteDeadline(time.Now().Add(timeout))
	return c.bw.Flush()
}

// writePiece is about the most a batch writes under one write deadline:
// a piece ends with the buffer that brings it to writePiece bytes.
const writePiece = 1 << 20

// pieceLen returns how many of bufs (at least one) the next vectored write
// takes: buffers until they hold writePiece bytes. A frame's header goes
// in the same writev as its data: a piece that stopped short of a 1 MiB
// write's data would send the header alone, one more syscall and one more
// small segment (and wake-up of the hub) per write.
func pieceLen(bufs [][]byte) int {
	n, size := 0, 0
	for n < len(bufs) && size < writePiece {
		size += len(bufs[n])
		n++
	}
	return max(n, min(len(bufs), 1))
}

// reportsLocked builds the REPORT_VM_VOLUMES of the current volumes and
// notes them as reported on c. If a volume of the last report was
// detached and attached again since (a reload replaced its export), drop
// is a report without it, to send before report: the hub must see it go,
// or it would take the new volume for the old one, mirrored under the old
// id, and never start it. a.mu held.
func (c *agentConn) reportsLocked() (drop, report *wire.ReportVolumes) {
	a := c.a
	replaced := map[string]bool{}
	for _, n := range a.order {
		if old, ok := c.last[n]; ok && old != a.vols[n] {
			replaced[n] = true
		}
	}
	if len(replaced) > 0 {
		drop = a.reportLocked(replaced)
	}
	report = a.reportLocked(nil)
	if a.hubLevel >= 3 {
		if drop != nil {
			c.gen++
			drop.Gen = c.gen
		}
		c.gen++
		report.Gen = c.gen
		for _, n := range a.order {
			if v := a.vols[n]; c.firstGen[v] == 0 {
				c.firstGen[v] = c.gen
			}
		}
	}
	c.markChanged(report)
	for v := range c.reattached {
		if a.vols[v.name] != v {
			delete(c.reattached, v) // detached
		}
	}
	for _, n := range a.order {
		if v := a.vols[n]; c.last[n] != v && c.named[n] {
			c.reattached[v] = true
		}
	}
	clear(c.last)
	for _, n := range a.order {
		c.last[n] = a.vols[n]
		c.named[n] = true
	}
	return drop, report
}

// reportLocked builds REPORT_VM_VOLUMES of the volumes not in skip; a.mu
// held.
func (a *Agent) reportLocked(skip map[string]bool) *wire.ReportVolumes {
	r := &wire.ReportVolumes{}
	for _, n := range a.order {
		if skip[n] {
			continue
		}
		v := a.vols[n]
		r.Volumes = append(r.Volumes, wire.VolumeInfo{Name: n, Sectors: v.dev.Size(), ReadOnly: v.dev.ReadOnly(),
			Protect: v.opts.Protect, RemoteWrite: v.opts.AllowRemoteWrite})
	}
	return r
}

// heartbeatLoop sends the backlog every heartbeat interval, and queues
// dirty maps for regions that overflowed the queue while connected.
func (c *agentConn) heartbeatLoop() {
	defer c.wg.Done()
	a := c.a
	t := time.NewTicker(a.cfg.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
		}
		hb := &wire.Heartbeat{}
		now := time.Now()
		a.mu.Lock()
		for _, n := range a.order {
			v := a.vols[n]
			if v.mirror && !v.dirty.IsEmpty() {
				a.queueDirtyMap(v, false)
			}
			if v.id == 0 {
				continue
			}
			b := wire.Backlog{Volume: v.id, IOs: uint64(v.pendIOs), Bytes: uint64(v.pendB), Sync: v.sync}
			if v.pendIOs > 0 {
				b.AgeMillis = uint32(min(now.Sub(v.oldest()).Milliseconds(), 1<<31))
			}
			hb.Backlog = append(hb.Backlog, b)
		}
		a.mu.Unlock()
		if err := c.send(hb); err != nil {
			c.shut()
			return
		}
	}
}

// Close stops the agent cleanly: it waits (up to DrainTimeout) for the hub
// to acknowledge every queued write and dirty map, sends AGENT_SHUTDOWN
// and waits for its answer, then disconnects. When the hub is away or
// the drain times out, the shutdown is unclean and the hub resyncs what
// may differ when the VM comes back.
func (a *Agent) Close() error {
	deadline := time.Now().Add(a.cfg.DrainTimeout)
	timer := time.AfterFunc(a.cfg.DrainTimeout, func() {
		a.mu.Lock()
		a.broadcast()
		a.mu.Unlock()
	})
	defer timer.Stop()
	a.mu.Lock()
	c := a.conn
	clean := false
	if c != nil {
		for _, n := range a.order {
			if v := a.vols[n]; v.mirror && !v.dirty.IsEmpty() {
				a.queueDirtyMap(v, false)
			}
		}
		if len(a.queue) > 0 {
			a.urgent = true // draining: no batching delay
			a.broadcast()
		}
		for a.conn == c && time.Now().Before(deadline) && !a.drainedLocked() {
			a.cond.Wait()
		}
		clean = a.conn == c && a.drainedLocked()
	}
	a.mu.Unlock()
	var err error
	if clean {
		if err = c.send(&wire.AgentShutdown{}); err == nil {
			select {
			case <-c.bye:
				a.log.Info("clean shutdown acknowledged by the hub")
			case <-c.done:
				err = errors.New("repagent: hub closed the connection before acknowledging shutdown")
			case <-time.After(time.Until(deadline) + 5*time.Second):
				err = errors.New("repagent: hub did not acknowledge shutdown")
			}
		}
	} else if c != nil {
		err = errors.New("repagent: queue not drained: unclean shutdown")
	}
	a.Abort()
	if a.al != nil {
		// Clean only when the hub has everything: the next start then
		// resyncs nothing.
		clean, cerr := a.al.Close()
		switch {
		case cerr != nil && !errors.Is(cerr, actlog.ErrClosed):
			a.log.Warn("activity log", "err", cerr)
		case clean:
			a.log.Info("activity log closed clean", "path", a.alPath)
		case !a.alLost.Load():
			a.log.Warn("activity log left dirty: the next start resyncs its hot extents", "path", a.alPath)
		}
	}
	return err
}

// drainedLocked reports whether nothing waits for the hub: no queued or
// unacknowledged frame, no dirty region of a mirrored volume, and every
// protected volume mirrored; a.mu held.
func (a *Agent) drainedLocked() bool {
	if len(a.queue) > 0 {
		return false
	}
	for _, v := range a.vols {
		if len(v.pending) > 0 || (v.opts.Protect && (!v.mirror || !v.dirty.IsEmpty())) {
			return false
		}
	}
	return true
}

// Abort stops the agent without a clean shutdown, as a crash would:
// queued writes are lost and no AGENT_SHUTDOWN is sent. Tests use it.
func (a *Agent) Abort() {
	a.mu.Lock()
	a.stopped = true
	a.broadcast()
	for _, v := range a.vols {
		a.endPacing(v)
	}
	a.mu.Unlock()
	a.runMu.Lock()
	cancel, done := a.cancel, a.runDone
	a.runMu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// rangeLock serialises overlapping sector ranges.
type rangeLock struct {
	mu      sync.Mutex
	cond    *sync.Cond
	held    []span
	waiters int
}

type span struct{ start, end uint64 }

func (l *rangeLock) init() { l.cond = sync.NewCond(&l.mu) }

func (l *rangeLock) overlaps(s span) bool {
	for _, h := range l.held {
		if s.start < h.end && h.start < s.end {
			return true
		}
	}
	return false
}

func (l *rangeLock) lock(sector, sectors uint64) {
	s := span{sector, sector + max(sectors, 1)}
	l.mu.Lock()
	for l.overlaps(s) {
		l.waiters++
		l.cond.Wait()
		l.waiters--
	}
	l.held = append(l.held, s)
	l.mu.Unlock()
}

func (l *rangeLock) unlock(sector, sectors uint64) {
	s := span{sector, sector + max(sectors, 1)}
	l.mu.Lock()
	for i, h := range l.held {
		if h == s {
			l.held[i] = l.held[len(l.held)-1]
			l.held = l.held[:len(l.held)-1]
			break
		}
	}
	if l.waiters > 0 {
		l.cond.Broadcast()
	}
	l.mu.Unlock()
}

var _ io.Closer = (*Agent)(nil)
