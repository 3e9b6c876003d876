// Package mappertest provides fakes for testing targets and devices: a
// memory backend that can crash (dropping writes not yet flushed) and fail
// chosen operations.
package mappertest

import (
	"bytes"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/mapper"
)

// Mem is an in-memory Backend. Writes land in a volatile view; Flush makes
// them durable; Crash throws away what was not flushed, as a power cut
// would. It can be told to fail the Nth operation of a kind.
type Mem struct {
	name string

	mu      sync.Mutex
	data    []byte // what reads see
	durable []byte // what survives Crash
	failOp  map[mapper.Op]int
	counts  map[mapper.Op]int
	flushes int
	closed  bool
	// lost counts the crashes that dropped unflushed writes: a handle
	// opened before such a crash fails its next flush (see Crash).
	lost uint64
}

// NewMem returns a zero-filled memory backend of size bytes.
func NewMem(name string, size int) *Mem {
	return &Mem{name: name, data: make([]byte, size), durable: make([]byte, size),
		failOp: map[mapper.Op]int{}, counts: map[mapper.Op]int{}}
}

// FailNth makes the nth (1-based, counted from now) operation op fail.
func (m *Mem) FailNth(op mapper.Op, n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failOp[op] = m.counts[op] + n
}

func (m *Mem) check(op mapper.Op) error {
	m.counts[op]++
	if n, ok := m.failOp[op]; ok && m.counts[op] == n {
		delete(m.failOp, op)
		return fmt.Errorf("%s: injected %s failure: %w", m.name, op, mapper.ErrIO)
	}
	if m.closed {
		return fmt.Errorf("%s: closed", m.name)
	}
	return nil
}

func (m *Mem) rangeOK(off, n int64) error {
	if off < 0 || n < 0 || off+n > int64(len(m.data)) {
		return fmt.Errorf("%s: range %d+%d outside %d bytes: %w", m.name, off, n, len(m.data), mapper.ErrIO)
	}
	return nil
}

// ReadAt implements mapper.Backend.
func (m *Mem) ReadAt(bufs [][]byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(mapper.OpRead); err != nil {
		return err
	}
	if err := m.rangeOK(off, int64(mapper.BufsLen(bufs))); err != nil {
		return err
	}
	for _, b := range bufs {
		off += int64(copy(b, m.data[off:]))
	}
	return nil
}

// WriteAt implements mapper.Backend.
func (m *Mem) WriteAt(bufs [][]byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(mapper.OpWrite); err != nil {
		return err
	}
	if err := m.rangeOK(off, int64(mapper.BufsLen(bufs))); err != nil {
		return err
	}
	for _, b := range bufs {
		off += int64(copy(m.data[off:], b))
	}
	return nil
}

// Flush implements mapper.Backend: everything written so far survives Crash.
func (m *Mem) Flush() error { return m.flush(nil) }

// flush flushes for a handle that has seen *seen lossy crashes (nil: the
// Mem itself, which reports none): one it has not seen fails the flush.
func (m *Mem) flush(seen *uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(mapper.OpFlush); err != nil {
		return err
	}
	if seen != nil && *seen != m.lost {
		*seen = m.lost
		return fmt.Errorf("%s: flush: writes were lost in a crash: %w", m.name, mapper.ErrIO)
	}
	copy(m.durable, m.data)
	m.flushes++
	return nil
}

// Discard implements mapper.Backend; discarded ranges read as zeros.
func (m *Mem) Discard(off, n int64) error { return m.zero(mapper.OpDiscard, off, n) }

// WriteZeroes implements mapper.Backend.
func (m *Mem) WriteZeroes(off, n int64, unmap bool) error {
	return m.zero(mapper.OpWriteZeroes, off, n)
}

func (m *Mem) zero(op mapper.Op, off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(op); err != nil {
		return err
	}
	if err := m.rangeOK(off, n); err != nil {
		return err
	}
	clear(m.data[off : off+n])
	return nil
}

// Size implements mapper.Backend.
func (m *Mem) Size() (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data)), nil
}

// Identity implements mapper.Identifier.
func (m *Mem) Identity() any { return m }

// Name implements mapper.Backend.
func (m *Mem) Name() string { return m.name }

// Close implements mapper.Backend. A Mem may be opened again after Close
// (tests reuse it across tables), so Close only records the call.
func (m *Mem) Close() error { return nil }

// Crash drops every write not yet flushed, as a power cut of the device
// would. A process that goes on using the device through a handle opened
// before the crash (Set.Open) learns of the loss: that handle's next Flush
// fails, once, as a device reports a write-back it lost. Without that, a
// write completed before the crash and flushed after it would be lost
// although its flush succeeded, which no device may do and no target can
// guard against (a mirror's resync copy would be marked in sync on a leg
// that dropped it). Set.Kill, the power cut that ends the process too,
// leaves nothing to report: the handles it kills fail all I/O and those
// opened after it start from what survived.
func (m *Mem) Crash() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !bytes.Equal(m.data, m.durable) {
		m.lost++
	}
	copy(m.data, m.durable)
}

// Bytes returns a copy of what reads currently see.
func (m *Mem) Bytes() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data...)
}

// Flushes returns how many flushes reached the backend.
func (m *Mem) Flushes() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.flushes
}

// Set is a set of memory backends by name, usable as mapper.ManagerOptions.Open.
type Set struct {
	mu   sync.Mutex
	mems map[string]*Mem
	dead *atomic.Bool // of the handles opened since the last Kill
}

// NewSet returns a set with a backend of size bytes for each name.
func NewSet(size int, names ...string) *Set {
	s := &Set{mems: map[string]*Mem{}, dead: new(atomic.Bool)}
	for _, n := range names {
		s.mems[n] = NewMem(n, size)
	}
	return s
}

// Get returns the backend called name, or nil.
func (s *Set) Get(name string) *Mem {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mems[name]
}

// Open opens the backend called name.
func (s *Set) Open(name string, readOnly bool) (mapper.Backend, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m := s.mems[name]; m != nil {
		m.mu.Lock()
		seen := m.lost
		m.mu.Unlock()
		return handle{m, s.dead, &seen}, nil
	}
	return nil, mapper.Errorf(mapper.ErrNotFound, "open %s: no such memory backend", name)
}

// Kill ends the "process" that opened the backends so far, as kill -9 or a
// power cut would: every backend opened before fails all I/O from now on,
// and every backend drops what was not flushed. Backends opened after Kill
// (by a new manager: the restarted process) work on what survived.
func (s *Set) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dead.Store(true)
	s.dead = new(atomic.Bool)
	for _, m := range s.mems {
		m.Crash()
	}
}

// handle is a backend as one process opened it.
type handle struct {
	*Mem
	dead *atomic.Bool
	seen *uint64 // Mem.lost reported to this handle so far, guarded by Mem.mu
}

func (h handle) alive() error {
	if h.dead.Load() {
		return mapper.Errorf(mapper.ErrIO, "%s: the process that opened it was killed", h.name)
	}
	return nil
}

// ReadAt implements mapper.Backend.
func (h handle) ReadAt(bufs [][]byte, off int64) error {
	if err := h.alive(); err != nil {
		return err
	}
	return h.Mem.ReadAt(bufs, off)
}

// WriteAt implements mapper.Backend.
func (h handle) WriteAt(bufs [][]byte, off int64) error {
	if err := h.alive(); err != nil {
		return err
	}
	return h.Mem.WriteAt(bufs, off)
}

// Flush implements mapper.Backend.
func (h handle) Flush() error {
	if err := h.alive(); err != nil {
		return err
	}
	return h.Mem.flush(h.seen)
}

// Discard implements mapper.Backend.
func (h handle) Discard(off, n int64) error {
	if err := h.alive(); err != nil {
		return err
	}
	return h.Mem.Discard(off, n)
}

// WriteZeroes implements mapper.Backend.
func (h handle) WriteZeroes(off, n int64, unmap bool) error {
	if err := h.alive(); err != nil {
		return err
	}
	return h.Mem.WriteZeroes(off, n, unmap)
}
