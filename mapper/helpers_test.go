package mapper_test

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/looptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	_ "github.com/vhostdm/vhostdm/targets"
)

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func newFuzzSet() *mappertest.Set { return mappertest.NewSet(1<<20, "a", "b", "c") }

// engineDevice makes a device of one linear line over a fresh file of
// size bytes, with cache mode cache, in dir.
func engineDevice(t testing.TB, dir string, size int64, cache mapper.CacheMode) (*mapper.Device, string) {
	t.Helper()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
	t.Cleanup(func() { m.Close() })
	d, err := m.CreateTableWith("e", "", mapper.DeviceOptions{Cache: cache}, fmt.Sprintf("0 %d linear %s 0\n", size/512, path))
	if err != nil {
		t.Fatal(err)
	}
	return d, path
}

// results collects an IOQueue's completions by tag.
type results struct {
	mu   sync.Mutex
	got  map[uint64]error
	cond *sync.Cond
}

func newResults() *results {
	r := &results{got: map[uint64]error{}}
	r.cond = sync.NewCond(&r.mu)
	return r
}

func (r *results) complete(tag uint64, err error) {
	r.mu.Lock()
	r.got[tag] = err
	r.mu.Unlock()
	r.cond.Broadcast()
}

func (r *results) wait(tag uint64) error {
	_, err := r.waitUntil(tag, time.Time{})
	return err
}

// waitWithin is wait that fails the test when tag has not completed
// within d: a request the engine never submitted would hang wait.
func (r *results) waitWithin(t testing.TB, tag uint64, d time.Duration) error {
	t.Helper()
	timer := time.AfterFunc(d, func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.cond.Broadcast()
	})
	defer timer.Stop()
	ok, err := r.waitUntil(tag, time.Now().Add(d))
	if !ok {
		t.Fatalf("request %d: not completed within %v", tag, d)
	}
	return err
}

// waitUntil waits for tag's completion and takes its result; with a
// non-zero deadline it gives up (ok false) once the deadline has passed
// and cond is broadcast.
func (r *results) waitUntil(tag uint64, deadline time.Time) (ok bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		if err, ok := r.got[tag]; ok {
			delete(r.got, tag)
			return true, err
		}
		if !deadline.IsZero() && !time.Now().Before(deadline) {
			return false, nil
		}
		r.cond.Wait()
	}
}

// blockDevice makes a device of one linear line over a loop device on a
// fresh file of size bytes, with cache mode cache.
func blockDevice(t testing.TB, size int64, cache mapper.CacheMode) *mapper.Device {
	t.Helper()
	path := filepath.Join(t.TempDir(), "loop.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	dev := looptest.Attach(t, path, 512)
	m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
	t.Cleanup(func() { m.Close() })
	d, err := m.CreateTableWith("b", "", mapper.DeviceOptions{Cache: cache}, fmt.Sprintf("0 %d linear %s 0\n", size/512, dev))
	if err != nil {
		t.Fatal(err)
	}
	return d
}
