package qmp

import (
	"io/fs"
	"time"
)

// ExportOptions are the settings of block-export-add for a vhost-user-blk
// or NBD export, checked for syntax by the server before Exports.Add sees
// them.
type ExportOptions struct {
	Type     string // "vhost-user-blk" or "nbd"; "" is vhost-user-blk
	ID       string // the export's id, unique among exports, well formed as QEMU's ids
	NodeName string // the mapper device to export; it exists when Add is called
	Socket   string // path of the unix socket to listen on (addr.path)
	// Listen is host:port of an inet NBD export (addr.host, addr.port);
	// then Socket is empty.
	Listen   string
	Writable bool // false: the export is read-only
	// NBD only: the export name (default the node name), its description,
	// the dirty bitmaps offered as qemu:dirty-bitmap:NAME, and the TLS
	// credentials directory (ca-cert.pem, server-cert.pem, server-key.pem;
	// clients must present certificates unless TLSNoVerifyPeer).
	Name            string
	Description     string
	Bitmaps         []string
	TLSCreds        string
	TLSNoVerifyPeer bool
	// NumQueues is the number of virtqueues, at least 1 (default 1).
	NumQueues int
	// LogicalBlockSize is the block size the guest sees, in bytes: a power
	// of two from 512 to 2 MiB (default 512).
	LogicalBlockSize uint32
	Serial           string // the virtio-blk serial (GET_ID), "" for none
	// SocketOwner and SocketGroup (names or numeric ids, "" for the
	// daemon's own) and SocketMode (default 0600) are the socket file's
	// ownership and mode, checked by the server.
	SocketOwner, SocketGroup string
	SocketMode               fs.FileMode
	// NegotiationTimeout is vhost.ExportConfig's (zero: the default); set
	// from the configuration file only.
	NegotiationTimeout time.Duration
	// Poll is vhost.ExportConfig's (zero: off); set from the
	// configuration file only.
	Poll time.Duration
	// NoAdaptivePoll is vhost.ExportConfig's (adaptive-poll = false); set
	// from the configuration file only.
	NoAdaptivePoll bool
}

// ExportInfo is one entry of query-block-exports.
type ExportInfo struct {
	Type         string `json:"type"` // "vhost-user-blk" or "nbd"
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
