// Package repagent replicates vhostdm's volumes to a hub: the wire
// protocol, the Agent that runs inside vhostdm, and the Hub engine that
// cmd/repagent-hub serves. PROTOCOL.md documents every frame and field.
//
// # Frames
//
// Every frame is a 24-byte little-endian header and a payload:
//
//	0       4   5   6       8               16      20      24
//	+-------+---+---+-------+---------------+-------+-------+----------...
//	| "RPAG"|ver|cmd| flags |      seq      |  len  | 0     | payload
//	+-------+---+---+-------+---------------+-------+-------+----------...
//
// [Reader] checks magic, version, command, the reserved word and the
// length (against a maximum, before allocating); [Decode] checks a
// payload's syntax by command; the agent and the hub check volume ids and
// ranges against what was reported. A frame that fails any check closes
// its connection with a logged reason.
//
// # Agent
//
// [Agent.Attach] wraps a volume's device. Writes to a protected volume
// complete locally, then a copy is queued (bounded by
// AgentConfig.QueueBytes) toward the hub; when the queue is full or the hub
// away, the written regions go into the volume's dirty bitmap (64 KiB
// regions by default) and reach the hub as DIRTY_MAP. Past the volume's
// [FallBehind] threshold writes wait for the hub's WRITE_ACK. Overlapping
// writes are ordered so that the mirror order is the local order. The
// hub's REMOTE_IO_REQ reads any reported volume and writes only where
// VolumeOptions.AllowRemoteWrite is set. [Agent.Close] drains the queue
// and sends AGENT_SHUTDOWN.
//
// # Hub
//
// The [Hub] keeps, per VM directory of its store, one sparse recovery
// volume and one durable state file per protected volume. A volume is
// synchronised by remote reads (SyncWindow outstanding, SyncChunkSectors
// each) while mirrored writes are applied; regions written during their
// own read are read again, until nothing is left ("protecting"). Applied
// data is fsynced and the state saved before WRITE_ACK, so an
// acknowledged write survives a hub crash. After AGENT_SHUTDOWN the next
// connection resumes without resync; after an unclean disconnect of the
// same agent session the hub reads the agent's DIRTY_MAP and what was in
// flight; a new agent session after an unclean end is a full resync.
//
// # Consistency groups
//
// An agent with AgentConfig.Group (the replicator's repagent site link)
// makes its protected volumes one consistency group: the source calls
// [Agent.MirrorWrite] in its write order across the volumes, [Agent.Sync]
// for durability, and [Agent.SetConsistent] to tell the hub (GROUP_STATE)
// whether the replicas are a prefix of that order. The hub applies the
// group's writes in sequence order, issues no remote reads for it (the
// source resynchronises), and runs failover tests on copies taken between
// two applied writes, only while the group is consistent.
//
// # Units and concurrency
//
// Sectors are 512 bytes; sizes on the wire are in sectors, dirty maps in
// regions of DirtyMap.RegionSectors. Agent and Hub methods may be called
// from any goroutine. The agent's wrapped devices may be submitted to
// concurrently, as mapper devices are; request data is copied before
// Submit returns and never retained.
package repagent
