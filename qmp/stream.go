package qmp

import (
	"bufio"
	"fmt"
	"io"
)

// maxDepth is the deepest nesting of objects and arrays accepted in one
// message, as QEMU's JSON streamer limits it.
const maxDepth = 1024

// msgReader splits a byte stream into top-level JSON values the way QEMU's
// JSON streamer does: messages need no separator, whitespace between them
// is skipped, and a bad message costs only itself.
//
// It checks framing only; the message is parsed by the caller. On the way it
// rewrites QEMU's single-quoted strings ('...', and the escape \' in either
// kind of string) into standard JSON.
//
// next returns a *Error (GenericError) for a message that cannot be framed:
// a lexical error (a control character other than tab, CR or LF; a 0xFE or
// 0xFF byte, which the QMP specification lets clients send to reset the
// parser), a stray closing bracket, a message longer than max bytes, or
// nesting deeper than maxDepth. Such a message is discarded, without
// buffering more than max bytes of it, and reading resumes after it. Any
// other error is the connection's and ends it.
type msgReader struct {
	r   *bufio.Reader
	max int
	buf []byte
}

func newMsgReader(r io.Reader, max int) *msgReader {
	return &msgReader{r: bufio.NewReaderSize(r, 64<<10), max: max}
}

// lexical reports whether b can appear nowhere in JSON text.
func lexical(b byte, inString bool) bool {
	if b == 0xfe || b == 0xff {
		return true
	}
	if b < 0x20 {
		return inString || (b != '\t' && b != '\r' && b != '\n')
	}
	return false
}

// next returns the next message, normalized to standard JSON. The slice is
// valid until the following call.
func (m *msgReader) next() ([]byte, error) {
	if cap(m.buf) > 64<<10 {
		m.buf = nil // do not keep a large message's buffer
	}
	m.buf = m.buf[:0]
	var (
		depth   int
		quote   byte // the open string's quote, 0 outside strings
		esc     bool // the previous byte was a backslash in a string
		started bool
		bare    bool   // a top-level token that is not a string or bracket
		over    string // why the message is being discarded
	)
	put := func(b ...byte) {
		if over != "" {
			return
		}
		if len(m.buf)+len(b) > m.max {
			over = fmt.Sprintf("JSON parse error, message longer than %d bytes", m.max)
			return
		}
		m.buf = append(m.buf, b...)
	}
	done := func() ([]byte, error) {
		if over != "" {
			return nil, &Error{Class: ClassGenericError, Desc: over}
		}
		return m.buf, nil
	}
	for {
		b, err := m.r.ReadByte()
		if err != nil {
			return nil, err // an unfinished message dies with the connection
		}
		if lexical(b, quote != 0) {
			return nil, &Error{Class: ClassGenericError, Desc: fmt.Sprintf("JSON parse error, stray byte %#02x", b)}
		}
		switch {
		case !started:
			switch b {
			case ' ', '\t', '\r', '\n':
				continue
			case '{', '[':
				depth = 1
			case '"', '\'':
				quote = b
				b = '"'
			case '}', ']':
				return nil, &Error{Class: ClassGenericError, Desc: fmt.Sprintf("JSON parse error, stray '%c'", b)}
			default:
				bare = true
			}
			started = true
			put(b)
			if bare && isDelim(m.peek()) {
				return done()
			}
		case quote != 0:
			switch {
			case esc:
				esc = false
				if b == '\'' {
					put('\'')
				} else {
					put('\\', b)
				}
			case b == '\\':
				esc = true
			case b == quote:
				quote = 0
				put('"')
				if depth == 0 {
					return done() // a top-level string
				}
			case b == '"': // inside a single-quoted string
				put('\\', '"')
			default:
				put(b)
			}
		case bare:
			put(b)
			if isDelim(m.peek()) {
				return done()
			}
		default:
			switch b {
			case '"', '\'':
				quote = b
				b = '"'
			case '{', '[':
				depth++
				if depth > maxDepth && over == "" {
					over = fmt.Sprintf("JSON parse error, nesting deeper than %d", maxDepth)
				}
			case '}', ']':
				depth--
			}
			put(b)
			if depth == 0 {
				return done()
			}
		}
	}
}

// peek returns the next byte without consuming it, or 0 at the end of
// input or on an error (which the next read reports).
func (m *msgReader) peek() byte {
	p, err := m.r.Peek(1)
	if err != nil {
		return 0
	}
	return p[0]
}

// isDelim reports whether b ends a bare token (a number or keyword).
func isDelim(b byte) bool {
	switch b {
	case 0, ' ', '\t', '\r', '\n', '{', '}', '[', ']', '"', '\'', ',', ':':
		return true
	}
	return b < 0x20 || b >= 0xfe
}
