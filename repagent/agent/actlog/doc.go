// Package actlog is the replication agent's on-disk activity log of hot
// extents, modelled on DRBD's activity log (drbd_actlog.c, "The Activity
// Log" in the DRBD user guide): a small file per VM that bounds what must be
// resynchronised after the agent dies without a clean shutdown.
//
// # Model
//
// Every volume of the VM is cut into extents of [Config.ExtentSize] bytes
// (4 MiB by default). At most [Config.Extents] extents of all volumes
// together ("al-extents", 1237 by default as in DRBD) are hot. Before the
// first write into a cold extent, the extent is recorded durably: a
// transaction naming it is written to a ring of transaction slots in the log
// file and fdatasync'd before [Log.Begin] returns and the write may proceed.
// A write into an extent that is already hot costs no disk I/O at all.
// Writers that hit cold extents at the same time share one transaction (up
// to 64 extents each): while one transaction is being written, the next
// batch gathers.
//
// Extents cool lazily: an extent leaves the hot set only when its slot is
// needed for a new extent (least recently used first) and only if it is
// quiescent — no write into it is in flight and the hub has acknowledged all
// of its data. The eviction is recorded in the same transaction that records
// the new extent. So at every instant the durable hot set covers every
// extent that may hold data the hub does not have; that set is what the
// agent sends as its dirty map after a crash, and the resync moves only
// those extents (at most Extents × ExtentSize bytes), never the whole volume.
//
// # Use by the agent
//
//	l, rec, err := actlog.Open(path, cfg) // rec: what to resync, per volume
//	tok, err := l.Begin(vol, off, n)      // before the local write; may block on a transaction
//	... local write ...
//	l.End(tok, seq)                       // after it; seq = the mirrored copy's write sequence number
//	l.Ack(seq)                            // the hub's journal holds every write up to seq
//	l.Dirty(vol, off, n)                  // the region went to the dirty bitmap instead of the queue
//	l.Clean(vol, off, n)                  // the hub acknowledged the resync of that region
//	l.Close()                             // marks the log clean when nothing is unacknowledged
//
// An extent is evictable when (1) every [Log.Begin] into it has had its
// [Log.End], (2) the largest sequence number given to End for it is at most
// the largest given to [Log.Ack] (0 means "nothing to wait for", for
// volumes that are not mirrored), and (3) it is not held: [Log.Dirty] holds
// an extent and [Log.Clean] releases it. Extents recovered by [Open] start
// held: the agent calls Clean for each once the hub has acknowledged its
// resync. When every slot is busy, Begin into a cold extent waits until one
// becomes evictable (as DRBD's writers wait on a full activity log).
//
// # Recovery
//
// [Open] reads the log, replays the ring and reports, per volume, the byte
// ranges to resync ([Recovery]). A log that was closed clean reports
// nothing. A log that cannot be trusted — missing, unreadable, wrong magic
// or version, a header that fails its CRC or describes an impossible
// geometry, or a ring whose valid transactions do not name the content of
// every slot — is reported with [VolumeRecovery.Full] set and a reason, so
// the agent falls back to a full resync and logs why. Open then writes a
// fresh log (to a temporary file, fsync, rename, fsync of the directory)
// holding the recovered extents as hot and held, and the volumes that need a
// full resync flagged in its header until [Log.FullResyncDone]: a second
// crash during the resync loses nothing. The new log takes the geometry
// and volume list of the new [Config]; recovered ranges are carried across
// a change of extent size.
//
// # On-disk format
//
// All integers are little-endian; CRCs are CRC-32C (Castagnoli) computed
// over the whole block with the CRC field zero. The file is one 4096-byte
// header followed by Slots transaction slots of 4096 bytes each.
//
// Header (offset 0, 4096 bytes):
//
//	0   [8]byte  magic "VDMACTLG"
//	8   uint32   version (1)
//	12  uint32   CRC-32C of the header block
//	16  uint64   epoch: identifies this incarnation of the log; slots of another epoch are ignored
//	24  uint64   extent size in bytes (a power of two, 4 KiB .. 1 GiB)
//	32  uint32   extents: al-extents, the number of hot-set elements (1 .. 65534)
//	36  uint32   slots in the ring
//	40  uint32   slot size (4096)
//	44  uint32   context entries per transaction (C, 411)
//	48  uint32   update entries per transaction (U, 64)
//	52  uint32   number of volumes (at most 255)
//	56  volumes, packed: uint64 size in bytes, uint8 flags (bit 0: full resync pending),
//	    uint8 name length (1..255), the name bytes
//
// Transaction slot (4096 bytes; transaction number s lives in slot s mod Slots):
//
//	0   uint32   magic 0x58544c41
//	4   uint32   CRC-32C of the slot
//	8   uint64   epoch (must equal the header's)
//	16  uint64   transaction number s (1, 2, ...)
//	24  uint16   kind: 1 update, 2 clean (every element empty)
//	26  uint16   number of updates u (0 .. U)
//	28  uint32   context start: index of the first element of the context
//	32  uint32   number of context entries (min(C, extents))
//	36  uint32   reserved (0)
//	40  U × 12 bytes of updates: uint32 element index, uint64 entry
//	40+12U  C × 8 bytes of context: entries of elements start, start+1, ... (mod extents)
//
// An entry is volume<<48 | extent, or all ones for an empty element. Updates
// set one element each; the context is the content of a window of elements
// after the updates and rolls forward by C elements per transaction, so any
// ceil(extents/C) consecutive transactions name every element. The ring holds
// 2·ceil(extents/C)+2 slots (at least 8), so a torn newest slot or one lost
// slot still leaves a complete window.
//
// Replay: find the valid slot (magic, CRC, epoch, s mod Slots equal to its
// position, counts and indexes in range) with the largest transaction
// number, walk back over consecutive numbers while the slots stay valid, and
// apply the run oldest first (a clean transaction empties every element,
// then the updates, then the context). The log is trusted only if every
// element was named within the run. A transaction is written with one pwrite
// and made durable with fdatasync before any write it admits proceeds, and
// only one is in flight at a time: a torn transaction is the newest one and
// fails its CRC, and none of the writes it would have admitted happened.
package actlog
