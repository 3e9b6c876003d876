package journal

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Segment file header: part of the on-disk format (see FORMAT.md).
const (
	segHeaderLen = 32
	segVersion   = 1
	segSuffix    = ".seg"
	segDirName   = "journal"
)

var segMagic = [8]byte{'V', 'H', 'D', 'M', 'J', 'N', 'L', 0}

// segment is one segment: records from logical position start on, in
// store st under the name path.
type segment struct {
	start int64
	path  string
	st    Store
}

func segName(start int64) string { return fmt.Sprintf("%016x%s", start, segSuffix) }

func encodeSegHeader(start int64) []byte {
	h := make([]byte, segHeaderLen)
	copy(h, segMagic[:])
	le.PutUint32(h[8:], segVersion)
	le.PutUint64(h[16:], uint64(start))
	le.PutUint32(h[24:], crc32.Checksum(h[:24], castagnoli))
	return h
}

func checkSegHeader(h []byte, start int64) error {
	if len(h) < segHeaderLen {
		return fmt.Errorf("segment header is %d bytes", len(h))
	}
	if !bytes.Equal(h[:8], segMagic[:]) {
		return fmt.Errorf("bad segment magic %q", h[:8])
	}
	if got, want := crc32.Checksum(h[:24], castagnoli), le.Uint32(h[24:]); got != want {
		return fmt.Errorf("segment header crc32c %#08x, want %#08x", got, want)
	}
	if v := le.Uint32(h[8:]); v != segVersion {
		return fmt.Errorf("segment version %d, want %d", v, segVersion)
	}
	if s := int64(le.Uint64(h[16:])); s != start {
		return fmt.Errorf("segment header says start %d, file name says %d", s, start)
	}
	return nil
}

// listSegments returns the segment files of dir, sorted by start.
func listSegments(dir string) ([]segment, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var segs []segment
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, segSuffix) {
			continue
		}
		start, err := strconv.ParseInt(strings.TrimSuffix(name, segSuffix), 16, 64)
		if err != nil || start < 0 || segName(start) != name {
			return nil, fmt.Errorf("%w: unexpected file %s in %s", ErrCorrupt, name, dir)
		}
		segs = append(segs, segment{start: start, path: filepath.Join(dir, name), st: DirStore(filepath.Dir(dir))})
	}
	sort.Slice(segs, func(a, b int) bool { return segs[a].start < segs[b].start })
	return segs, nil
}

// tornError reports a record that cannot be read at pos: torn, corrupt or
// cut short.
type tornError struct {
	header bool // the segment header is bad
	pos    int64
	seg    int // index of the segment in the reader's list
	reason error
}

func (e *tornError) Error() string {
	return fmt.Sprintf("%v: at position %d: %v", ErrCorrupt, e.pos, e.reason)
}

func (e *tornError) Unwrap() error { return ErrCorrupt }

// reader reads records from a snapshot of the segment list, from a position
// to an end position (or to the end of the last segment when to < 0).
type reader struct {
	segs []segment
	idx  int
	pos  int64
	to   int64
	f    Segment
	br   *bufio.Reader
	hdr  [recHeaderLen]byte
	buf  []byte
	// headersOnly: next returns the header's fields (kind, sequence
	// number, time) of records it skips without reading or checking
	// them; the applier's scan for its target, whose records the pass
	// then reads and checks.
	headersOnly bool
	// bufs, when set, lends br and buf and takes them back at close:
	// fresh megabytes for every pass cost a page fault per page.
	bufs *sync.Pool
}

// readerBufs are a reader's buffers, kept between readers in a pool.
type readerBufs struct {
	br  *bufio.Reader
	buf []byte
}

// readerBufSize is a reader's buffer: records up to this size are
// returned from it without a copy.
const readerBufSize = 1<<20 + 64<<10

// newReader returns a reader from position from to position to (the end
// of the last segment when to < 0); bufs (may be nil) lends it buffers.
func newReader(segs []segment, from, to int64, bufs *sync.Pool) (*reader, error) {
	r := &reader{segs: segs, pos: from, to: to, idx: -1, bufs: bufs}
	if bufs != nil {
		if b, ok := bufs.Get().(*readerBufs); ok {
			r.br, r.buf = b.br, b.buf
		}
	}
	if len(segs) == 0 || from < segs[0].start {
		return nil, fmt.Errorf("%w: position %d is not in the journal", ErrCorrupt, from)
	}
	for i := range segs {
		if segs[i].start <= from {
			r.idx = i
		}
	}
	if err := r.open(); err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

// segEnd returns the logical end of the current segment, or -1 for the last.
func (r *reader) segEnd() int64 {
	if r.idx+1 < len(r.segs) {
		return r.segs[r.idx+1].start
	}
	return -1
}

func (r *reader) open() error {
	if r.f != nil {
		r.f.Close()
		r.f = nil
	}
	s := r.segs[r.idx]
	f, err := s.st.OpenSegment(s.start)
	if err != nil {
		return fmt.Errorf("open segment: %w", err)
	}
	var h [segHeaderLen]byte
	if n, err := f.ReadAt(h[:], 0); n < segHeaderLen {
		f.Close()
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read segment %s: %w", s.path, err)
		}
		return &tornError{header: true, pos: s.start, seg: r.idx, reason: fmt.Errorf("segment %s: short header", s.path)}
	}
	if err := checkSegHeader(h[:], s.start); err != nil {
		f.Close()
		return &tornError{header: true, pos: s.start, seg: r.idx, reason: fmt.Errorf("segment %s: %w", s.path, err)}
	}
	r.f = f
	sr := io.NewSectionReader(f, segHeaderLen+r.pos-s.start, math.MaxInt64-segHeaderLen-r.pos)
	if r.br == nil {
		r.br = bufio.NewReaderSize(sr, readerBufSize)
	} else {
		r.br.Reset(sr)
	}
	return nil
}

func (r *reader) close() {
	if r.f != nil {
		r.f.Close()
		r.f = nil
	}
	if r.bufs != nil && r.br != nil {
		r.br.Reset(nil)
		r.bufs.Put(&readerBufs{br: r.br, buf: r.buf[:0]})
		r.br, r.buf, r.bufs = nil, nil, nil
	}
}

// next returns the record at the reader's position and the positions of its
// start and end. It returns io.EOF at the end position, or at a clean end of
// the last segment when reading to its end. Data aliases an internal buffer,
// valid until the next call.
func (r *reader) next() (rec Record, start, end int64, err error) {
	if r.to >= 0 && r.pos >= r.to {
		return Record{}, 0, 0, io.EOF
	}
	if e := r.segEnd(); e >= 0 && r.pos >= e {
		if r.pos > e {
			return Record{}, 0, 0, &tornError{pos: r.pos, seg: r.idx, reason: fmt.Errorf("record crosses segment end %d", e)}
		}
		r.idx++
		if err := r.open(); err != nil {
			return Record{}, 0, 0, err
		}
	}
	torn := func(format string, a ...any) error {
		return &tornError{pos: r.pos, seg: r.idx, reason: fmt.Errorf(format, a...)}
	}
	hb, err := r.br.Peek(recHeaderLen)
	n := copy(r.hdr[:], hb)
	if err != nil {
		if errors.Is(err, io.EOF) && n > 0 {
			err = io.ErrUnexpectedEOF
		}
		if errors.Is(err, io.EOF) && n == 0 {
			if r.segEnd() < 0 && r.to < 0 {
				return Record{}, 0, 0, io.EOF
			}
			return Record{}, 0, 0, torn("segment ends before position %d", r.to)
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return Record{}, 0, 0, torn("short record header (%d bytes)", n)
		}
		return Record{}, 0, 0, fmt.Errorf("read segment: %w", err)
	}
	size, err := headerLen(r.hdr[:])
	if err != nil {
		return Record{}, 0, 0, torn("%v", err)
	}
	if e := r.segEnd(); e >= 0 && r.pos+int64(size) > e {
		return Record{}, 0, 0, torn("record of %d bytes crosses segment end %d", size, e)
	}
	if r.to >= 0 && r.pos+int64(size) > r.to {
		return Record{}, 0, 0, torn("record of %d bytes crosses end %d", size, r.to)
	}
	if r.headersOnly {
		// Skipped unread: the header's fields only, unchecked.
		if k, err := r.br.Discard(size); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return Record{}, 0, 0, torn("short record (%d of %d bytes)", k, size)
			}
			return Record{}, 0, 0, fmt.Errorf("read segment: %w", err)
		}
		rec = Record{Kind: Kind(r.hdr[8]), HasSeq: r.hdr[9]&flagHasSeq != 0, Seq: le.Uint64(r.hdr[16:]),
			Time: time.Unix(0, int64(le.Uint64(r.hdr[24:]))).UTC()}
		start = r.pos
		r.pos += int64(size)
		return rec, start, r.pos, nil
	}
	var b []byte
	if size <= r.br.Size() {
		// The record in the reader's buffer, not copied.
		b, err = r.br.Peek(size)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return Record{}, 0, 0, torn("short record (%d of %d bytes)", len(b), size)
			}
			return Record{}, 0, 0, fmt.Errorf("read segment: %w", err)
		}
		r.br.Discard(size)
	} else {
		r.br.Discard(recHeaderLen)
		if cap(r.buf) < size {
			r.buf = make([]byte, size, size+size/4)
		}
		b = r.buf[:size]
		copy(b, r.hdr[:])
		if n, err := io.ReadFull(r.br, b[recHeaderLen:]); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return Record{}, 0, 0, torn("short record (%d of %d bytes)", recHeaderLen+n, size)
			}
			return Record{}, 0, 0, fmt.Errorf("read segment: %w", err)
		}
	}
	rec, err = decodeRecord(b)
	if err != nil {
		return Record{}, 0, 0, torn("%v", err)
	}
	start = r.pos
	r.pos += int64(size)
	return rec, start, r.pos, nil
}
