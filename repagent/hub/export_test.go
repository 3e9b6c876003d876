package hub

import (
	"strings"
	"sync"
	"sync/atomic"
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

// Install makes cfg's hub open its recovery volumes through s.
func (s *FaultyStore) Install(cfg *Config) {
	cfg.openReplica = func(path string) (replicaFile, error) {
		f, err := openReplica(path)
		if err != nil {
			return nil, err
		}
		if s.Match != "" && !strings.Contains(path, s.Match) {
			return f, nil
		}
		return &faultyFile{replicaFile: f, s: s}, nil
	}
}

type faultyFile struct {
	replicaFile
	s *FaultyStore
}

func load(p *atomic.Pointer[error]) error {
	if e := p.Load(); e != nil {
		return *e
	}
	return nil
}

func (f *faultyFile) Datasync() error {
	if err := load(&f.s.SyncErr); err != nil {
		f.s.mu.Lock()
		f.s.syncs++
		f.s.mu.Unlock()
		return err
	}
	return f.replicaFile.Datasync()
}

func (f *faultyFile) Allocate(off, n int64) error {
	if err := load(&f.s.AllocateErr); err != nil {
		return err
	}
	return f.replicaFile.Allocate(off, n)
}

func (f *faultyFile) WriteAt(p []byte, off int64) (int, error) {
	if err := load(&f.s.WriteErr); err != nil {
		return 0, err
	}
	return f.replicaFile.WriteAt(p, off)
}
