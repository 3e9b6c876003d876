// Package wire is the vhost-user wire layer (QEMU
// docs/interop/vhost-user.rst) that the back end and the front-end client
// share: request codes, header flags, payload structs and their decoders,
// which requests carry fds and which have a reply of their own, and the
// framing of messages with their fds on a unix socket (Conn).
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Decoders check the exact length first, then syntax only (overflow,
// alignment, unknown bits); whether a value makes sense for the
// connection's state is checked by whoever holds that state.

var le = binary.LittleEndian

// ReqCode is the request field of a vhost-user message header sent by the
// front end (vhost-user.rst, "Front-end message types").
type ReqCode uint32

// Front-end request codes (vhost-user.rst). The numbers are wire format.
const (
	ReqGetFeatures         ReqCode = 1
	ReqSetFeatures         ReqCode = 2
	ReqSetOwner            ReqCode = 3
	ReqResetOwner          ReqCode = 4
	ReqSetMemTable         ReqCode = 5
	ReqSetLogBase          ReqCode = 6
	ReqSetLogFD            ReqCode = 7
	ReqSetVringNum         ReqCode = 8
	ReqSetVringAddr        ReqCode = 9
	ReqSetVringBase        ReqCode = 10
	ReqGetVringBase        ReqCode = 11
	ReqSetVringKick        ReqCode = 12
	ReqSetVringCall        ReqCode = 13
	ReqSetVringErr         ReqCode = 14
	ReqGetProtocolFeatures ReqCode = 15
	ReqSetProtocolFeatures ReqCode = 16
	ReqGetQueueNum         ReqCode = 17
	ReqSetVringEnable      ReqCode = 18
	ReqSendRARP            ReqCode = 19
	ReqNetSetMTU           ReqCode = 20
	ReqSetBackendReqFD     ReqCode = 21
	ReqIOTLBMsg            ReqCode = 22
	ReqSetVringEndian      ReqCode = 23
	ReqGetConfig           ReqCode = 24
	ReqSetConfig           ReqCode = 25
	ReqCreateCryptoSession ReqCode = 26
	ReqCloseCryptoSession  ReqCode = 27
	ReqPostcopyAdvise      ReqCode = 28
	ReqPostcopyListen      ReqCode = 29
	ReqPostcopyEnd         ReqCode = 30
	ReqGetInflightFD       ReqCode = 31
	ReqSetInflightFD       ReqCode = 32
	ReqGPUSetSocket        ReqCode = 33
	ReqResetDevice         ReqCode = 34
	ReqVringKick           ReqCode = 35
	ReqGetMaxMemSlots      ReqCode = 36
	ReqAddMemReg           ReqCode = 37
	ReqRemMemReg           ReqCode = 38
	ReqSetStatus           ReqCode = 39
	ReqGetStatus           ReqCode = 40
	ReqGetSharedObject     ReqCode = 41
	ReqSetDeviceStateFD    ReqCode = 42
	ReqCheckDeviceState    ReqCode = 43
)

var reqNames = [...]string{
	ReqGetFeatures: "GET_FEATURES", ReqSetFeatures: "SET_FEATURES", ReqSetOwner: "SET_OWNER",
	ReqResetOwner: "RESET_OWNER", ReqSetMemTable: "SET_MEM_TABLE", ReqSetLogBase: "SET_LOG_BASE",
	ReqSetLogFD: "SET_LOG_FD", ReqSetVringNum: "SET_VRING_NUM", ReqSetVringAddr: "SET_VRING_ADDR",
	ReqSetVringBase: "SET_VRING_BASE", ReqGetVringBase: "GET_VRING_BASE", ReqSetVringKick: "SET_VRING_KICK",
	ReqSetVringCall: "SET_VRING_CALL", ReqSetVringErr: "SET_VRING_ERR",
	ReqGetProtocolFeatures: "GET_PROTOCOL_FEATURES", ReqSetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	ReqGetQueueNum: "GET_QUEUE_NUM", ReqSetVringEnable: "SET_VRING_ENABLE", ReqSendRARP: "SEND_RARP",
	ReqNetSetMTU: "NET_SET_MTU", ReqSetBackendReqFD: "SET_BACKEND_REQ_FD", ReqIOTLBMsg: "IOTLB_MSG",
	ReqSetVringEndian: "SET_VRING_ENDIAN", ReqGetConfig: "GET_CONFIG", ReqSetConfig: "SET_CONFIG",
	ReqCreateCryptoSession: "CREATE_CRYPTO_SESSION", ReqCloseCryptoSession: "CLOSE_CRYPTO_SESSION",
	ReqPostcopyAdvise: "POSTCOPY_ADVISE", ReqPostcopyListen: "POSTCOPY_LISTEN", ReqPostcopyEnd: "POSTCOPY_END",
	ReqGetInflightFD: "GET_INFLIGHT_FD", ReqSetInflightFD: "SET_INFLIGHT_FD", ReqGPUSetSocket: "GPU_SET_SOCKET",
	ReqResetDevice: "RESET_DEVICE", ReqVringKick: "VRING_KICK", ReqGetMaxMemSlots: "GET_MAX_MEM_SLOTS",
	ReqAddMemReg: "ADD_MEM_REG", ReqRemMemReg: "REM_MEM_REG", ReqSetStatus: "SET_STATUS",
	ReqGetStatus: "GET_STATUS", ReqGetSharedObject: "GET_SHARED_OBJECT",
	ReqSetDeviceStateFD: "SET_DEVICE_STATE_FD", ReqCheckDeviceState: "CHECK_DEVICE_STATE",
}

// String returns the request's name without the VHOST_USER_ prefix, or
// REQUEST(n) for a code this package does not know.
func (c ReqCode) String() string {
	if int(c) < len(reqNames) && reqNames[c] != "" {
		return reqNames[c]
	}
	return fmt.Sprintf("REQUEST(%d)", uint32(c))
}

// BackendReqCode is the request field of a message the back end sends on
// the channel set by SET_BACKEND_REQ_FD (vhost-user.rst, "Back-end message
// types").
type BackendReqCode uint32

// Back-end request codes. The numbers are wire format.
const (
	BackendIOTLBMsg             BackendReqCode = 1
	BackendConfigChangeMsg      BackendReqCode = 2
	BackendVringHostNotifierMsg BackendReqCode = 3
	BackendVringCall            BackendReqCode = 4
	BackendVringErr             BackendReqCode = 5
	BackendSharedObjectAdd      BackendReqCode = 6
	BackendSharedObjectRemove   BackendReqCode = 7
	BackendSharedObjectLookup   BackendReqCode = 8
)

var backendReqNames = [...]string{
	BackendIOTLBMsg: "IOTLB_MSG", BackendConfigChangeMsg: "CONFIG_CHANGE_MSG",
	BackendVringHostNotifierMsg: "VRING_HOST_NOTIFIER_MSG", BackendVringCall: "VRING_CALL",
	BackendVringErr: "VRING_ERR", BackendSharedObjectAdd: "SHARED_OBJECT_ADD",
	BackendSharedObjectRemove: "SHARED_OBJECT_REMOVE", BackendSharedObjectLookup: "SHARED_OBJECT_LOOKUP",
}

// String returns the back-end request's name, or BACKEND_REQUEST(n).
func (c BackendReqCode) String() string {
	if int(c) < len(backendReqNames) && backendReqNames[c] != "" {
		return backendReqNames[c]
	}
	return fmt.Sprintf("BACKEND_REQUEST(%d)", uint32(c))
}

// Header flags (vhost-user.rst, "Header"): bits 0-1 are the version,
// bit 2 marks a reply, bit 3 asks for a REPLY_ACK reply.
const (
	FlagVersion     uint32 = 0x1
	flagVersionMask uint32 = 0x3
	FlagReply       uint32 = 0x4
	FlagNeedReply   uint32 = 0x8
	flagKnown              = flagVersionMask | FlagReply | FlagNeedReply
)

// HeaderSize is the size of a message header in bytes.
const HeaderSize = 12

// MaxPayload is the largest payload this package sends or accepts (rust-vmm's
// MAX_MSG_SIZE); a SET_MEM_TABLE with 8 regions is 264 bytes.
const MaxPayload = 0x1000

// MaxFDs is the most file descriptors one message may carry
// (VHOST_MEMORY_BASELINE_NREGIONS).
const MaxFDs = 8

// Protocol feature bits negotiated with GET/SET_PROTOCOL_FEATURES.
const (
	ProtocolMQ                = 1 << 0
	ProtocolLogSHMFD          = 1 << 1
	ProtocolRARP              = 1 << 2
	ProtocolReplyAck          = 1 << 3
	ProtocolMTU               = 1 << 4
	ProtocolBackendReq        = 1 << 5
	ProtocolCrossEndian       = 1 << 6
	ProtocolCryptoSession     = 1 << 7
	ProtocolPagefault         = 1 << 8
	ProtocolConfig            = 1 << 9
	ProtocolBackendSendFD     = 1 << 10
	ProtocolHostNotifier      = 1 << 11
	ProtocolInflightSHMFD     = 1 << 12
	ProtocolResetDevice       = 1 << 13
	ProtocolInbandNotify      = 1 << 14
	ProtocolConfigureMemSlots = 1 << 15
	ProtocolStatus            = 1 << 16
)

// Header is a vhost-user message header.
type Header struct {
	Code  ReqCode
	Flags uint32
	Size  uint32 // payload bytes
}

// NeedReply reports whether the sender asked for a REPLY_ACK reply.
func (h Header) NeedReply() bool { return h.Flags&FlagNeedReply != 0 }

// IsReply reports whether the header carries the reply flag.
func (h Header) IsReply() bool { return h.Flags&FlagReply != 0 }

// AppendTo appends the 12-byte wire form of h to b.
func (h Header) AppendTo(b []byte) []byte {
	b = le.AppendUint32(b, uint32(h.Code))
	b = le.AppendUint32(b, h.Flags)
	return le.AppendUint32(b, h.Size)
}

// DecodeHeader decodes a message header; syntax only: the version must be 1,
// no unknown flag bits, and the payload no larger than MaxPayload.
func DecodeHeader(p []byte) (Header, error) {
	if len(p) != HeaderSize {
		return Header{}, fmt.Errorf("header is %d bytes, want %d", len(p), HeaderSize)
	}
	h := Header{Code: ReqCode(le.Uint32(p)), Flags: le.Uint32(p[4:]), Size: le.Uint32(p[8:])}
	// vhost-user.rst, Header: "Lower 2 bits are the version (currently 0x01)".
	if h.Flags&flagVersionMask != FlagVersion {
		return Header{}, fmt.Errorf("%s: version %d, want 1", h.Code, h.Flags&flagVersionMask)
	}
	if h.Flags&^flagKnown != 0 {
		return Header{}, fmt.Errorf("%s: unknown flags %#x", h.Code, h.Flags&^flagKnown)
	}
	if h.Size > MaxPayload {
		return Header{}, fmt.Errorf("%s: payload of %d bytes exceeds %d", h.Code, h.Size, MaxPayload)
	}
	return h, nil
}

// Payload is a decoded message payload that can be encoded again.
type Payload interface {
	AppendTo(b []byte) []byte
}

// U64 is the payload of messages that carry one 64-bit integer.
type U64 uint64

// AppendTo appends the wire form of v.
func (v U64) AppendTo(b []byte) []byte { return le.AppendUint64(b, uint64(v)) }

// NoPayload is the payload of messages without one.
type NoPayload struct{}

// AppendTo appends nothing.
func (NoPayload) AppendTo(b []byte) []byte { return b }

// VringState is the "vring state description" payload: SET_VRING_NUM,
// SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE.
type VringState struct {
	Index uint32
	Num   uint32
}

// AppendTo appends the 8-byte wire form of s.
func (s VringState) AppendTo(b []byte) []byte {
	return le.AppendUint32(le.AppendUint32(b, s.Index), s.Num)
}

// VringAddrFlagLog is VHOST_VRING_F_LOG: log writes to the used ring.
const VringAddrFlagLog = 1 << 0

// VringAddr is the "vring address description" payload of SET_VRING_ADDR.
// The ring addresses are front-end user (virtual) addresses; Log is a guest
// physical address used only for dirty logging of the used ring.
type VringAddr struct {
	Index uint32
	Flags uint32
	Desc  uint64
	Used  uint64
	Avail uint64
	Log   uint64
}

const vringAddrSize = 40

// AppendTo appends the 40-byte wire form of a.
func (a VringAddr) AppendTo(b []byte) []byte {
	b = le.AppendUint32(b, a.Index)
	b = le.AppendUint32(b, a.Flags)
	b = le.AppendUint64(b, a.Desc)
	b = le.AppendUint64(b, a.Used)
	b = le.AppendUint64(b, a.Avail)
	return le.AppendUint64(b, a.Log)
}

// VringFD is the u64 payload of SET_VRING_KICK, SET_VRING_CALL and
// SET_VRING_ERR: bits 0-7 the ring index, bit 8 "no fd" (poll instead).
type VringFD struct {
	Index uint8
	NoFD  bool
}

const vringNoFD = 1 << 8

// AppendTo appends the 8-byte wire form of v.
func (v VringFD) AppendTo(b []byte) []byte {
	x := uint64(v.Index)
	if v.NoFD {
		x |= vringNoFD
	}
	return le.AppendUint64(b, x)
}

// MemRegion is one guest memory region of SET_MEM_TABLE, ADD_MEM_REG and
// REM_MEM_REG: GPA..GPA+Size is mapped from the fd at Offset and appears at
// UserAddr in the front end's address space.
type MemRegion struct {
	GPA      uint64
	Size     uint64
	UserAddr uint64
	Offset   uint64
}

const memRegionSize = 32

// AppendTo appends the 32-byte wire form of r.
func (r MemRegion) AppendTo(b []byte) []byte {
	b = le.AppendUint64(b, r.GPA)
	b = le.AppendUint64(b, r.Size)
	b = le.AppendUint64(b, r.UserAddr)
	return le.AppendUint64(b, r.Offset)
}

// decodeMemRegion decodes one region of SET_MEM_TABLE or ADD_MEM_REG; syntax only.
func decodeMemRegion(p []byte) (MemRegion, error) {
	if len(p) != memRegionSize {
		return MemRegion{}, fmt.Errorf("memory region is %d bytes, want %d", len(p), memRegionSize)
	}
	r := MemRegion{GPA: le.Uint64(p), Size: le.Uint64(p[8:]), UserAddr: le.Uint64(p[16:]), Offset: le.Uint64(p[24:])}
	if r.Size == 0 || r.GPA+r.Size < r.GPA || r.UserAddr+r.Size < r.UserAddr || r.Offset+r.Size < r.Offset {
		return MemRegion{}, fmt.Errorf("memory region at %#x size %#x: empty or overflows", r.GPA, r.Size)
	}
	return r, nil
}

// MemTable is the payload of SET_MEM_TABLE: up to MaxFDs regions, one fd each.
type MemTable struct {
	Regions []MemRegion
}

// AppendTo appends the wire form of t: count, padding, regions.
func (t MemTable) AppendTo(b []byte) []byte {
	b = le.AppendUint32(b, uint32(len(t.Regions)))
	b = le.AppendUint32(b, 0)
	for _, r := range t.Regions {
		b = r.AppendTo(b)
	}
	return b
}

// SingleMemRegion is the payload of ADD_MEM_REG and REM_MEM_REG: a 64-bit
// padding, then one region.
type SingleMemRegion struct {
	Region MemRegion
}

const singleMemRegionSize = 8 + memRegionSize

// AppendTo appends the 40-byte wire form of s.
func (s SingleMemRegion) AppendTo(b []byte) []byte {
	return s.Region.AppendTo(le.AppendUint64(b, 0))
}

// LogDesc is the "log description" payload of SET_LOG_BASE: the log bitmap
// is Size bytes at Offset in the fd; bit n covers guest page n (4 KiB).
type LogDesc struct {
	Size   uint64
	Offset uint64
}

// AppendTo appends the 16-byte wire form of l.
func (l LogDesc) AppendTo(b []byte) []byte {
	return le.AppendUint64(le.AppendUint64(b, l.Size), l.Offset)
}

// ConfigMsg is the "virtio device config space" payload of GET_CONFIG and
// SET_CONFIG: a 12-byte header and Size bytes of config space at Offset.
type ConfigMsg struct {
	Offset uint32
	Size   uint32
	Flags  uint32 // ConfigFlagWritable or ConfigFlagMigration
	Data   []byte // len(Data) == Size
}

// Config message flags (vhost-user.rst, "Virtio device config space").
const (
	ConfigFlagWritable  = 0 // front-end write of a writable field
	ConfigFlagMigration = 1 // live migration
)

// ConfigHeaderSize is VHOST_USER_CONFIG_HDR_SIZE.
const ConfigHeaderSize = 12

// MaxConfigSize is the largest config access (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
const MaxConfigSize = 256

// AppendTo appends the wire form of c.
func (c ConfigMsg) AppendTo(b []byte) []byte {
	b = le.AppendUint32(b, c.Offset)
	b = le.AppendUint32(b, c.Size)
	b = le.AppendUint32(b, c.Flags)
	return append(b, c.Data...)
}

// InflightDesc is the "inflight description" payload of GET_INFLIGHT_FD and
// SET_INFLIGHT_FD. QEMU and libvhost-user send the C struct unpacked, 24
// bytes with trailing padding; a packed 20-byte form is accepted too.
type InflightDesc struct {
	MmapSize   uint64
	MmapOffset uint64
	NumQueues  uint16
	QueueSize  uint16
}

// InflightDescSize is the size of the InflightDesc payload QEMU sends.
const InflightDescSize = 24

// AppendTo appends the 24-byte wire form of d.
func (d InflightDesc) AppendTo(b []byte) []byte {
	b = le.AppendUint64(b, d.MmapSize)
	b = le.AppendUint64(b, d.MmapOffset)
	b = le.AppendUint16(b, d.NumQueues)
	b = le.AppendUint16(b, d.QueueSize)
	return le.AppendUint32(b, 0)
}

// ErrUnknownRequest marks a request code this package does not implement.
var ErrUnknownRequest = errors.New("unknown request")

// DecodePayload decodes the payload of a front-end request by its code.
// It checks the exact length first, then syntax only. Requests this package
// does not know return an error wrapping ErrUnknownRequest.
func DecodePayload(code ReqCode, p []byte) (Payload, error) {
	size := func(want int) error {
		if len(p) != want {
			return fmt.Errorf("%s: payload is %d bytes, want %d", code, len(p), want)
		}
		return nil
	}
	switch code {
	case ReqGetFeatures, ReqSetOwner, ReqResetOwner, ReqGetProtocolFeatures, ReqGetQueueNum,
		ReqSetBackendReqFD, ReqResetDevice, ReqGetMaxMemSlots, ReqGetStatus, ReqSetLogFD:
		// vhost-user.rst gives these "request payload: N/A". QEMU sends
		// SET_LOG_FD with an empty payload.
		if err := size(0); err != nil {
			return nil, err
		}
		return NoPayload{}, nil
	case ReqSetFeatures, ReqSetProtocolFeatures, ReqSetStatus:
		if err := size(8); err != nil {
			return nil, err
		}
		return U64(le.Uint64(p)), nil
	case ReqSetVringNum, ReqSetVringBase, ReqGetVringBase, ReqSetVringEnable:
		if err := size(8); err != nil {
			return nil, err
		}
		return VringState{Index: le.Uint32(p), Num: le.Uint32(p[4:])}, nil
	case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		if err := size(8); err != nil {
			return nil, err
		}
		v := le.Uint64(p)
		// "Bits (0-7) of the payload contain the vring index. Bit 8 is the
		// invalid FD flag."
		if v&^uint64(0x1ff) != 0 {
			return nil, fmt.Errorf("%s: unknown bits in %#x", code, v)
		}
		return VringFD{Index: uint8(v), NoFD: v&vringNoFD != 0}, nil
	case ReqSetVringAddr:
		if err := size(vringAddrSize); err != nil {
			return nil, err
		}
		a := VringAddr{Index: le.Uint32(p), Flags: le.Uint32(p[4:]), Desc: le.Uint64(p[8:]),
			Used: le.Uint64(p[16:]), Avail: le.Uint64(p[24:]), Log: le.Uint64(p[32:])}
		if a.Flags&^VringAddrFlagLog != 0 {
			return nil, fmt.Errorf("%s: unknown flags %#x", code, a.Flags)
		}
		// Virtio 1.x 2.7 "Split Virtqueues": descriptor table aligned to 16,
		// available ring to 2, used ring to 4.
		if a.Desc%16 != 0 || a.Avail%2 != 0 || a.Used%4 != 0 {
			return nil, fmt.Errorf("%s: misaligned ring desc %#x avail %#x used %#x", code, a.Desc, a.Avail, a.Used)
		}
		return a, nil
	case ReqSetMemTable:
		if len(p) < 8 {
			return nil, fmt.Errorf("%s: payload is %d bytes, want at least 8", code, len(p))
		}
		n := le.Uint32(p)
		if n == 0 || n > MaxFDs {
			return nil, fmt.Errorf("%s: %d regions, want 1 to %d", code, n, MaxFDs)
		}
		if err := size(8 + int(n)*memRegionSize); err != nil {
			return nil, err
		}
		t := MemTable{Regions: make([]MemRegion, n)}
		for i := range t.Regions {
			r, err := decodeMemRegion(p[8+i*memRegionSize : 8+(i+1)*memRegionSize])
			if err != nil {
				return nil, fmt.Errorf("%s: region %d: %w", code, i, err)
			}
			t.Regions[i] = r
		}
		return t, nil
	case ReqAddMemReg, ReqRemMemReg:
		if err := size(singleMemRegionSize); err != nil {
			return nil, err
		}
		r, err := decodeMemRegion(p[8:])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", code, err)
		}
		return SingleMemRegion{Region: r}, nil
	case ReqSetLogBase:
		if err := size(16); err != nil {
			return nil, err
		}
		l := LogDesc{Size: le.Uint64(p), Offset: le.Uint64(p[8:])}
		if l.Size == 0 || l.Offset+l.Size < l.Offset {
			return nil, fmt.Errorf("%s: log of %d bytes at %d: empty or overflows", code, l.Size, l.Offset)
		}
		return l, nil
	case ReqGetConfig, ReqSetConfig:
		if len(p) < ConfigHeaderSize {
			return nil, fmt.Errorf("%s: payload is %d bytes, want at least %d", code, len(p), ConfigHeaderSize)
		}
		c := ConfigMsg{Offset: le.Uint32(p), Size: le.Uint32(p[4:]), Flags: le.Uint32(p[8:])}
		if c.Size > MaxConfigSize {
			return nil, fmt.Errorf("%s: config access of %d bytes exceeds %d", code, c.Size, MaxConfigSize)
		}
		if err := size(ConfigHeaderSize + int(c.Size)); err != nil {
			return nil, err
		}
		if c.Flags > ConfigFlagMigration {
			return nil, fmt.Errorf("%s: unknown flags %#x", code, c.Flags)
		}
		if uint64(c.Offset)+uint64(c.Size) > 0x1000 {
			return nil, fmt.Errorf("%s: config access %d+%d beyond 4096", code, c.Offset, c.Size)
		}
		c.Data = p[ConfigHeaderSize:len(p):len(p)]
		return c, nil
	case ReqGetInflightFD, ReqSetInflightFD:
		if len(p) != InflightDescSize && len(p) != InflightDescSize-4 {
			return nil, fmt.Errorf("%s: payload is %d bytes, want %d", code, len(p), InflightDescSize)
		}
		d := InflightDesc{MmapSize: le.Uint64(p), MmapOffset: le.Uint64(p[8:]),
			NumQueues: le.Uint16(p[16:]), QueueSize: le.Uint16(p[18:])}
		if d.MmapOffset+d.MmapSize < d.MmapOffset {
			return nil, fmt.Errorf("%s: region of %d bytes at %d overflows", code, d.MmapSize, d.MmapOffset)
		}
		return d, nil
	}
	return nil, fmt.Errorf("%s: %w", code, ErrUnknownRequest)
}

// fdRule says how many file descriptors a request carries (vhost-user.rst,
// "Communication": the messages that pass fds).
type fdRule uint8

const (
	fdsNone      fdRule = iota // none
	fdsOne                     // exactly one
	fdsOptional                // zero or one
	fdsPerRegion               // one per memory region (MemTable)
	fdsVring                   // one, or none with the VringFD no-fd bit
)

// msgSpec is what the protocol says of one front-end request beyond its
// payload: the fds it carries, and whether it has a reply body of its own
// (then REPLY_ACK does not apply: "unless the message already has an
// explicit reply body", and a front end does not set NEED_REPLY on it).
type msgSpec struct {
	fds   fdRule
	reply bool
}

// msgSpecs is indexed by request code; codes missing here carry no fds and
// have no reply. REM_MEM_REG may carry an fd, which is closed unused ("MAY
// accept ... MUST close it"); SET_LOG_BASE has a reply when LOG_SHMFD is
// negotiated, which it must be for the message to be accepted.
var msgSpecs = [...]msgSpec{
	ReqGetFeatures:         {reply: true},
	ReqGetProtocolFeatures: {reply: true},
	ReqGetQueueNum:         {reply: true},
	ReqGetMaxMemSlots:      {reply: true},
	ReqGetVringBase:        {reply: true},
	ReqGetConfig:           {reply: true},
	ReqGetInflightFD:       {reply: true},
	ReqGetStatus:           {reply: true},
	ReqSetLogBase:          {fds: fdsOne, reply: true},
	ReqSetMemTable:         {fds: fdsPerRegion},
	ReqAddMemReg:           {fds: fdsOne},
	ReqRemMemReg:           {fds: fdsOptional},
	ReqSetBackendReqFD:     {fds: fdsOne},
	ReqSetInflightFD:       {fds: fdsOne},
	ReqSetLogFD:            {fds: fdsOptional},
	ReqSetVringKick:        {fds: fdsVring},
	ReqSetVringCall:        {fds: fdsVring},
	ReqSetVringErr:         {fds: fdsVring},
}

func specOf(code ReqCode) msgSpec {
	if int(code) < len(msgSpecs) {
		return msgSpecs[code]
	}
	return msgSpec{}
}

// HasReply reports whether a front-end request has a reply body of its
// own, which the back end sends whether or not NEED_REPLY is set.
func HasReply(code ReqCode) bool { return specOf(code).reply }

// wantFDs returns how many file descriptors a decoded request must carry.
func wantFDs(code ReqCode, pl Payload) (min, max int) {
	switch specOf(code).fds {
	case fdsOne:
		return 1, 1
	case fdsOptional:
		return 0, 1
	case fdsPerRegion:
		n := len(pl.(MemTable).Regions)
		return n, n
	case fdsVring:
		if pl.(VringFD).NoFD {
			return 0, 0
		}
		return 1, 1
	}
	return 0, 0
}

// CheckFDs checks the number of fds a decoded request carries; syntax only.
func CheckFDs(code ReqCode, pl Payload, nfds int) error {
	lo, hi := wantFDs(code, pl)
	if nfds < lo || nfds > hi {
		if lo == hi {
			return fmt.Errorf("%s: %d file descriptors, want %d", code, nfds, lo)
		}
		return fmt.Errorf("%s: %d file descriptors, want %d to %d", code, nfds, lo, hi)
	}
	return nil
}
