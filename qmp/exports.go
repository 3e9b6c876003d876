package qmp

import "time"

// ExportOptions are the settings of block-export-add for a vhost-user-blk
// export, checked for syntax by the server before Exports.Add sees them.
type ExportOptions struct {
	ID       string // the export's id, unique among exports, well formed as QEMU's ids
	NodeName string // the mapper device to export; it exists when Add is called
	Socket   string // path of the unix socket to listen on (addr.path)
	Writable bool   // false: the export is read-only
	// NumQueues is the number of virtqueues, at least 1 (default 1).
	NumQueues int
	// LogicalBlockSize is the block size the guest sees, in bytes: a power
	// of two from 512 to 2 MiB (default 512).
	LogicalBlockSize uint32
	Serial           string // the virtio-blk serial (GET_ID), "" for none
	// NegotiationTimeout is vhost.ExportConfig's (zero: the default); set
	// from the configuration file only.
	NegotiationTimeout time.Duration
}

// ExportInfo is one entry of query-block-exports.
type ExportInfo struct {
	Type         string `json:"type"` // always "vhost-user-blk"
	ID           string `json:"id"`
	NodeName     string `json:"node-name"`
	ShuttingDown bool   `json:"shutting-down"`
}

// Exports is what the daemon provides so that QMP can add and remove
// vhost-user-blk exports; the server never creates sockets itself. Its
// methods may be called concurrently from different clients.
//
// Errors are reported to the client as GenericError with the error's text,
// unless the error is an *Error, whose class is kept.
type Exports interface {
	// Add creates an export and starts listening on o.Socket. The server
	// has already checked that o.ID is well formed and unused and that
	// o.NodeName names a device (read-write if o.Writable).
	Add(o ExportOptions) error
	// Del removes the export with the given id, which exists. mode is
	// "safe" (the default: refuse with an error while a front end is
	// connected) or "hard" (disconnect front ends, then remove), as in
	// qemu-storage-daemon. Del returns once the export is gone and its id
	// can be reused; the server then sends BLOCK_EXPORT_DELETED.
	Del(id, mode string) error
	// List returns every export, sorted by id.
	List() []ExportInfo
}
