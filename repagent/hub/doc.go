// Package hub is the repagent replication hub's engine and its store: it
// accepts agents (repagent/agent) over the repagent protocol
// (repagent/wire), keeps one recovery volume per protected volume, and
// reports their state. cmd/repagent-hub serves it, with QMP and the
// failover tooling.
//
// The [Hub] keeps, per VM directory of its store, a write journal
// (repagent/hub/journal) and one durable state file per protected volume.
// The network path never writes a replica image: a mirrored write is
// submitted to the VM's journal in the agent's write order and WRITE_ACK
// is sent once its group commit is durable (one acknowledgement per
// commit). The replica images are the journal's base images, advanced by
// its applier once records leave Config.Retain / Config.RetainBytes.
// The connection reads frames into large reused buffers and writes with
// raw read(2) and write(2) calls (internal/rawsock: a non-blocking socket,
// waited for in the Go poller, without waking the runtime's monitor
// thread); the engine
// decodes mirrored writes in place and journals those of one read as one
// submission whose data the journal writes from those buffers.
//
// A resync (remote reads: the initial sync, the agent's DIRTY_MAP, failed
// or discarded writes, a resize) is one resync set in the journal: opened
// when planned, the reads' data as it arrives, mirrored writes meanwhile
// in order — a write into a region whose read is outstanding is held and
// journaled right after that read, so no region is read twice in a pass —
// and closed when nothing is outstanding. The VM's newest consistent
// point stays the one before the set until it is closed; a volume is
// [StateProtecting] only once the close is durable. A region leaves the
// saved list of regions to read only once its data is durable. A journal
// or applier store error (fsync, ENOSPC) puts the VM's volumes in
// [StateStoreError]: nothing more is acknowledged, the agent is told to stop
// mirroring them (STOP_PROTECT: it keeps what was not acknowledged as dirty
// regions) and the connection stays up; the hub reopens the journal with
// backoff (up to Config.StoreRetry) and, once it works, starts protection
// again: the dirty regions are resynced before the volumes are protecting
// (and the journal is reopened when the agent reconnects). After AGENT_SHUTDOWN
// the next connection resumes without resync; after an unclean disconnect
// of the same agent session the hub reads the agent's DIRTY_MAP and what
// was in flight; a new agent session after an unclean end is a full
// resync.
//
// [Hub.Recover] materialises a VM at any consistent point of the journal;
// [Hub.Promote] does so and stops the VM's replication.
//
// # Checksums: online verify and checksum resync
//
// [Hub.Verify] compares a connected VM's volumes with their replicas by
// per-region SHA-256 checksums without moving data (DRBD's online
// verify): CSUM_REQ asks the agent, which hashes under the range lock of
// its protected writes and names the point of its write order; the hub
// hashes the replica at the same point (journal.ReadVolume), so racing
// writes are on both sides or neither. A replica seeded from existing
// images ([Seed]: the old source's disks at a failback), a replica in
// sync whose volume the agent reports changed (REPORT_VM_VOLUMES' CHANGED:
// its backing was written or replaced behind the agent), and with
// Config.CsumResync any replica that would be read in full although it
// holds data, is resynchronised by checksums inside the resync set: only
// regions whose checksums differ are read (DRBD's csums-alg). The plan is
// saved with the regions still to compare before START_PROTECT goes out,
// so a hub that dies before comparing any compares them all when the agent
// comes back. See csum.go.
//
// # Consistency groups
//
// An agent that says so in its HELLO makes its protected volumes one
// consistency group: the hub issues no remote reads for it (the source
// resynchronises), and the source's GROUP_STATE not consistent opens a
// resync set that its GROUP_STATE consistent closes.
//
// # Failover tests
//
// [Hub.FailoverTestAt] materialises the VM at a consistent point into a
// directory and hands the copies to a [TestRunner] that serves them to a
// test VM (the hub's command builds mapper devices and vhost-user
// exports); the live replicas are never served and protection goes on.
//
// # Several hubs, one store
//
// With Config.Shared (repagent-hub on a Ceph pool) several hubs serve one
// store: a hub opens a VM's journal, taking the store's hold on it (the
// Ceph lease), only when the VM's agent attaches, and reads the VM's
// state from the store then; a HELLO for a VM another hub holds is
// refused naming wire.ReasonHeldElsewhere (the agent tries its next hub).
// A hold that is lost ([LeaseHolder]) drops the VM: its connection is
// cut, nothing more is saved for it and its journal is closed.
// [VMStatus].Held says which VMs a hub holds.
//
// # Concurrency
//
// Hub methods may be called from any goroutine.
package hub
