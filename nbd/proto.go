package nbd

import (
	"encoding/binary"
	"fmt"
)

// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
const (
	nbdMagic       = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic       = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic  = 0x0003e889045565a9
	requestMagic   = 0x25609513
	simpleMagic    = 0x67446698
	structureMagic = 0x668e33ef

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	// Transmission flags.
	tfHasFlags        = 1 << 0
	tfReadOnly        = 1 << 1
	tfSendFlush       = 1 << 2
	tfSendFUA         = 1 << 3
	tfSendTrim        = 1 << 5
	tfSendWriteZeroes = 1 << 6
	tfSendDF          = 1 << 7
	tfCanMultiConn    = 1 << 8
	tfSendCache       = 1 << 10
	tfSendFastZero    = 1 << 11

	// Options.
	optExportName       = 1
	optAbort            = 2
	optList             = 3
	optStartTLS         = 5
	optInfo             = 6
	optGo               = 7
	optStructuredReply  = 8
	optListMetaContext  = 9
	optSetMetaContext   = 10
	optExtendedHeaders  = 11
	repAck              = 1
	repServer           = 2
	repInfo             = 3
	repMetaContext      = 4
	repErrBit           = 1 << 31
	repErrUnsup         = repErrBit | 1
	repErrPolicy        = repErrBit | 2
	repErrInvalid       = repErrBit | 3
	repErrTLSReqd       = repErrBit | 5
	repErrUnknown       = repErrBit | 6
	repErrTooBig        = repErrBit | 9
	infoExport          = 0
	infoName            = 1
	infoDescription     = 2
	infoBlockSize       = 3
	maxOptionLen        = 64 << 10 // longer known options are refused (ERR_TOO_BIG)
	maxDiscardOptionLen = 16 << 20 // longer options close the connection
	maxStringLen        = 4096     // the spec's limit on names and queries

	// Commands and their flags.
	cmdRead         = 0
	cmdWrite        = 1
	cmdDisc         = 2
	cmdFlush        = 3
	cmdTrim         = 4
	cmdCache        = 5
	cmdWriteZeroes  = 6
	cmdBlockStatus  = 7
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	// Structured reply chunks.
	replyFlagDone        = 1 << 0
	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 | 1

	// Errors (errno values the protocol fixes).
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108

	// Block size constraints advertised with NBD_INFO_BLOCK_SIZE.
	minBlock       = 512
	preferredBlock = 4096
	// MaxPayload is the largest read or write: QEMU's NBD_MAX_BUFFER_SIZE.
	MaxPayload = 32 << 20

	requestLen = 28
)

// Meta context names.
const (
	ContextBaseAllocation = "base:allocation"
	ContextDirtyPrefix    = "qemu:dirty-bitmap:"
)

// Request is one decoded transmission request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint32
}

// ErrBadMagic is returned by DecodeRequest for a header without the
// request magic: the connection is out of step and must close.
var ErrBadMagic = fmt.Errorf("nbd: bad request magic")

// DecodeRequest decodes a 28-byte request header.
func DecodeRequest(b []byte) (Request, error) {
	if len(b) < requestLen {
		return Request{}, fmt.Errorf("nbd: request header of %d bytes", len(b))
	}
	if binary.BigEndian.Uint32(b) != requestMagic {
		return Request{}, ErrBadMagic
	}
	return Request{
		Flags:  binary.BigEndian.Uint16(b[4:]),
		Type:   binary.BigEndian.Uint16(b[6:]),
		Cookie: binary.BigEndian.Uint64(b[8:]),
		Offset: binary.BigEndian.Uint64(b[16:]),
		Length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// appendU16, appendU32 and appendU64 append big-endian integers.
func appendU16(b []byte, v uint16) []byte { return binary.BigEndian.AppendUint16(b, v) }
func appendU32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
func appendU64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

// optReply builds an option reply header and its data.
func optReply(opt, typ uint32, data []byte) []byte {
	b := make([]byte, 0, 20+len(data))
	b = appendU64(b, optReplyMagic)
	b = appendU32(b, opt)
	b = appendU32(b, typ)
	b = appendU32(b, uint32(len(data)))
	return append(b, data...)
}

// simpleReply builds a simple reply header.
func simpleReply(b []byte, errno uint32, cookie uint64) []byte {
	b = appendU32(b, simpleMagic)
	b = appendU32(b, errno)
	return appendU64(b, cookie)
}

// chunkHeader builds a structured reply chunk header.
func chunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) []byte {
	b = appendU32(b, structureMagic)
	b = appendU16(b, flags)
	b = appendU16(b, typ)
	b = appendU64(b, cookie)
	return appendU32(b, length)
}

// reader decodes option payloads with bounds checks.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) u16() uint16 {
	if len(r.b) < 2 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

func (r *reader) u32() uint32 {
	if len(r.b) < 4 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

// str reads a u32-length-prefixed string of at most maxStringLen bytes.
func (r *reader) str() string {
	n := r.u32()
	if r.bad || n > maxStringLen || uint64(n) > uint64(len(r.b)) {
		r.bad = true
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}
