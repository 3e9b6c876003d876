// Package vhost serves mapper devices to QEMU over vhost-user-blk: the
// back-end side of the vhost-user protocol (QEMU docs/interop/vhost-user.rst),
// guest memory, split and packed virtqueues, the queue runtime and the virtio-blk
// device (virtio 1.x, block device section). The front end that drives any
// vhost-user-blk back end (this one or qemu-storage-daemon) for tests and
// `vhostdm bench` is package vhost/frontend; both sides share the wire
// layer in vhost/internal/wire (vhost-user messages and their framing) and
// vhost/internal/virtio (ring and virtio-blk layouts).
//
// # Central types
//
//   - [Export] is one unix socket serving one [Device] (a *mapper.Device) to
//     one front end at a time; [NewExport], [Export.Serve], [Export.Close].
//     A second front end is refused while one is served, queued while the
//     previous one goes away (admit.go); one that does not send SET_OWNER
//     within the negotiation timeout is disconnected.
//   - [Mem] is a guest memory table.
//   - conn is one front end's connection: a table (handlers) maps each
//     request code to one method; wire.Conn reads and writes the messages.
//   - queue is one virtqueue's runtime, requestHandler the device it
//     serves (blkDev, the virtio-blk semantics).
//
// # Layers
//
// internal/wire decodes messages (exact sizes first, then syntax) and says
// which carry fds and which have a reply; conn.go owns a connection's
// negotiated state and checks semantics, one method per request;
// queueconf.go is the only way it changes a queue; queue.go is the queue
// runtime (ring goroutine, worker hand-off, batched completion), which
// walks chains and hands each request to a requestHandler; blk.go is that
// handler, the virtio-blk device, which sees only validated values and
// reaches guest memory only through [Mem]; vring.go walks descriptor chains
// and moves ring indices; inflight.go keeps the shared inflight region that
// lets a restarted back end resubmit what was in flight.
//
// # Packed virtqueues
//
// DESIGN: packed.go is the packed ring (VIRTIO_F_RING_PACKED) behind a
// narrow seam in the runtime: a queue has q.packed set while the packed
// layout is negotiated, and the runtime asks it to drain (drainPacked),
// walk and salvage a chain (queue.walk, queue.salvage), put a used element
// and publish; request table, hand-off, batching, engine and completion
// are shared with the split ring. Requests are kept by buffer id, which
// must be below the queue size. A packed chain is walked when it is popped,
// from a copy of its ring descriptors, because later used elements may
// overwrite its slots. Both positions (with their wrap counters) live in
// the device: the vring base carries them (avail in bits 0-15, used in
// 16-31, as QEMU encodes them), and inflight_packed.go keeps them, with a
// copy of every chain in flight, in the inflight region, so that a back
// end that died is replaced without loss even though QEMU then sends the
// base it had when the dead one started. Event suppression: the device
// structure asks for kicks past the avail position (event idx) or on every
// buffer; the driver's says when to interrupt, checked once per published
// batch as the split ring's used_event is.
//
// # Concurrency
//
// Each connection has one goroutine that reads messages and owns the
// connection's state. Each started queue has a ring goroutine that pops
// descriptor chains one at a time (it looks at a stop request between
// requests), each with a chain buffer from the queue's bounded pool
// (maxChainBufs). It runs reads and writes to completion itself when the
// device can serve them without blocking (NowaitDevice: remapping targets,
// the page cache) and hands every other request to worker goroutines, so
// that a slow request never stalls its queue; requests run concurrently on
// the mapper device and complete out of order, and the used index is
// published, and the call eventfd signalled, once per batch. A change of memory table, log or ring
// address pauses the queues and waits for their requests first, so that
// guest memory is never touched after it is unmapped.
//
// Raw system calls. A system call the ring goroutine makes through the Go
// scheduler (syscall.Syscall) wakes the runtime's monitor thread when the
// process was idle, which then polls for about a millisecond: with a guest
// that sends one or two requests at a time that is most of the back end's
// CPU (docs/PERFORMANCE.md). So the ring goroutine's calls that cannot
// block are raw (unix.RawSyscall): the kick read (RWF_NOWAIT), the call
// eventfd's io_uring submission, and the RWF_NOWAIT reads and writes of
// requests whose guest memory is resident. A raw call that blocked would
// hold its P for that long; RWF_NOWAIT I/O never waits for a disk, but the
// kernel's copy to or from guest memory can fault, and for memory mapped
// from a regular file on a disk file system the fault may read or write
// that file. At SET_MEM_TABLE and ADD_MEM_REG every region's fd is checked
// with fstatfs: a table is resident when every region is on tmpfs or
// shmem (memfd, /dev/shm) or hugetlbfs, the file systems whose faults do
// no file I/O (Mem.resident, memRegion.resident), and only then are the
// requests' data calls raw (mapper.Request.Resident); otherwise they go
// through the scheduler as before. Descriptors and rings are read in
// place either way.
//
// # Errors
//
// Errors have a blast radius. A bad descriptor chain or request fails that
// request alone (status IOERR or UNSUPP); a ring whose indices are
// nonsense is stopped and its error eventfd signalled; a malformed message
// closes the connection with a logged reason, and the export accepts the
// next front end. Nothing a front end sends ends the process.
//
// Memory the front end shares (guest memory, the dirty log) may shrink
// under the back end. Every goroutine that touches it runs with
// debug.SetPanicOnFault, so a fault is a panic: the goroutine recovers, the
// device is marked dead (queueRuntime.fault) and the front end disconnected. From
// then on nothing touches that memory again: requests still in flight
// complete without a used element and are only accounted, so that the
// queues stop and the export serves the next front end. Locks around
// shared-memory accesses are released by defer. The inflight region must
// be a sealed memfd, so it cannot shrink. Call and error eventfds are
// written through an io_uring of their own, which never blocks the
// submitter, or, once the front end has cleared O_NONBLOCK on the file
// description it shares (it can then keep the counter full, and no
// write(2) is safe from that), by a goroutine of their own (notify.go);
// the kick eventfd is read with RWF_NOWAIT: nothing the front end does to
// its fds parks a goroutine the connection waits for.
//
// # Units
//
// Virtio-blk sectors are 512 bytes whatever the logical block size; sizes
// named ...Size or n are bytes; guest addresses (GPA) and front-end user
// addresses are bytes.
package vhost
