// Package wire is the repagent protocol that carries vhostdm's volumes
// to a hub: frames, messages, their encoding and validation, dirty-region
// maps, and the TLS configuration both ends use. PROTOCOL.md, beside this
// file, documents every frame and field. The agent (repagent/agent) and
// the hub (repagent/hub) speak it; it imports neither.
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
// its connection with a logged reason ([ErrMalformed]).
//
// # Regions
//
// Sectors are 512 bytes ([SectorSize]); sizes on the wire are in
// sectors, dirty maps ([DirtyMap]) in regions of RegionSectors sectors
// (64 KiB by default, [DefaultRegionSectors]). [AddSectors],
// [ExtentsOf] and [AddExtents] convert between sector ranges, region
// bitmaps and the extents a DIRTY_MAP carries.
//
// # Transport
//
// [TLSFiles] loads the PEM files of mutual TLS 1.3; without TLS,
// [CheckPlain] allows plain TCP only on loopback unless told otherwise.
package wire
