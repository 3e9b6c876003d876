package wire

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"
)

// Wire constants. They are the protocol: changing one changes the format
// (see PROTOCOL.md).
const (
	// Magic is the first four bytes of every frame: "RPAG".
	Magic uint32 = 'R' | 'P'<<8 | 'A'<<16 | 'G'<<24
	// Version is the frame format's version, in every frame header. It
	// stays 1: newer commands are announced by a HELLO's max-version
	// (MaxVersion), never by the header, so that an older peer reads
	// every frame it can understand.
	Version uint8 = 1
	// MaxVersion is the protocol level this package speaks, sent in
	// HELLO: 1 is commands 1 to 13; 2 adds CSUM_REQ and CSUM_RES (online
	// verify and checksum resync); 3 adds REPORT_VM_VOLUMES' CHANGED
	// flag (VolumeInfo.Changed). A side sends what a level adds only to
	// a peer whose HELLO said that level or more.
	MaxVersion uint16 = 3
	// HeaderSize is the size of the fixed frame header in bytes.
	HeaderSize = 24
	// DefaultMaxPayload bounds a frame's payload unless configured otherwise.
	DefaultMaxPayload = 16 << 20
	// MaxHelloPayload bounds every frame a peer reads before the other
	// side's HELLO: nothing larger is allocated for a peer that has not
	// said who it is.
	MaxHelloPayload = 4 << 10
	// MaxNameLen bounds VM and volume names in bytes.
	MaxNameLen = 128
	// MaxVolumes bounds the volumes of one REPORT_VM_VOLUMES.
	MaxVolumes = 256
	// MaxIOSectors bounds the data of one PROTECTED_WRITE, REMOTE_IO_REQ or
	// REMOTE_IO_RES: 8 MiB. Longer writes are sent as several frames.
	MaxIOSectors = 16384
	// SectorSize is the unit of every sector number and count on the wire.
	SectorSize = 512
)

// Cmd is a frame's command. Numbers 1 to 7 are the repagent RFC's.
type Cmd uint8

// The commands. The direction is agent → hub unless noted.
const (
	CmdHello          Cmd = 1  // both ways: identity and version
	CmdProtectedWrite Cmd = 2  // a mirrored write
	CmdReportVolumes  Cmd = 3  // every exported volume
	CmdStartProtect   Cmd = 4  // hub → agent: volume name → volume id
	CmdRemoteIOReq    Cmd = 5  // hub → agent: read or write a volume
	CmdRemoteIORes    Cmd = 6  // answer to CmdRemoteIOReq
	CmdAgentShutdown  Cmd = 7  // clean stop; the hub answers with FlagReply
	CmdStopProtect    Cmd = 8  // hub → agent: stop mirroring a volume
	CmdWriteAck       Cmd = 9  // hub → agent: mirrored writes applied up to Seq
	CmdDirtyMap       Cmd = 10 // regions changed and not mirrored
	CmdHeartbeat      Cmd = 11 // both ways: liveness; the agent's carries its backlog
	CmdGroupState     Cmd = 12 // agent → hub: whether a consistency group's replicas are a prefix of its write order
	CmdCheckpoint     Cmd = 13 // agent → hub: a named point in the write stream of all the VM's volumes
	CmdCsumReq        Cmd = 14 // hub → agent: checksums of a run of regions (protocol level 2)
	CmdCsumRes        Cmd = 15 // answer to CmdCsumReq, ordered after every frame before its point
	CmdRefused        Cmd = 16 // hub → agent: the HELLO is not accepted, and why; the hub closes the connection
	maxCmd                = CmdRefused
)

var cmdNames = [...]string{"", "HELLO", "PROTECTED_WRITE", "REPORT_VM_VOLUMES", "START_PROTECT",
	"REMOTE_IO_REQ", "REMOTE_IO_RES", "AGENT_SHUTDOWN", "STOP_PROTECT", "WRITE_ACK", "DIRTY_MAP", "HEARTBEAT",
	"GROUP_STATE", "CHECKPOINT", "CSUM_REQ", "CSUM_RES", "REFUSED"}

// String returns the command's protocol name.
func (c Cmd) String() string {
	if c >= 1 && c <= maxCmd {
		return cmdNames[c]
	}
	return fmt.Sprintf("CMD(%d)", uint8(c))
}

// Frame flags. Each command accepts only the flags listed for it.
const (
	// FlagReply marks the hub's answer to HELLO and AGENT_SHUTDOWN.
	FlagReply uint16 = 0x8000
	// FlagZeroes marks a PROTECTED_WRITE of a write-zeroes request: no data.
	FlagZeroes uint16 = 0x0001
	// FlagDiscard marks a PROTECTED_WRITE of a discard: no data, and the
	// content of the range is whatever the source now reads.
	FlagDiscard uint16 = 0x0002
	// FlagMirror marks a START_PROTECT that starts mirroring; without it
	// the volume only gets an id for remote IO.
	FlagMirror uint16 = 0x0001
	// FlagZero marks a REMOTE_IO_RES whose data is all zero and omitted.
	FlagZero uint16 = 0x0001
	// FlagWritten marks the REMOTE_IO_RES of a write: no data follows.
	FlagWritten uint16 = 0x0002
	// FlagInitial marks the DIRTY_MAP that answers START_PROTECT.
	FlagInitial uint16 = 0x0001
	// FlagGroup marks an agent's HELLO: its protected volumes are one
	// consistency group whose source resynchronises them itself (the hub
	// reads nothing) and reports the group's state with GROUP_STATE.
	FlagGroup uint16 = 0x0001
	// FlagConsistent marks a GROUP_STATE whose group is consistent.
	FlagConsistent uint16 = 0x0001
	// FlagRefused marks the hub's CHECKPOINT that refuses the agent's
	// checkpoint of the same sequence number: its name is already used
	// in the VM's journal.
	FlagRefused uint16 = 0x0001
)

// I/O status values of PROTECTED_WRITE and REMOTE_IO_RES.
const (
	StatusOK      int32 = 0
	StatusIOError int32 = 1 // the local I/O failed
	StatusDenied  int32 = 2 // remote IO the volume does not allow (see PROTOCOL.md)
)

// ErrMalformed is wrapped by every error about a frame that breaks the
// protocol's syntax; such a frame closes the connection.
var ErrMalformed = errors.New("malformed frame")

// Malformed returns an error about a frame that breaks the protocol; it
// wraps ErrMalformed.
func Malformed(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrMalformed)
}

var le = binary.LittleEndian

// Header is the fixed part of a frame:
//
//	0       4   5   6       8               16      20      24
//	+-------+---+---+-------+---------------+-------+-------+
//	| magic |ver|cmd| flags |      seq      |  len  |  rsv  |
//	+-------+---+---+-------+---------------+-------+-------+
type Header struct {
	Version uint8
	Cmd     Cmd
	Flags   uint16
	Seq     uint64 // sequence number or request id, by command
	Len     uint32 // payload bytes
}

func (h Header) put(b []byte) {
	le.PutUint32(b[0:], Magic)
	b[4] = h.Version
	b[5] = byte(h.Cmd)
	le.PutUint16(b[6:], h.Flags)
	le.PutUint64(b[8:], h.Seq)
	le.PutUint32(b[16:], h.Len)
	le.PutUint32(b[20:], 0)
}

// ParseHeader decodes and checks a frame header: magic, version, command,
// reserved bytes and the payload length against maxPayload.
func ParseHeader(b []byte, maxPayload uint32) (Header, error) {
	if len(b) != HeaderSize {
		return Header{}, Malformed("header of %d bytes, want %d", len(b), HeaderSize)
	}
	if m := le.Uint32(b); m != Magic {
		return Header{}, Malformed("bad magic %#08x", m)
	}
	h := Header{Version: b[4], Cmd: Cmd(b[5]), Flags: le.Uint16(b[6:]), Seq: le.Uint64(b[8:]), Len: le.Uint32(b[16:])}
	if h.Version != Version {
		return h, Malformed("unsupported protocol version %d (want %d)", h.Version, Version)
	}
	if h.Cmd < 1 || h.Cmd > maxCmd {
		return h, Malformed("unknown command %d", uint8(h.Cmd))
	}
	if r := le.Uint32(b[20:]); r != 0 {
		return h, Malformed("%s: reserved header bytes %#x not zero", h.Cmd, r)
	}
	if h.Len > maxPayload {
		return h, Malformed("%s: payload of %d bytes exceeds the maximum of %d", h.Cmd, h.Len, maxPayload)
	}
	return h, nil
}

// Frame is a header and its payload.
type Frame struct {
	Header
	Payload []byte
}

// Reader reads frames from a stream. It is not safe for concurrent use.
type Reader struct {
	br      *bufio.Reader
	max     uint32
	hdr     [HeaderSize]byte
	buf     []byte
	noReuse bool   // every payload gets its own buffer
	slab    []byte // noReuse: small payloads are cut from it
	pool    chan []byte
}

// slabSize is the chunk KeepPayloads cuts payloads of up to slabMax bytes
// from: one allocation for many small frames.
const (
	slabSize = 1 << 20
	slabMax  = 64 << 10
)

// reuseLimit is the largest payload buffer a Reader keeps between frames.
const reuseLimit = 4 << 20

// NewReader returns a Reader that refuses payloads over maxPayload bytes
// (DefaultMaxPayload when 0) before allocating anything for them.
func NewReader(r io.Reader, maxPayload uint32) *Reader {
	if maxPayload == 0 {
		maxPayload = DefaultMaxPayload
	}
	return &Reader{br: bufio.NewReaderSize(r, 256<<10), max: maxPayload}
}

// Buffered returns the number of bytes already read from the stream and
// not yet returned in a frame.
func (r *Reader) Buffered() int { return r.br.Buffered() }

// SetMaxPayload changes the payload bound for later frames
// (DefaultMaxPayload when 0).
func (r *Reader) SetMaxPayload(maxPayload uint32) {
	if maxPayload == 0 {
		maxPayload = DefaultMaxPayload
	}
	r.max = maxPayload
}

// KeepPayloads makes every later payload its own buffer, so that a frame
// stays valid after the next ReadFrame (the hub hands payloads to other
// goroutines).
func (r *Reader) KeepPayloads() { r.noReuse = true }

// RecyclePayloads makes a Reader that keeps payloads take the buffers of
// large ones (over 64 KiB) from pool when it holds one big enough; the
// consumer puts a payload back into pool (without blocking) once nothing
// refers to it. Reused buffers spare the allocation and, more costly on
// some hypervisors, the page faults of fresh memory for every frame.
func (r *Reader) RecyclePayloads(pool chan []byte) { r.pool = pool }

// ReadFrame reads the next frame. The payload is valid until the next call.
// Errors about the frame itself wrap ErrMalformed; a stream that ends
// between frames returns io.EOF, one that ends inside a frame
// io.ErrUnexpectedEOF.
func (r *Reader) ReadFrame() (Frame, error) {
	if _, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
		return Frame{}, err
	}
	h, err := ParseHeader(r.hdr[:], r.max)
	if err != nil {
		return Frame{}, err
	}
	var p []byte
	switch n := int(h.Len); {
	case n <= reuseLimit && !r.noReuse:
		if cap(r.buf) < n {
			r.buf = make([]byte, n, max(n, 64<<10))
		}
		p = r.buf[:n]
	case n <= slabMax && r.max > MaxHelloPayload: // not before HELLO
		if len(r.slab) < n {
			r.slab = make([]byte, slabSize)
		}
		p = r.slab[:n:n]
		r.slab = r.slab[n:]
	default:
		if r.pool != nil && n > slabMax {
			select {
			case b := <-r.pool:
				if cap(b) >= n {
					p = b[:n]
				}
			default:
			}
		}
		if p == nil {
			p = make([]byte, n)
		}
	}
	if _, err := io.ReadFull(r.br, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	return Frame{Header: h, Payload: p}, nil
}

// Message is a decoded frame. The pointer types in this file implement it.
type Message interface {
	Cmd() Cmd
	// encode appends the fixed part of the payload to b and returns it
	// with the header's flags and seq and the data that follows.
	encode(b []byte) (out []byte, flags uint16, seq uint64, data [][]byte)
}

// Hello opens a connection (agent → hub) and answers it (hub → agent, with
// Reply set).
type Hello struct {
	Reply      bool
	Group      bool     // agent only: a consistency group (FlagGroup)
	MaxVersion uint16   // the highest protocol version the sender speaks
	Session    uint64   // agent: random per agent process; hub: per hub process
	UUID       [16]byte // the VM's UUID; zero in the hub's answer
	Name       string   // the VM's name; the hub's name in the answer
}

// ProtectedWrite is one mirrored write (or write-zeroes, or discard).
type ProtectedWrite struct {
	Seq     uint64 // > 0, increasing over the agent's session
	Volume  uint64
	Sector  uint64
	Sectors uint32
	Status  int32 // StatusOK, or the local write failed and no data follows
	Zeroes  bool  // write-zeroes: no data
	Discard bool  // discard: no data
	Data    [][]byte
}

// VolumeInfo is one entry of ReportVolumes.
type VolumeInfo struct {
	Name        string
	Sectors     uint64
	ReadOnly    bool
	Protect     bool // the agent asks the hub to protect (mirror) it
	RemoteWrite bool // REMOTE_IO_REQ writes are allowed
	// Changed (level 3, protected volumes only): the volume's data may
	// have changed without mirrored writes — its backing was modified
	// while the agent did not serve it, or is another one than the
	// agent last served under this name — so the hub's replica must not
	// be trusted: the hub resynchronises the volume in full, comparing
	// checksums where the replica holds data.
	Changed bool
}

// Volume flags on the wire.
const (
	volReadOnly    = 1 << 0
	volProtect     = 1 << 1
	volRemoteWrite = 1 << 2
	volChanged     = 1 << 3
	volFlags       = volReadOnly | volProtect | volRemoteWrite | volChanged
)

// ReportVolumes lists every volume the agent serves.
type ReportVolumes struct {
	// Gen (level 3, the header's seq) numbers the agent's reports on a
	// connection, increasing; 0 to a hub below level 3.
	Gen     uint64
	Volumes []VolumeInfo
}

// StartProtect assigns a volume id to a reported volume and, with Mirror,
// starts mirroring its writes.
type StartProtect struct {
	Volume uint64 // > 0
	Name   string
	Mirror bool
	// Gen (level 3, the header's seq) is the Gen of the report this
	// answers; 0 when the hub does not say (a peer below level 3).
	Gen uint64
}

// RemoteIOReq asks the agent to read or write a volume.
type RemoteIOReq struct {
	ID      uint64
	Volume  uint64
	Sector  uint64
	Sectors uint32
	Write   bool
	Data    [][]byte // writes only
}

// RemoteIORes answers a RemoteIOReq.
type RemoteIORes struct {
	ID      uint64
	Volume  uint64
	Status  int32
	Sectors uint32   // the request's length
	Zero    bool     // a read of zeros: no data follows
	Written bool     // the answer to a write: no data follows
	Data    [][]byte // successful reads that are not Zero
}

// AgentShutdown announces a clean stop (agent → hub) and acknowledges it
// once the hub has recorded it (hub → agent, Reply set).
type AgentShutdown struct {
	Reply bool
}

// StopProtect stops mirroring a volume.
type StopProtect struct {
	Volume uint64
}

// WriteAck tells the agent that every mirrored write up to Seq is applied
// to the recovery volumes and recorded durably.
type WriteAck struct {
	Seq uint64
}

// Extent is a run of Count regions from Start.
type Extent struct {
	Start, Count uint64
}

// DirtyMap lists regions of a volume that changed without being mirrored.
// It takes a sequence number from the same series as ProtectedWrite, so
// that WRITE_ACK tells the agent the hub has recorded it.
type DirtyMap struct {
	Seq           uint64
	Volume        uint64
	Initial       bool   // the answer to START_PROTECT
	RegionSectors uint32 // a power of two from 8 to 1<<21
	Extents       []Extent
}

// Backlog is one volume's mirroring backlog in a Heartbeat.
type Backlog struct {
	Volume    uint64
	IOs       uint64 // mirrored writes not yet acknowledged
	Bytes     uint64 // their bytes
	AgeMillis uint32 // age of the oldest
	Sync      bool   // past the fall-behind threshold: mirroring synchronously
}

// Heartbeat keeps a connection alive; the agent's carries its backlog.
type Heartbeat struct {
	Backlog []Backlog
}

// GroupState tells the hub whether, once every frame before it is
// applied, the recovery volumes of a consistency group (a FlagGroup
// agent's protected volumes) hold a prefix of the group's write order
// (Consistent) or not (the source is resynchronising them). It takes a
// sequence number from the PROTECTED_WRITE series, so that it is ordered
// with the writes and WRITE_ACK covers it.
type GroupState struct {
	Seq        uint64
	Consistent bool
}

// Cmd implements Message.
func (*GroupState) Cmd() Cmd { return CmdGroupState }

func (m *GroupState) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	return b, flagIf(m.Consistent, FlagConsistent), m.Seq, nil
}

// MaxCheckpointName is the longest checkpoint name, in bytes.
const MaxCheckpointName = 64

// Checkpoint names a point in the agent's write stream (the state of all
// its volumes after every frame before it). It takes a sequence number
// from the PROTECTED_WRITE series, so it is ordered with the writes and
// WRITE_ACK covers it. The name is 1 to MaxCheckpointName bytes of ASCII
// letters, digits, '.', '_' and '-'. From the hub, with Refused, it
// refuses the agent's checkpoint of that sequence number and name (the
// name is already used in the VM's journal); WRITE_ACK still covers the
// sequence number.
type Checkpoint struct {
	Seq     uint64
	Name    string
	Refused bool
}

// Cmd implements Message.
func (*Checkpoint) Cmd() Cmd { return CmdCheckpoint }

func (m *Checkpoint) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	return appendName(b, m.Name), flagIf(m.Refused, FlagRefused), m.Seq, nil
}

// MaxReasonLen is the longest REFUSED reason, in bytes.
const MaxReasonLen = 512

// Refused is the hub's answer to a HELLO it does not accept (the VM was
// promoted on the hub, its UUID differs, the certificate is not
// authorised for it): Reason says why, in 1 to MaxReasonLen bytes of
// printable ASCII. The hub closes the connection after it.
type Refused struct {
	Reason string
}

// Cmd implements Message.
func (*Refused) Cmd() Cmd { return CmdRefused }

func (m *Refused) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	return appendName(b, m.Reason), 0, 0, nil
}

// ReasonHeldElsewhere is in the REFUSED reason of a HELLO for a VM that
// another hub sharing the store holds (its lease): an agent with several
// hubs tries the next.
const ReasonHeldElsewhere = "held by another hub"

// Reason fits s into a REFUSED reason: bytes that are not printable
// ASCII become '?', and it is cut at MaxReasonLen bytes.
func Reason(s string) string {
	b := []byte(s)
	if len(b) > MaxReasonLen {
		b = b[:MaxReasonLen]
	}
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			b[i] = '?'
		}
	}
	if len(b) == 0 {
		return "refused"
	}
	return string(b)
}

// CheckCheckpointName checks a checkpoint name.
func CheckCheckpointName(s string) error {
	if s == "" || len(s) > MaxCheckpointName {
		return fmt.Errorf("must be 1 to %d bytes", MaxCheckpointName)
	}
	if s == "." || s == ".." {
		return errors.New("not a valid name")
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("contains %q: only letters, digits, '.', '_' and '-'", c)
		}
	}
	return nil
}

// Cmd implements Message.
func (*Hello) Cmd() Cmd { return CmdHello }

// Cmd implements Message.
func (*ProtectedWrite) Cmd() Cmd { return CmdProtectedWrite }

// Cmd implements Message.
func (*ReportVolumes) Cmd() Cmd { return CmdReportVolumes }

// Cmd implements Message.
func (*StartProtect) Cmd() Cmd { return CmdStartProtect }

// Cmd implements Message.
func (*RemoteIOReq) Cmd() Cmd { return CmdRemoteIOReq }

// Cmd implements Message.
func (*RemoteIORes) Cmd() Cmd { return CmdRemoteIORes }

// Cmd implements Message.
func (*AgentShutdown) Cmd() Cmd { return CmdAgentShutdown }

// Cmd implements Message.
func (*StopProtect) Cmd() Cmd { return CmdStopProtect }

// Cmd implements Message.
func (*WriteAck) Cmd() Cmd { return CmdWriteAck }

// Cmd implements Message.
func (*DirtyMap) Cmd() Cmd { return CmdDirtyMap }

// Cmd implements Message.
func (*Heartbeat) Cmd() Cmd { return CmdHeartbeat }

func flagIf(b bool, f uint16) uint16 {
	if b {
		return f
	}
	return 0
}

func appendName(b []byte, s string) []byte {
	b = le.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func (m *Hello) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint64(b, m.Session)
	b = append(b, m.UUID[:]...)
	b = le.AppendUint16(b, m.MaxVersion)
	return appendName(b, m.Name), flagIf(m.Reply, FlagReply) | flagIf(m.Group, FlagGroup), 0, nil
}

func (m *ProtectedWrite) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint64(b, m.Volume)
	b = le.AppendUint64(b, m.Sector)
	b = le.AppendUint32(b, m.Sectors)
	b = le.AppendUint32(b, uint32(m.Status))
	return b, flagIf(m.Zeroes, FlagZeroes) | flagIf(m.Discard, FlagDiscard), m.Seq, m.Data
}

func (m *ReportVolumes) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint32(b, uint32(len(m.Volumes)))
	for _, v := range m.Volumes {
		b = le.AppendUint64(b, v.Sectors)
		var f uint32
		if v.ReadOnly {
			f |= volReadOnly
		}
		if v.Protect {
			f |= volProtect
		}
		if v.RemoteWrite {
			f |= volRemoteWrite
		}
		if v.Changed {
			f |= volChanged
		}
		b = le.AppendUint32(b, f)
		b = appendName(b, v.Name)
	}
	return b, 0, m.Gen, nil
}

func (m *StartProtect) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint64(b, m.Volume)
	return appendName(b, m.Name), flagIf(m.Mirror, FlagMirror), m.Gen, nil
}

func (m *RemoteIOReq) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint64(b, m.Volume)
	b = le.AppendUint64(b, m.Sector)
	b = le.AppendUint32(b, m.Sectors)
	op := byte(0)
	if m.Write {
		op = 1
	}
	b = append(b, op, 0, 0, 0)
	return b, 0, m.ID, m.Data
}

func (m *RemoteIORes) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint64(b, m.Volume)
	b = le.AppendUint32(b, uint32(m.Status))
	b = le.AppendUint32(b, m.Sectors)
	return b, flagIf(m.Zero, FlagZero) | flagIf(m.Written, FlagWritten), m.ID, m.Data
}

func (m *AgentShutdown) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	return b, flagIf(m.Reply, FlagReply), 0, nil
}

func (m *StopProtect) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	return le.AppendUint64(b, m.Volume), 0, 0, nil
}

func (m *WriteAck) encode(b []byte) ([]byte, uint16, uint64, [][]byte) { return b, 0, m.Seq, nil }

func (m *DirtyMap) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint64(b, m.Volume)
	b = le.AppendUint32(b, m.RegionSectors)
	b = le.AppendUint32(b, uint32(len(m.Extents)))
	for _, e := range m.Extents {
		b = le.AppendUint64(b, e.Start)
		b = le.AppendUint64(b, e.Count)
	}
	return b, flagIf(m.Initial, FlagInitial), m.Seq, nil
}

func (m *Heartbeat) encode(b []byte) ([]byte, uint16, uint64, [][]byte) {
	b = le.AppendUint32(b, uint32(len(m.Backlog)))
	for _, e := range m.Backlog {
		b = le.AppendUint64(b, e.Volume)
		b = le.AppendUint64(b, e.IOs)
		b = le.AppendUint64(b, e.Bytes)
		b = le.AppendUint32(b, e.AgeMillis)
		b = le.AppendUint32(b, uint32(flagIf(e.Sync, 1)))
	}
	return b, 0, 0, nil
}

// AppendFrame appends m's whole frame, header included, to b.
func AppendFrame(b []byte, m Message) []byte {
	b, data := AppendHead(b, m)
	for _, d := range data {
		b = append(b, d...)
	}
	return b
}

// AppendHead appends m's frame up to its data (the header and the fixed
// fields) to b and returns the data slices that complete the frame, not
// copied: a writer with vectored I/O sends them from where they are.
func AppendHead(b []byte, m Message) ([]byte, [][]byte) {
	start := len(b)
	b = append(b, make([]byte, HeaderSize)...)
	b, flags, seq, data := m.encode(b)
	n := len(b) - start - HeaderSize
	for _, d := range data {
		n += len(d)
	}
	Header{Version: Version, Cmd: m.Cmd(), Flags: flags, Seq: seq, Len: uint32(n)}.put(b[start:])
	return b, data
}

// Writer writes frames to a buffered stream. It is not safe for concurrent
// use; callers serialise and call Flush.
type Writer struct {
	bw      *bufio.Writer
	scratch []byte
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{bw: bufio.NewWriterSize(w, 256<<10), scratch: make([]byte, 0, 512)}
}

// WriteMessage writes m; data slices are copied to the stream, not kept.
func (w *Writer) WriteMessage(m Message) error {
	b, data := AppendHead(w.scratch[:0], m)
	w.scratch = b[:0]
	if _, err := w.bw.Write(b); err != nil {
		return err
	}
	for _, d := range data {
		if _, err := w.bw.Write(d); err != nil {
			return err
		}
	}
	return nil
}

// Flush writes buffered frames to the stream.
func (w *Writer) Flush() error { return w.bw.Flush() }

// Buffered returns the bytes waiting for Flush.
func (w *Writer) Buffered() int { return w.bw.Buffered() }

// dec reads fixed fields of a payload; its first short read records an
// error and later reads return zero.
type dec struct {
	p   []byte
	err error
	cmd Cmd
}

func (d *dec) need(n int, what string) bool {
	if d.err != nil {
		return false
	}
	if len(d.p) < n {
		d.err = Malformed("%s: payload ends in %s", d.cmd, what)
		return false
	}
	return true
}

func (d *dec) u64(what string) uint64 {
	if !d.need(8, what) {
		return 0
	}
	v := le.Uint64(d.p)
	d.p = d.p[8:]
	return v
}

func (d *dec) u32(what string) uint32 {
	if !d.need(4, what) {
		return 0
	}
	v := le.Uint32(d.p)
	d.p = d.p[4:]
	return v
}

func (d *dec) u16(what string) uint16 {
	if !d.need(2, what) {
		return 0
	}
	v := le.Uint16(d.p)
	d.p = d.p[2:]
	return v
}

func (d *dec) bytes(n int, what string) []byte {
	if !d.need(n, what) {
		return nil
	}
	v := d.p[:n]
	d.p = d.p[n:]
	return v
}

// name reads a length-prefixed name and checks it with CheckName.
func (d *dec) name(what string) string {
	n := int(d.u16(what + " length"))
	b := d.bytes(n, what)
	if d.err != nil {
		return ""
	}
	s := string(b)
	if err := CheckName(s); err != nil {
		d.err = Malformed("%s: %s %q: %v", d.cmd, what, s, err)
	}
	return s
}

// end checks that the payload was consumed exactly.
func (d *dec) end() error {
	if d.err == nil && len(d.p) != 0 {
		d.err = Malformed("%s: %d trailing payload bytes", d.cmd, len(d.p))
	}
	return d.err
}

// ParseUUID parses a HELLO's UUID from 8-4-4-4-12 hex digits; "" is the
// zero UUID.
func ParseUUID(s string) ([16]byte, error) {
	var u [16]byte
	if s == "" {
		return u, nil
	}
	h := strings.ReplaceAll(s, "-", "")
	if len(s) != 36 || len(h) != 32 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, errors.New("want 8-4-4-4-12 hex digits")
	}
	if _, err := hex.Decode(u[:], []byte(h)); err != nil {
		return u, errors.New("want 8-4-4-4-12 hex digits")
	}
	return u, nil
}

// CheckName checks a VM or volume name: 1 to MaxNameLen bytes of UTF-8
// without control characters, '/' or '\\', and not "." or "..". Names
// become file names in the hub's store.
func CheckName(s string) error {
	if s == "" || len(s) > MaxNameLen {
		return fmt.Errorf("must be 1 to %d bytes", MaxNameLen)
	}
	if s == "." || s == ".." || !utf8.ValidString(s) {
		return errors.New("not a valid name")
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == '/' || r == '\\' {
			return fmt.Errorf("contains %q", r)
		}
	}
	return nil
}

// allowedFlags holds the flags each command accepts.
var allowedFlags = [maxCmd + 1]uint16{
	CmdHello: FlagReply | FlagGroup, CmdGroupState: FlagConsistent, CmdProtectedWrite: FlagZeroes | FlagDiscard, CmdStartProtect: FlagMirror,
	CmdRemoteIORes: FlagZero | FlagWritten, CmdAgentShutdown: FlagReply, CmdDirtyMap: FlagInitial, CmdCheckpoint: FlagRefused,
}

// Decode decodes and checks a frame's payload by its command: lengths,
// flags, names and ranges that are wrong whatever was reported (syntax).
// Whether a volume id was assigned or a range fits the volume is the
// receiver's check. Data slices of the result alias f.Payload.
func Decode(f Frame) (Message, error) {
	if err := checkFrame(f); err != nil {
		return nil, err
	}
	d := &dec{p: f.Payload, cmd: f.Cmd}
	switch f.Cmd {
	case CmdHello:
		m := &Hello{Reply: f.Flags&FlagReply != 0, Group: f.Flags&FlagGroup != 0, Session: d.u64("session")}
		if m.Reply && m.Group {
			return nil, Malformed("%s: group flag on a reply", f.Cmd)
		}
		copy(m.UUID[:], d.bytes(16, "uuid"))
		m.MaxVersion = d.u16("version")
		m.Name = d.name("name")
		if d.err == nil && m.MaxVersion < uint16(Version) {
			d.err = Malformed("%s: version %d below %d", f.Cmd, m.MaxVersion, Version)
		}
		return m, d.end()
	case CmdProtectedWrite:
		m := &ProtectedWrite{}
		if err := m.decode(f, d); err != nil {
			return nil, err
		}
		return m, nil
	case CmdReportVolumes:
		n := d.u32("count")
		if d.err == nil && n > MaxVolumes {
			return nil, Malformed("%s: %d volumes, more than %d", f.Cmd, n, MaxVolumes)
		}
		m := &ReportVolumes{Gen: f.Seq}
		seen := map[string]bool{}
		for i := uint32(0); i < n && d.err == nil; i++ {
			v := VolumeInfo{Sectors: d.u64("sectors")}
			fl := d.u32("flags")
			v.Name = d.name("volume name")
			if d.err != nil {
				break
			}
			if fl&^volFlags != 0 {
				return nil, Malformed("%s: volume %q: unknown flags %#x", f.Cmd, v.Name, fl&^volFlags)
			}
			if v.Sectors == 0 || v.Sectors > maxVolumeSectors {
				return nil, Malformed("%s: volume %q: size %d sectors out of range", f.Cmd, v.Name, v.Sectors)
			}
			if fl&volChanged != 0 && fl&volProtect == 0 {
				return nil, Malformed("%s: volume %q: changed without protect", f.Cmd, v.Name)
			}
			if seen[v.Name] {
				return nil, Malformed("%s: volume %q reported twice", f.Cmd, v.Name)
			}
			seen[v.Name] = true
			v.ReadOnly, v.Protect, v.RemoteWrite = fl&volReadOnly != 0, fl&volProtect != 0, fl&volRemoteWrite != 0
			v.Changed = fl&volChanged != 0
			m.Volumes = append(m.Volumes, v)
		}
		return m, d.end()
	case CmdStartProtect:
		m := &StartProtect{Volume: d.u64("volume"), Mirror: f.Flags&FlagMirror != 0, Gen: f.Seq}
		m.Name = d.name("volume name")
		if d.err == nil && m.Volume == 0 {
			return nil, Malformed("%s: volume id 0", f.Cmd)
		}
		return m, d.end()
	case CmdRemoteIOReq:
		m := &RemoteIOReq{ID: f.Seq, Volume: d.u64("volume"), Sector: d.u64("sector"), Sectors: d.u32("sectors")}
		op := d.bytes(4, "op")
		if d.err != nil {
			return nil, d.err
		}
		if op[0] > 1 || op[1]|op[2]|op[3] != 0 {
			return nil, Malformed("%s: bad op bytes % x", f.Cmd, op)
		}
		m.Write = op[0] == 1
		if err := checkRange(f.Cmd, m.Volume, m.Sector, uint64(m.Sectors)); err != nil {
			return nil, err
		}
		if m.Sectors > MaxIOSectors {
			return nil, Malformed("%s: %d sectors, more than %d", f.Cmd, m.Sectors, MaxIOSectors)
		}
		if m.Write {
			m.Data = [][]byte{d.bytes(int(m.Sectors)*SectorSize, "data")}
		}
		return m, d.end()
	case CmdRemoteIORes:
		m := &RemoteIORes{ID: f.Seq, Volume: d.u64("volume"), Status: int32(d.u32("status")), Sectors: d.u32("sectors"),
			Zero: f.Flags&FlagZero != 0, Written: f.Flags&FlagWritten != 0}
		if d.err != nil {
			return nil, d.err
		}
		if m.Volume == 0 {
			return nil, Malformed("%s: volume id 0", f.Cmd)
		}
		if m.Sectors == 0 || m.Sectors > MaxIOSectors {
			return nil, Malformed("%s: %d sectors, want 1 to %d", f.Cmd, m.Sectors, MaxIOSectors)
		}
		if m.Zero && (m.Status != StatusOK || m.Written) {
			return nil, Malformed("%s: zero flag on a failed request or a write", f.Cmd)
		}
		if m.Status == StatusOK && !m.Zero && !m.Written {
			m.Data = [][]byte{d.bytes(int(m.Sectors)*SectorSize, "data")}
		}
		return m, d.end()
	case CmdAgentShutdown:
		return &AgentShutdown{Reply: f.Flags&FlagReply != 0}, d.end()
	case CmdStopProtect:
		m := &StopProtect{Volume: d.u64("volume")}
		if d.err == nil && m.Volume == 0 {
			return nil, Malformed("%s: volume id 0", f.Cmd)
		}
		return m, d.end()
	case CmdWriteAck:
		return &WriteAck{Seq: f.Seq}, d.end()
	case CmdDirtyMap:
		m := &DirtyMap{Seq: f.Seq, Volume: d.u64("volume"), Initial: f.Flags&FlagInitial != 0, RegionSectors: d.u32("region size")}
		n := d.u32("count")
		if d.err != nil {
			return nil, d.err
		}
		if m.Volume == 0 {
			return nil, Malformed("%s: volume id 0", f.Cmd)
		}
		if rs := m.RegionSectors; rs < 8 || rs > 1<<21 || rs&(rs-1) != 0 {
			return nil, Malformed("%s: region size %d sectors: must be a power of two from 8 to %d", f.Cmd, rs, 1<<21)
		}
		if uint64(n)*16 != uint64(len(d.p)) {
			return nil, Malformed("%s: %d extents in %d bytes", f.Cmd, n, len(d.p))
		}
		m.Extents = make([]Extent, n)
		var next uint64
		for i := range m.Extents {
			e := Extent{Start: d.u64("start"), Count: d.u64("count")}
			if e.Count == 0 || e.Start+e.Count < e.Start || e.Start+e.Count > maxRegions {
				return nil, Malformed("%s: extent %d (%d+%d) empty or out of range", f.Cmd, i, e.Start, e.Count)
			}
			if i > 0 && e.Start < next {
				return nil, Malformed("%s: extent %d at %d overlaps or precedes the previous one", f.Cmd, i, e.Start)
			}
			next = e.Start + e.Count
			m.Extents[i] = e
		}
		return m, d.end()
	case CmdHeartbeat:
		n := d.u32("count")
		if d.err == nil && uint64(n)*32 != uint64(len(d.p)) {
			return nil, Malformed("%s: %d entries in %d bytes", f.Cmd, n, len(d.p))
		}
		m := &Heartbeat{}
		for i := uint32(0); i < n && d.err == nil; i++ {
			b := Backlog{Volume: d.u64("volume"), IOs: d.u64("ios"), Bytes: d.u64("bytes"), AgeMillis: d.u32("age")}
			fl := d.u32("flags")
			if fl&^1 != 0 {
				return nil, Malformed("%s: entry %d: unknown flags %#x", f.Cmd, i, fl)
			}
			b.Sync = fl&1 != 0
			m.Backlog = append(m.Backlog, b)
		}
		return m, d.end()
	case CmdGroupState:
		return &GroupState{Seq: f.Seq, Consistent: f.Flags&FlagConsistent != 0}, d.end()
	case CmdCheckpoint:
		n := int(d.u16("checkpoint name length"))
		if d.err == nil && n > MaxCheckpointName {
			return nil, Malformed("%s: checkpoint name of %d bytes, at most %d", f.Cmd, n, MaxCheckpointName)
		}
		b := d.bytes(n, "checkpoint name")
		if d.err != nil {
			return nil, d.err
		}
		m := &Checkpoint{Seq: f.Seq, Name: string(b), Refused: f.Flags&FlagRefused != 0}
		if err := CheckCheckpointName(m.Name); err != nil {
			return nil, Malformed("%s: checkpoint name %q: %v", f.Cmd, m.Name, err)
		}
		return m, d.end()
	case CmdCsumReq:
		return decodeCsumReq(f, d)
	case CmdCsumRes:
		return decodeCsumRes(f, d)
	case CmdRefused:
		n := int(d.u16("reason length"))
		if d.err == nil && (n == 0 || n > MaxReasonLen) {
			return nil, Malformed("%s: reason of %d bytes, want 1 to %d", f.Cmd, n, MaxReasonLen)
		}
		b := d.bytes(n, "reason")
		if d.err != nil {
			return nil, d.err
		}
		if Reason(string(b)) != string(b) {
			return nil, Malformed("%s: reason %q is not printable ASCII", f.Cmd, b)
		}
		return &Refused{Reason: string(b)}, d.end()
	}
	return nil, Malformed("unknown command %d", uint8(f.Cmd))
}

// Volume size bounds: 2^48 sectors (128 PiB) keeps every sector and byte
// offset computation far from overflow; regions are at least 8 sectors.
const (
	maxVolumeSectors = 1 << 48
	maxRegions       = maxVolumeSectors / 8
)

// checkRange checks the syntax of an I/O range: a volume id, a positive
// length, and no overflow.
func checkRange(cmd Cmd, vol, sector, sectors uint64) error {
	if vol == 0 {
		return Malformed("%s: volume id 0", cmd)
	}
	if sectors == 0 {
		return Malformed("%s: zero sectors", cmd)
	}
	if sector >= maxVolumeSectors || sectors > maxVolumeSectors-sector {
		return Malformed("%s: %d sectors at %d out of range", cmd, sectors, sector)
	}
	return nil
}

// checkFrame checks what Decode checks of every frame before its payload:
// the command, its flags and whether it carries a sequence number.
func checkFrame(f Frame) error {
	if f.Cmd < 1 || f.Cmd > maxCmd {
		return Malformed("unknown command %d", uint8(f.Cmd))
	}
	if bad := f.Flags &^ allowedFlags[f.Cmd]; bad != 0 {
		return Malformed("%s: unknown flags %#x", f.Cmd, bad)
	}
	switch f.Cmd {
	case CmdProtectedWrite, CmdRemoteIOReq, CmdRemoteIORes, CmdDirtyMap, CmdGroupState, CmdCheckpoint, CmdCsumReq, CmdCsumRes:
		if f.Seq == 0 {
			return Malformed("%s: sequence number 0", f.Cmd)
		}
	case CmdWriteAck, CmdReportVolumes, CmdStartProtect:
		// Any: an ack may be 0; a report generation 0 is "none".
	default:
		if f.Seq != 0 {
			return Malformed("%s: sequence number %d, want 0", f.Cmd, f.Seq)
		}
	}
	return nil
}

// DecodeProtectedWrite is Decode of a PROTECTED_WRITE frame into m,
// reusing m.Data's slice: a receiver that handles one frame at a time
// decodes its mirrored writes without an allocation per frame. Any other
// command is an error. m's Data slices alias f.Payload.
func DecodeProtectedWrite(f Frame, m *ProtectedWrite) error {
	if f.Cmd != CmdProtectedWrite {
		return Malformed("%s where %s was expected", f.Cmd, CmdProtectedWrite)
	}
	if err := checkFrame(f); err != nil {
		return err
	}
	d := dec{p: f.Payload, cmd: f.Cmd}
	return m.decode(f, &d)
}

// decode decodes a checked PROTECTED_WRITE frame's payload into m.
func (m *ProtectedWrite) decode(f Frame, d *dec) error {
	data := m.Data[:0]
	clear(m.Data)
	*m = ProtectedWrite{Seq: f.Seq, Volume: d.u64("volume"), Sector: d.u64("sector"), Sectors: d.u32("sectors"),
		Status: int32(d.u32("status")), Zeroes: f.Flags&FlagZeroes != 0, Discard: f.Flags&FlagDiscard != 0, Data: data}
	if d.err != nil {
		return d.err
	}
	if m.Zeroes && m.Discard {
		return Malformed("%s: both zeroes and discard", f.Cmd)
	}
	if err := checkRange(f.Cmd, m.Volume, m.Sector, uint64(m.Sectors)); err != nil {
		return err
	}
	if m.Status == StatusOK && !m.Zeroes && !m.Discard {
		if m.Sectors > MaxIOSectors {
			return Malformed("%s: %d sectors of data, more than %d", f.Cmd, m.Sectors, MaxIOSectors)
		}
		m.Data = append(m.Data, d.bytes(int(m.Sectors)*SectorSize, "data"))
	}
	return d.end()
}
