// Package qmp is vhostdm's QMP server: QEMU's Machine Protocol
// (QEMU docs/interop/qmp-spec.rst) with vhostdm's device-mapper commands,
// qemu-storage-daemon's export commands and their events.
//
// # Using it
//
// The daemon makes a [Server] over its [mapper.Manager], an [Exports]
// implementation and a quit hook, then serves a unix socket:
//
//	var srv *qmp.Server
//	m := mapper.NewManager(mapper.ManagerOptions{Events: func(e mapper.Event) { srv.MapperEvent(e) }})
//	srv = qmp.NewServer(qmp.Config{Manager: m, Exports: exports, OnQuit: stop, Version: "0.1.0"})
//	l, err := qmp.ListenUnix("/run/vhostdm/qmp.sock") // mode 0600
//	...
//	err = srv.Serve(ctx, l) // until ctx is done
//
// Exports report front ends coming and going with
// srv.Emit(qmp.EventVhostUserConnected, map[string]string{"id": id}).
//
// # Protocol
//
// On connection the server greets:
//
//	{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, "package": "vhostdm 0.1.0"}, "capabilities": []}}
//
// The client must send {"execute": "qmp_capabilities"} first; until then
// every other command fails with CommandNotFound ("Expecting capabilities
// negotiation with 'qmp_capabilities'") and no events are sent. Then:
//
//	-> {"execute": "dm-info", "arguments": {"name": "vm0"}, "id": 1}
//	<- {"return": {"name": "vm0", ...}, "id": 1}
//	-> {"execute": "dm-info", "arguments": {"name": "nope"}}
//	<- {"error": {"class": "DeviceNotFound", "desc": "device nope not found"}}
//	<- {"event": "DM_DEVICE_RESIZED", "data": {...}, "timestamp": {"seconds": 1700000000, "microseconds": 5}}
//
// Messages need no separator; output lines end with CRLF and are ASCII.
// QEMU's single-quoted strings are accepted. Malformed JSON, a message
// larger than Config.MaxMessageBytes or nested deeper than 1024, unknown
// commands and missing, unexpected or wrongly typed arguments get QEMU's
// error class and a text close to QEMU's; the connection is kept. A control
// character other than tab, CR and LF, or a 0xFF byte, resets the parser, as
// in QEMU. The oob capability is not offered. Arguments are checked before
// a command runs, so a rejected command has no effect.
//
// # Errors
//
// CommandNotFound is for unknown commands and negotiation, DeviceNotFound
// for a device that a command names and that does not exist, GenericError
// for everything else, with the mapper's text: an invalid table names its
// line ("load vm0: line 2: gap in table: starts at 2048, previous target
// ends at 1024") and leaves the live table untouched.
//
// # Commands
//
// Sizes, starts and lengths are in 512-byte sectors.
//
//	query-version                      → {"qemu": {"major","minor","micro"}, "package"}
//	query-commands                     → [{"name"}]
//	quit                               → {}, then Config.OnQuit
//	dm-create {name, table?, uuid?, readonly?}    without table: a device with no table
//	dm-load {name, table}              into the inactive slot
//	dm-suspend {name, noflush?}
//	dm-resume {name}                   inactive table goes live
//	dm-reload {name, table}            load, suspend and resume in one step
//	dm-remove {name, force?}
//	dm-message {name, sector, message} → {"reply"}
//	dm-table {name?, showkeys?, inactive?}        → [{"name", "lines": [{"start","length","target","params"}]}]
//	dm-status {name?, inactive?}                  → same shape, INFO form
//	dm-info {name}                     → {"name","uuid","state","readonly","live-table","inactive-table",
//	                                       "open-count","size","event-nr","target-count"}
//	dm-list                            → [{"name","size"}]
//	block-export-add {type: "vhost-user-blk", id, node-name, addr: {type: "unix", path},
//	                  writable?, num-queues?, logical-block-size?, serial?}
//	block-export-del {id, mode?}       mode "safe" (default) or "hard"
//	query-block-exports                → [{"type","id","node-name","shutting-down"}]
//
// dm-table hides key material as dmsetup does (crypt keys, integrity's
// internal_hash, journal_crypt and journal_mac keys are shown as zeros)
// unless showkeys is true. "state" is "ACTIVE" or "SUSPENDED".
//
// # Events
//
//	DM_EVENT {name, target, event, data}         a target's event (mapper.Event)
//	DM_DEVICE_RESIZED {name, old-size, new-size} a resume changed the size
//	BLOCK_EXPORT_DELETED {id}                    after block-export-del
//	VHOST_USER_CONNECTED {id}                    emitted by the daemon
//	VHOST_USER_DISCONNECTED {id}                 emitted by the daemon
//
// Every negotiated client gets every event. An event raised while a command
// runs reaches that command's client before the command's reply. A client
// that stops reading while more than 1024 messages wait for it is
// disconnected, so that Emit never blocks the mapper.
package qmp
