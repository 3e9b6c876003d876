// Package agent is the replication agent that runs inside vhostdm: it
// wraps the devices of protected volumes, mirrors their writes to a hub
// over the repagent protocol (repagent/wire), and answers the hub's
// remote reads and writes.
//
// [Agent.Attach] wraps a volume's device. Writes to a protected volume
// complete locally, then a copy is queued (bounded by Config.QueueBytes)
// toward the hub; when the queue is full the write waits for the hub to
// make room. While the hub is away (or makes no room for
// Config.RoomWait), the written regions go into the volume's dirty bitmap
// (64 KiB regions by default) and reach the hub as DIRTY_MAP. Past the volume's [FallBehind]
// threshold writes wait for the hub's WRITE_ACK. Overlapping writes are
// ordered so that the mirror order is the local order. The hub's
// REMOTE_IO_REQ reads only protected volumes (and those it may write) and
// writes only where VolumeOptions.AllowRemoteWrite is set; anything else
// is answered "denied". CSUM_REQ (the hub's online verify and checksum
// resync) is answered with per-region checksums read under the same
// range lock as protected writes, at a named point of the write order,
// queued behind every frame before that point (csum.go). [Agent.Close] drains the queue
// and sends AGENT_SHUTDOWN.
//
// With an activity log the agent also keeps what each protected volume
// maps (VolumeOptions.Backing, beside the log): a volume whose files,
// block devices or rbd: images were written, or files replaced, while the
// daemon did not serve them (a block device's writes as the kernel counts
// them, an image's against the snapshot taken at the stop:
// VolumeOptions.MarkBacking), or whose table maps other storage, is
// reported changed and resynchronised by checksums (backing.go;
// [CheckBacking], [Agent.MarkBackings], [Agent.RecordStop]).
//
// # The write path
//
// A mirrored write is copied once, from guest memory into a pooled data
// buffer; its frame is the slot of a preallocated ring whose position is
// its sequence number, so the guest's path allocates nothing. The ring's
// size is the credit window: a write whose slot still holds a frame the
// hub has not acknowledged waits for the hub. Above three quarters of the
// volume's share of the queue, or with a backlog older than
// Config.PaceAge, completions wait for the hub too (pacing), until an
// acknowledgement brings the backlog under five eighths of the share (and
// PaceAge), which releases them all with one wake-up each. The sender
// writes a batch of frames with one vectored write (writev: headers from
// one buffer, data where it lies, made as a raw system call on the
// non-blocking socket; TLS connections go through a buffer),
// batching on the hub's acknowledgements (Nagle's algorithm clocked by
// WRITE_ACK; the hub acknowledges a group commit with one WRITE_ACK).
//
// # Consistency groups
//
// An agent with Config.Group (the replicator target's repagent site link)
// makes its protected volumes one consistency group: the source calls
// [Agent.MirrorWrite] in its write order across the volumes, [Agent.Sync]
// for durability, and [Agent.SetConsistent] to tell the hub (GROUP_STATE)
// whether the replicas are a prefix of that order.
//
// # Concurrency
//
// Agent methods may be called from any goroutine. The wrapped devices may
// be submitted to concurrently, as mapper devices are; request data is
// copied before Submit returns and never retained.
package agent
