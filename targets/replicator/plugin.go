package replicator

import (
	"github.com/vhostdm/vhostdm/mapper"
)

// Replication log and site link plug-ins (the seed's dm-registry classes
// DM_REPLOG and DM_SLINK). Each class is a mapper.Registry; a new type is
// added by registering it from an init function, without touching the
// targets.

// LogTypes is the registry of replication log types ("ringbuffer").
var LogTypes = mapper.NewRegistry[*LogType]("replication log type")

// SiteLinkTypes is the registry of site link types ("blockdev").
var SiteLinkTypes = mapper.NewRegistry[*SiteLinkType]("site link type")

// LogType is a registered replication log type.
type LogType struct {
	Name    string
	Version [3]int
	// New opens or creates a log from its parameters (those after
	// <#replog_params>). Backends are opened through c.Open.
	New func(c *mapper.Ctx, args []string) (Log, error)
}

// Log is a replication log: a durable journal of entries in sequence order.
// The engine serialises Recover, Reserve, Head, Free and Used under its
// own lock;
// Write and Flush may run concurrently with each other and with Reserve.
type Log interface {
	// Recover reads the log and returns its live entries in sequence order,
	// the sequence number the next entry gets, and the per-site positions
	// recorded by the last checkpoint. Entries' Data may be nil (not cached):
	// ReadData reads it back.
	Recover() (entries []*Entry, next uint64, sites map[uint32]uint64, err error)
	// Reserve places e (Seq, Op, Sectors set) in the log and returns false
	// when there is no room until entries are released.
	Reserve(e *Entry) bool
	// Fits reports whether an entry with data of n bytes can ever fit.
	Fits(n int) bool
	// Write writes a reserved entry (header and data) to the log.
	Write(e *Entry) error
	// ReadData reads back the data of an entry whose Data was dropped.
	ReadData(e *Entry) ([]byte, error)
	// Flush makes every completed Write durable.
	Flush() error
	// Head returns where the next reserved entry will be found: the tail
	// to checkpoint when no entry is live.
	Head() int64
	// Checkpoint durably records that every entry before the one found at
	// tailOff, whose sequence is tailSeq, is applied at every site, with
	// the per-site positions.
	Checkpoint(tailOff int64, tailSeq uint64, sites map[uint32]uint64) error
	// Free releases the space before tail, the first live entry (nil when
	// none is live), after a checkpoint.
	Free(tail *Entry)
	// Used returns the space in use and the capacity, in sectors.
	Used() (used, size uint64)
	// Status returns the log's words for INFO ("ringbuffer <dev> A ...")
	// or TABLE ("ringbuffer 4 <dev> <start> auto <size>").
	Status(kind mapper.StatusKind) string
	// Key identifies the log's storage: two tables naming the same log
	// share one engine.
	Key() any
	// Close releases the log.
	Close() error
}

// Entry is one write (or discard, or write-zeroes) in the log.
type Entry struct {
	Seq     uint64
	Dev     uint32    // the replicator-dev's dev_nr
	Op      mapper.Op // OpWrite, OpDiscard or OpWriteZeroes
	Sector  uint64    // in the replicator-dev
	Sectors uint64
	Data    []byte // OpWrite only; nil once dropped from the cache

	// Placement, owned by the log.
	At   int64 // byte offset where recovery finds the entry (a wrap marker or the entry)
	Pos  int64 // byte offset of the entry header
	Span int64 // bytes the entry holds in the log, wrap padding included
}

// SiteLinkType is a registered site link type.
type SiteLinkType struct {
	Name    string
	Version [3]int
	// New parses a site link's parameters (those after <#slink_params>).
	New func(c *mapper.Ctx, args []string) (SiteLink, error)
}

// Policy is a site link's replication policy with its fall-behind
// threshold (for async links; zero fields are unset).
type Policy struct {
	Sync    bool
	IOs     uint64 // pending entries allowed
	Bytes   uint64 // pending data allowed
	Timeout int64  // nanoseconds an entry may be pending
}

// SiteLink is the configuration of one site link in a replicator table.
type SiteLink interface {
	// Nr returns the site number; 0 is the local site.
	Nr() uint32
	// Policy returns the replication policy.
	Policy() Policy
	// DevParams returns how many <dev_params> a replicator-dev gives for a
	// device at this site.
	DevParams() int
	// OpenDevice opens one replicator-dev's device at this site.
	OpenDevice(c *mapper.Ctx, params []string) (SiteDevice, error)
	// Table returns the link's TABLE words, type name first.
	Table() string
}

// SiteStarter is implemented by site links with state that lives as long
// as their site runs in an engine (a connection to a hub). StartSite is
// called when the site starts (the log is opened, or a reload adds the
// site); the function it returns when the site stops (a reload drops it,
// or the log closes, after its last checkpoint). A reload that keeps the
// site does not call it again: the new table's link finds the state by
// its own configuration.
type SiteStarter interface {
	StartSite() (stop func())
}

// ConsistencyReporter is implemented by site links that tell their site
// whether it holds a prefix of the log order across all devices of the
// log. SetConsistent is called by the site's worker, in order with Apply,
// when the worker starts and whenever that changes: false when the site
// falls back to its dirty logs (failure, pause, log full) or a resync
// starts; true once it is in sync and has applied every entry the local
// devices held when the last region was copied.
type ConsistencyReporter interface {
	SetConsistent(consistent bool)
}

// SiteDevice is one device at a site: where the entries of one
// replicator-dev are applied. Apply and Flush run on the site's worker;
// ReadAt (local site only) runs concurrently with them.
type SiteDevice interface {
	// Apply performs one entry's operation on the device.
	Apply(op mapper.Op, sector, sectors uint64, data []byte) error
	// Flush makes applied entries durable.
	Flush() error
	// Sectors returns the device's size in sectors.
	Sectors() (uint64, error)
	// Table returns the device's TABLE words (<dev_params>).
	Table() []string
}

// LocalDevice is a SiteDevice that can serve reads: the local site's
// devices (slink 0) must be.
type LocalDevice interface {
	SiteDevice
	ReadAt(bufs [][]byte, off int64) error
}
