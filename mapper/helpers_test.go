package mapper_test

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

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
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		if err, ok := r.got[tag]; ok {
			delete(r.got, tag)
			return err
		}
		r.cond.Wait()
	}
}
