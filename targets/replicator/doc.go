// Package replicator holds the replicator and replicator-dev targets (the
// seed's dm-replicator, never merged into Linux): a replication log that
// journals every write of a group of devices in one order, and site links
// that copy the log to the local devices and to remote sites, each with a
// sync or async policy and a fall-behind threshold.
//
//	import _ "github.com/vhostdm/vhostdm/targets/replicator"
//
// # Central types
//
//   - The replicator target loads a replication log ([LogTypes]:
//     "ringbuffer") and its site links ([SiteLinkTypes]: "blockdev"). Both
//     are plug-in classes in mapper registries (the seed's dm-registry).
//   - The replicator-dev target is one replicated device: it names the
//     replicator device (/dev/mapper/NAME), its dev_nr, and its device and
//     dirty log at each site.
//   - An engine is the state one log shares between every table naming it
//     (found through mapper.Ctx.Shared by the log's storage and by the
//     replicator device's name): the in-memory index of live entries, one
//     worker goroutine per remote site, the group-commit flusher and the
//     checkpointer.
//
// # Write path
//
// A write is copied into a log entry, given the next sequence number and
// written to the log; a group commit makes it durable; it is then applied
// to the local device (after earlier overlapping entries of the same
// device); the write completes when every sync site, and every async site
// over its fall-behind threshold, has applied it. Remote sites apply
// entries strictly in sequence order, across all devices of the log, and
// never before they are durable in the log.
//
// # Concurrency
//
// Map runs concurrently from many goroutines. Engine state is guarded by
// one mutex with a condition variable; no backend I/O is done under it.
// Site workers own their site's devices; the local devices are written by
// the writers themselves.
package replicator
