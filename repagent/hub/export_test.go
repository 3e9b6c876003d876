package hub

import (
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/repagent/hub/journal"
)

// FaultyStore makes the recovery volumes of a hub fail on demand, as a
// failing disk or a full file system would: tests arm its errors.
type FaultyStore struct {
	SyncErr     atomic.Pointer[error] // returned by every fdatasync while set
	AllocateErr atomic.Pointer[error] // returned by every fallocate while set
	WriteErr    atomic.Pointer[error] // returned by every write while set
	// Match, when not empty, limits the faults to the images whose path
	// contains it.
	Match string

	mu    sync.Mutex
	syncs int // fdatasync calls that failed
}

// Fail sets what an operation returns; nil heals it.
func Fail(p *atomic.Pointer[error], err error) {
	if err == nil {
		p.Store(nil)
		return
	}
	p.Store(&err)
}

// FailedSyncs returns the number of fdatasync calls that failed.
func (s *FaultyStore) FailedSyncs() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.syncs
}

// Install makes cfg's hub journal through s: SyncErr fails the journal's
// and the replica images' fdatasync, WriteErr and AllocateErr (ENOSPC)
// their writes and preallocation.
func (s *FaultyStore) Install(cfg *Config) {
	cfg.faultHook = func(op, path string) error {
		if s.Match != "" && !strings.Contains(path, s.Match) {
			return nil
		}
		switch op {
		case "segment-sync", "image-sync":
			if err := load(&s.SyncErr); err != nil {
				s.mu.Lock()
				s.syncs++
				s.mu.Unlock()
				return err
			}
		case "segment-write", "image-write":
			if err := load(&s.WriteErr); err != nil {
				return err
			}
			return load(&s.AllocateErr)
		}
		return nil
	}
}

func load(p *atomic.Pointer[error]) error {
	if e := p.Load(); e != nil {
		return *e
	}
	return nil
}

// Journal returns vm's open journal (nil if none), for tests that put a
// record in it past the hub.
func (h *Hub) Journal(vm string) *journal.Journal {
	h.mu.Lock()
	defer h.mu.Unlock()
	if v := h.vms[vm]; v != nil {
		return v.j
	}
	return nil
}
