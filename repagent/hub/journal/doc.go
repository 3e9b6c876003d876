// Package journal is the per-VM write journal of the repagent hub: an
// append-only log of the mirrored writes of all of a VM's volumes in the
// agent's write order, the consistent points it defines, an applier that
// advances one base image per volume from it, and point-in-time
// materialization.
//
// # Records, positions and consistent points
//
// A Journal holds Records: writes (volume, byte offset, data), write-zeroes
// and discards (volume, offset, length), volume additions and resizes (name,
// size), named checkpoints, and resync-begin / resync-end. Each record
// carries the agent's write-order sequence number where there is one
// (strictly increasing) and a wall-clock time (never decreasing).
//
// A position is a byte offset in the journal's logical stream (segment
// headers not counted). A record's end is a consistent point unless it lies
// inside a resync set: every record from a resync-begin through the
// matching resync-end, ordinary writes interleaved with the resync data
// included, forms one atomic unit, and no position strictly inside it is a
// consistent point. A resync-begin while a set is open extends that set (a
// restarted resync), so a set left open by a crash is closed by the next
// resync-end. A consistent point is the state of all the VM's volumes
// together after one prefix of the write order: a Point (position, sequence
// number, time). Selectors pick one: Newest, AtTime, AtSeq, AtCheckpoint,
// AtPos.
//
// # Group commit
//
// Submit validates and encodes records in call order into the open batch
// and returns a Pending; one writer goroutine writes the batches closed
// since its last commit (one write each, a batch closes at 2 MiB) and makes
// them durable with one fdatasync, then completes every Pending of them:
// while one fdatasync runs, the next commit gathers everything that
// arrives. On the directory store the fdatasync runs in a goroutine of its
// own and the writer writes what arrives meanwhile (closed batches, and the
// open one past 256 KiB), so that a commit waits for one fdatasync and the
// write of at most the rest of the open batch; a record is completed only
// after an fdatasync that began after its write, in order. The directory
// store runs each fdatasync on an io_uring worker while the syncer waits
// in the Go poller (fdatasync(2) where io_uring is unavailable): a
// goroutine blocked in a system call for milliseconds keeps the Go
// runtime's monitor thread polling every 20 µs, a cost the hub pays on
// the cores it shares with the source. Pending.Wait
// returns once the records are durable; the hub sends WRITE_ACK only then.
// Append is Submit plus Wait. SubmitRef does not copy the data of writes:
// the writer writes it from the caller's memory with the batch (one
// writev) and then releases the caller's reference, so a write's bytes
// are copied once on their way from the network to the journal (the hub
// reads frames straight into buffers it lends the journal this way, one
// submission and one reference for all the writes of a read's frames).
// Batch buffers start small (a batch of writes by reference holds only
// their record heads), grow as copied records need, and are reused within
// a bound, not allocated per commit: on a virtual machine a fresh page
// costs a fault, more than the copy into it. The directory store appends
// with O_DIRECT (where the file system takes it; tmpfs before Linux 6.6
// does not), through
// the fsync's io_uring: the batch is copied once into an aligned buffer
// behind the segment's last partial block, which each append rewrites
// with the bytes it held, and the new last block is padded with zeroes.
// No page-cache folio is allocated, written back or dropped per 4 KiB of
// journal, which was half of the hub's CPU under small protected writes.
// A failed write or fdatasync (ENOSPC, EIO) is
// sticky: Err reports it, every later Submit fails with it, and the fsync is
// never retried (after a failed fsync the kernel may have dropped the dirty
// pages).
//
// # Retention and the applier
//
// Options.Retain keeps records for that long; Options.MaxBytes caps the
// unapplied bytes. The applier (a goroutine, every Options.ApplyInterval,
// or ApplyNow) applies the records that left the window, up to the newest
// consistent point among them, to the base images, merging adjacent writes.
// A pass first records its target in the state file (from then on no point
// before the target is recoverable), applies, fsyncs the images, then
// records the new applied position and deletes the segments wholly behind
// it. State file updates are atomic (temporary file, fsync, rename, fsync
// directory). After a crash mid-pass Open redoes the pass from the applied
// position: redo is idempotent when replayed in order. A store error in the
// applier is sticky (ApplyErr) and the applied position never advances
// after it. An open resync set is never applied, so while one stays open the
// journal grows past Retain and MaxBytes.
//
// ReadVolume reads a volume's bytes at a point of the agent's write order
// (the base image overlaid with the records up to it) without
// materialising anything, for the hub's checksums; HoldApply keeps the
// applier from passing a position meanwhile. Seed creates a journal whose
// base images are copies of existing images.
//
// The oldest recoverable point is the applied position; Materialize copies
// the base images (reflink where the file system can) and replays the
// journal up to the selected point into a new directory, never writing the
// base images or the journal.
//
// # On-disk format
//
// A VM's directory holds:
//
//	state.json           applied state (JSON): version, base and target points,
//	                     volumes at the base, checkpoints at the base, names of
//	                     recently expired checkpoints
//	NAME.img             base image of volume NAME, preallocated
//	lock                 empty; flock(LOCK_EX) while a Journal has it open
//	journal/%016x.seg    segment files, named by their start position (hex)
//
// A segment file is a 32-byte header then records, back to back; a record
// never crosses a segment. The segment header (little endian):
//
//	 0      8       12      16             24      28      32
//	+-------+-------+-------+--------------+-------+-------+
//	| magic |version|   0   | start (u64)  | crc32c|   0   |
//	+-------+-------+-------+--------------+-------+-------+
//	magic "VHDMJNL\x00", version 1, crc32c (Castagnoli) of bytes 0-23
//
// A record: a 32-byte header, the name (volume or checkpoint), the body:
//
//	 0       4       8    9     10      12      16         24         32
//	+-------+-------+----+-----+-------+-------+----------+----------+------+------+
//	|  len  | crc32c|kind|flags|namelen|   0   | seq (u64)| time(i64)| name | body |
//	+-------+-------+----+-----+-------+-------+----------+----------+------+------+
//	len: the whole record in bytes; crc32c: over bytes 8 to len;
//	flags bit 0: seq valid; time: Unix nanoseconds
//	body: write: offset u64, data; zero (2), discard (3): offset u64,
//	length u64; volume (7): size u64; resync-begin (4), resync-end (5),
//	checkpoint (6): empty (the checkpoint's name is the name)
//
// Open reads the journal from the applied position: a record that is cut
// short or fails its CRC in the last segment marks a torn tail, which is
// truncated there (nothing after it was acknowledged: group commits are
// sequential and each is synced before it completes); damage anywhere else
// is ErrCorrupt. A segment file may end with fewer than 4096 zero bytes
// after its last record, the padding of an O_DIRECT append: in the last
// segment Open cuts it as it cuts a torn tail; in an earlier one it lies
// past the next segment's start, where readers do not go. FORMAT.md in
// this directory repeats the format.
//
// # Use by the hub
//
// One Journal per VM, opened when the VM first attaches and kept open:
//
//	j, err := journal.Open(filepath.Join(store, vm), journal.Options{Retain: 24 * time.Hour})
//	// REPORT_VOLUMES: a KindVolume record per new or resized volume.
//	// PROTECTED_WRITE: in frame order, from the connection's reader:
//	p, err := j.Submit(journal.Record{Kind: journal.KindWrite, Volume: name,
//		Offset: sector * 512, Data: data, Seq: seq, HasSeq: true})
//	// ... and from an ack goroutine, in the same order:
//	if _, err := p.Wait(ctx); err == nil { /* send WRITE_ACK for seq */ }
//	// A resync: KindResyncBegin, the re-read regions as KindWrite records
//	// without a sequence number (mirrored writes keep theirs, interleaved),
//	// KindResyncEnd once every region is in.
//	// repagent-checkpoint: KindCheckpoint with the operator's name.
//	// Status: j.Newest() (its Time gives the age), j.Stats() for metrics,
//	// j.Err() / j.ApplyErr() for the store-error state.
//	// recover / failover test: j.Materialize(ctx, journal.AtTime(t), dir).
//
// Sequence numbers must strictly increase over the journal's life: a hub
// whose agent restarts its numbering maps them to a continuing sequence.
//
// # Concurrency
//
// All methods of Journal are safe for concurrent use. One process at a time
// may open a VM's directory.
package journal
