package journal

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"time"
)

// Kind is the kind of a journal record. The values are part of the on-disk
// format.
type Kind uint8

// Record kinds.
const (
	// KindWrite: Data written at Offset of Volume.
	KindWrite Kind = 1
	// KindZero: Length bytes at Offset of Volume read as zeroes (write-zeroes).
	KindZero Kind = 2
	// KindDiscard: Length bytes at Offset of Volume discarded; the replica
	// reads them as zeroes.
	KindDiscard Kind = 3
	// KindResyncBegin opens a resync set (or extends the one already open).
	KindResyncBegin Kind = 4
	// KindResyncEnd closes the open resync set.
	KindResyncEnd Kind = 5
	// KindCheckpoint names the consistent point at its end (Checkpoint).
	KindCheckpoint Kind = 6
	// KindVolume adds Volume with Size bytes, or resizes it.
	KindVolume Kind = 7
)

var kindNames = [...]string{
	KindWrite:       "write",
	KindZero:        "zero",
	KindDiscard:     "discard",
	KindResyncBegin: "resync-begin",
	KindResyncEnd:   "resync-end",
	KindCheckpoint:  "checkpoint",
	KindVolume:      "volume",
}

// String returns the kind's name as FORMAT.md spells it.
func (k Kind) String() string {
	if int(k) < len(kindNames) && kindNames[k] != "" {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Limits of a record; part of the on-disk format (a reader refuses more).
const (
	// MaxNameLen is the longest volume or checkpoint name, in bytes.
	MaxNameLen = 128
	// MaxWriteBytes is the largest Data of one write record.
	MaxWriteBytes = 16 << 20
	// MaxVolumeSize is the largest volume size, in bytes (1 PiB).
	MaxVolumeSize = 1 << 50
)

// Record is one entry of a VM's journal.
//
// Which fields a kind uses: write: Volume, Offset, Data; zero and discard:
// Volume, Offset, Length; volume: Volume, Size; checkpoint: Checkpoint;
// resync-begin and resync-end: none. Offsets, lengths and sizes are in bytes.
type Record struct {
	Kind       Kind
	Volume     string
	Checkpoint string
	Offset     int64
	Length     int64
	Size       int64
	// Data is copied by Submit; the caller may reuse it once Submit
	// returns. Records returned by Scan hold Data only for the callback.
	Data []byte
	// Seq is the agent's write-order sequence number, valid when HasSeq.
	// Sequence numbers are strictly increasing over a journal.
	Seq    uint64
	HasSeq bool
	// Time is the record's wall-clock time. Submit stamps a zero Time with
	// the current time, and raises a Time older than the previous record's
	// to that one's, so times never go backwards in a journal.
	Time time.Time
}

// On-disk record header layout (little endian). See FORMAT.md.
const (
	recHeaderLen = 32
	flagHasSeq   = 1
)

var (
	le         = binary.LittleEndian
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

// bodyLen returns the length of the kind-specific part after the name.
func (r *Record) bodyLen() int {
	switch r.Kind {
	case KindWrite:
		return 8 + len(r.Data)
	case KindZero, KindDiscard:
		return 16
	case KindVolume:
		return 8
	}
	return 0
}

func (r *Record) name() string {
	if r.Kind == KindCheckpoint {
		return r.Checkpoint
	}
	return r.Volume
}

// encodedLen returns the record's length on disk.
func (r *Record) encodedLen() int {
	return recHeaderLen + len(r.name()) + r.bodyLen()
}

// appendRecord appends r's encoding to buf; r must be valid.
func appendRecord(buf []byte, r *Record) []byte {
	return appendRecordHead(buf, r, true)
}

// appendRecordHead appends r's encoding to buf, without a write's data
// unless withData: the caller writes the data right after what it
// appended (the checksum covers it).
func appendRecordHead(buf []byte, r *Record, withData bool) []byte {
	n := r.encodedLen()
	start := len(buf)
	buf = append(buf, make([]byte, recHeaderLen)...)
	h := buf[start:]
	le.PutUint32(h[0:], uint32(n))
	h[8] = byte(r.Kind)
	if r.HasSeq {
		h[9] = flagHasSeq
	}
	name := r.name()
	le.PutUint16(h[10:], uint16(len(name)))
	le.PutUint64(h[16:], r.Seq)
	le.PutUint64(h[24:], uint64(r.Time.UnixNano()))
	buf = append(buf, name...)
	switch r.Kind {
	case KindWrite:
		buf = le.AppendUint64(buf, uint64(r.Offset))
		if withData {
			buf = append(buf, r.Data...)
		}
	case KindZero, KindDiscard:
		buf = le.AppendUint64(buf, uint64(r.Offset))
		buf = le.AppendUint64(buf, uint64(r.Length))
	case KindVolume:
		buf = le.AppendUint64(buf, uint64(r.Size))
	}
	crc := crc32.Checksum(buf[start+8:], castagnoli)
	if r.Kind == KindWrite && !withData {
		crc = crc32.Update(crc, castagnoli, r.Data)
	}
	le.PutUint32(buf[start+4:], crc)
	return buf
}

// headerLen returns the total record length announced by a record header,
// checking it against the limits before anything is read.
func headerLen(h []byte) (int, error) {
	n := int(le.Uint32(h[0:]))
	if n < recHeaderLen || n > recHeaderLen+MaxNameLen+8+MaxWriteBytes {
		return 0, fmt.Errorf("record length %d out of range", n)
	}
	return n, nil
}

// decodeRecord decodes a whole record b (header included) whose length was
// checked by headerLen. Data aliases b.
func decodeRecord(b []byte) (Record, error) {
	if got, want := crc32.Checksum(b[8:], castagnoli), le.Uint32(b[4:]); got != want {
		return Record{}, fmt.Errorf("record crc32c %#08x, want %#08x", got, want)
	}
	r := Record{
		Kind:   Kind(b[8]),
		HasSeq: b[9]&flagHasSeq != 0,
		Seq:    le.Uint64(b[16:]),
		Time:   time.Unix(0, int64(le.Uint64(b[24:]))).UTC(),
	}
	if b[9]&^flagHasSeq != 0 || le.Uint32(b[12:]) != 0 {
		return Record{}, fmt.Errorf("record has unknown flags")
	}
	nl := int(le.Uint16(b[10:]))
	if nl > MaxNameLen || recHeaderLen+nl > len(b) {
		return Record{}, fmt.Errorf("record name length %d out of range", nl)
	}
	name := string(b[recHeaderLen : recHeaderLen+nl])
	body := b[recHeaderLen+nl:]
	need := 0
	switch r.Kind {
	case KindWrite:
		need = 8
	case KindZero, KindDiscard:
		need = 16
	case KindVolume:
		need = 8
	case KindResyncBegin, KindResyncEnd, KindCheckpoint:
	default:
		return Record{}, fmt.Errorf("unknown record kind %d", b[8])
	}
	if len(body) < need || (r.Kind != KindWrite && len(body) != need) {
		return Record{}, fmt.Errorf("%s record body is %d bytes", r.Kind, len(body))
	}
	switch r.Kind {
	case KindWrite:
		r.Volume = name
		r.Offset = int64(le.Uint64(body))
		r.Data = body[8:]
	case KindZero, KindDiscard:
		r.Volume = name
		r.Offset = int64(le.Uint64(body))
		r.Length = int64(le.Uint64(body[8:]))
	case KindVolume:
		r.Volume = name
		r.Size = int64(le.Uint64(body))
	case KindCheckpoint:
		r.Checkpoint = name
	default:
		if nl != 0 {
			return Record{}, fmt.Errorf("%s record has a name", r.Kind)
		}
	}
	return r, nil
}

// ValidName reports whether s is a usable volume or checkpoint name: 1 to
// MaxNameLen bytes of ASCII letters, digits, '.', '_', '-', not "." or "..".
// Volume names become file names in the VM's directory.
func ValidName(s string) bool {
	if s == "" || len(s) > MaxNameLen || s == "." || s == ".." {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}
