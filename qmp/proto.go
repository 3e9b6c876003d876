package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/vhostdm/vhostdm/mapper"
)

// QMP error classes, as QEMU's QAPI schema names them (qapi/error.json).
// vhostdm uses the first three.
const (
	ClassGenericError    = "GenericError"
	ClassCommandNotFound = "CommandNotFound"
	ClassDeviceNotFound  = "DeviceNotFound"
	ClassDeviceNotActive = "DeviceNotActive"
)

// Error is a QMP error response's "error" member. Errors a client causes
// carry QEMU's class and a text close to QEMU's for the same mistake. An
// Exports implementation may return an *Error to choose the class itself;
// any other error becomes a GenericError with the error's text.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error returns the description.
func (e *Error) Error() string { return e.Desc }

func genericf(format string, args ...any) *Error {
	return &Error{Class: ClassGenericError, Desc: fmt.Sprintf(format, args...)}
}

// deviceNotFound marks a mapper.ErrNotFound that is about the device a
// command names (not, say, a backend a table names); see errorFor.
type deviceNotFound struct{ err error }

func (e *deviceNotFound) Error() string { return e.err.Error() }
func (e *deviceNotFound) Unwrap() error { return e.err }

// lookupErr marks err as the failure to find the device a command names
// when it has the class mapper.ErrNotFound.
func lookupErr(err error) error {
	if errors.Is(err, mapper.ErrNotFound) {
		return &deviceNotFound{err}
	}
	return err
}

// errorFor is the one place where errors become QMP errors:
//
//   - an *Error (protocol, argument and export errors) keeps its class;
//   - mapper.ErrNotFound for the device a command names (dm-info, dm-load,
//     ...) is DeviceNotFound, as QEMU's for a device id it cannot find;
//   - everything else is GenericError, as QEMU reports invalid
//     configuration: mapper.ErrInvalid (table text, arguments, messages,
//     with the line number), ErrExists, ErrBusy, ErrNoTable, ErrReadOnly,
//     ErrCorrupt, ErrIO, ErrUnsupported, and ErrNotFound for things a table
//     names (an unknown target type, a missing file or device).
//
// The description is the error's text.
func errorFor(err error) *Error {
	var qe *Error
	var nf *deviceNotFound
	switch {
	case errors.As(err, &qe):
		return qe
	case errors.As(err, &nf):
		return &Error{Class: ClassDeviceNotFound, Desc: err.Error()}
	default:
		return &Error{Class: ClassGenericError, Desc: err.Error()}
	}
}

// response is a command's reply: exactly one of Return and Error is set.
// ID echoes the request's id, when it had one, verbatim.
type response struct {
	Return any             `json:"return,omitempty"`
	Error  *Error          `json:"error,omitempty"`
	ID     json.RawMessage `json:"id,omitempty"`
}

// timestamp is an event's time, relative to the Unix epoch.
type timestamp struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

// eventMsg is an asynchronous event.
type eventMsg struct {
	Event     string    `json:"event"`
	Data      any       `json:"data,omitempty"`
	Timestamp timestamp `json:"timestamp"`
}

func stamp(t time.Time) timestamp {
	return timestamp{Seconds: t.Unix(), Microseconds: int64(t.Nanosecond() / 1000)}
}

// versionTriple is QEMU's VersionTriple.
type versionTriple struct {
	Major int `json:"major"`
	Minor int `json:"minor"`
	Micro int `json:"micro"`
}

// versionInfo is QEMU's VersionInfo: the greeting's "version" and
// query-version's return.
type versionInfo struct {
	QEMU    versionTriple `json:"qemu"`
	Package string        `json:"package"`
}

func parseVersion(v string) versionInfo {
	vi := versionInfo{Package: strings.TrimSpace("vhostdm " + v)}
	parts := strings.SplitN(v, ".", 3)
	dst := []*int{&vi.QEMU.Major, &vi.QEMU.Minor, &vi.QEMU.Micro}
	for i, p := range parts {
		end := 0
		for end < len(p) && p[end] >= '0' && p[end] <= '9' {
			end++
		}
		n, _ := strconv.Atoi(p[:end])
		*dst[i] = n
	}
	return vi
}

type greeting struct {
	QMP struct {
		Version      versionInfo `json:"version"`
		Capabilities []string    `json:"capabilities"`
	} `json:"QMP"`
}

// encode marshals v as one QMP message: JSON in ASCII (the server "sends
// its output encoded in ASCII", so other characters are \u escapes),
// terminated by CRLF.
func encode(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	out := bytes.TrimSuffix(b.Bytes(), []byte("\n"))
	out = asciiOnly(out)
	return append(out, '\r', '\n'), nil
}

// asciiOnly escapes every non-ASCII character of encoded JSON as \uXXXX
// (with surrogate pairs above U+FFFF). Such characters occur only inside
// strings, where the escape means the same.
func asciiOnly(b []byte) []byte {
	i := 0
	for i < len(b) && b[i] < utf8.RuneSelf {
		i++
	}
	if i == len(b) {
		return b
	}
	out := make([]byte, 0, len(b)+16)
	out = append(out, b[:i]...)
	for i < len(b) {
		if b[i] < utf8.RuneSelf {
			out = append(out, b[i])
			i++
			continue
		}
		r, n := utf8.DecodeRune(b[i:])
		i += n
		if r > 0xffff {
			r -= 0x10000
			out = fmt.Appendf(out, `\u%04x\u%04x`, 0xd800+(r>>10), 0xdc00+(r&0x3ff))
		} else {
			out = fmt.Appendf(out, `\u%04x`, r)
		}
	}
	return out
}
