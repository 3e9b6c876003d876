// Package mapper is vhostdm's device-mapper core: tables, the Target
// interface and its registry, backends, and devices with dmsetup's life cycle.
//
// # Units
//
// Sectors are 512 bytes everywhere in this package, as in the kernel's
// device-mapper; quantities in bytes carry "Bytes" in their name or are
// documented as byte offsets (the Backend interface works in bytes).
//
// # Central types
//
//   - [Table] is an ordered list of targets tiling [0, size) sectors. It is
//     built by [ParseTable] and [BuildTable], which validate the whole text
//     before anything changes.
//   - [Target] maps I/O for its sector range. It is made by the constructor of
//     a registered [TargetType]; optional abilities ([Messenger], [Suspender],
//     [AreaLister], [Flusher]) are found by type assertion.
//   - [Backend] is storage a target reads and writes: a regular file, a block
//     device, or another mapper [Device] named /dev/mapper/NAME.
//   - [Device] has a live and an inactive table and dmsetup's life cycle:
//     load, suspend, resume, message, status, remove.
//   - [Manager] holds the devices of one daemon by name and resolves the
//     backend names that tables use.
//   - [IOQueue] is an asynchronous I/O engine (io_uring) a submitter
//     owns; [Device.SubmitAsync] queues on it the reads and writes a table
//     passes unchanged ([Remapper]) to a file or block device.
//
// # Concurrency
//
// [Device.Submit] may be called from many goroutines at once; it blocks while
// the device is suspended and resumes on the new table. Targets' Map methods
// run concurrently with each other. A [Request]'s data slices point into the
// caller's memory (guest memory, for vhost): a target must not retain them
// after Map returns.
package mapper
