// Package frontend is a vhost-user-blk front end, the other side of package
// vhost: it creates memfd guest memory, negotiates features as QEMU does,
// sets up the memory table and the rings with their eventfds, and submits
// virtio-blk requests on any queue, many at a time ([Client], [Dial]). Tests
// drive exports with it without QEMU, and `vhostdm bench` loads any
// vhost-user-blk back end (vhostdm or qemu-storage-daemon) with the same
// workload. [RawConn] and [Client.RawRequest], [Client.SubmitChain] send
// what a hostile front end or driver would.
//
// It speaks the wire through vhost/internal/wire, the same framing and
// message layer as the back end.
package frontend
