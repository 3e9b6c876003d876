// Package hub is the repagent replication hub's engine and its store: it
// accepts agents (repagent/agent) over the repagent protocol
// (repagent/wire), keeps one recovery volume per protected volume, and
// reports their state. cmd/repagent-hub serves it, with QMP and the
// failover tooling.
//
// The [Hub] keeps, per VM directory of its store, one recovery volume
// (preallocated when created: a store without room refuses it) and one
// durable state file per protected volume. A volume is
// synchronised by remote reads (SyncWindow outstanding, SyncChunkSectors
// each) while mirrored writes are applied; regions written during their
// own read are read again, until nothing is left ([StateProtecting]).
// Applied data is fsynced and the state saved before WRITE_ACK, so an
// acknowledged write survives a hub crash. A volume whose store fails
// (an fsync error, no space) goes to [StateStoreError]: its durable state
// stays as last saved, nothing more is acknowledged or marked synced, and
// the hub tries its store again after Config.StoreRetry and at the next
// connection, resuming from that state. After AGENT_SHUTDOWN the next
// connection resumes without resync; after an unclean disconnect of the
// same agent session the hub reads the agent's DIRTY_MAP and what was in
// flight; a new agent session after an unclean end is a full resync.
//
// # Consistency groups
//
// An agent that says so in its HELLO makes its protected volumes one
// consistency group: the hub applies the group's writes in sequence
// order, issues no remote reads for it (the source resynchronises), and
// grants failover tests on copies taken between two applied writes, only
// while the group is consistent by the source's word (GROUP_STATE).
//
// # Failover tests
//
// [Hub.FailoverTest] decides which recovery volumes are consistent and
// hands them to a [TestRunner] that serves them to a test VM (the hub's
// command builds mapper devices and vhost-user exports); what the test VM
// writes, and what is mirrored meanwhile, is read from the source again
// after [Hub.FailoverTestStop].
//
// # Concurrency
//
// Hub methods may be called from any goroutine.
package hub
