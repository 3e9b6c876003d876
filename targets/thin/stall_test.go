package thin_test

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets" // delay
)

// TestCommitStall: guest reads and writes go on while the pool commits.
// The metadata device is a delay target whose flushes take 1 s, so a
// commit (two metadata flushes) takes at least 2 s; a writer provisions,
// overwrites, discards and reads blocks for 8 s while another goroutine
// flushes in a loop (each flush after a change commits). The bound, half
// a metadata flush, leaves room for a host shared by many busy processes
// (the race detector's 100-200 ms scheduling gaps). The longest read or
// write must stay well under one metadata flush: commits do their
// metadata I/O without the pool's lock.
func TestCommitStall(t *testing.T) {
	const flushDelay = time.Second
	// Files in memory where the host has /dev/shm: the stall measured is
	// the pool's, not the host disk's under a shared load (an fsync of
	// the data file holds up writes to it).
	dir := t.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "thinstall"); err == nil {
		dir = d
		defer os.RemoveAll(d)
	}
	meta, data := filepath.Join(dir, "meta.img"), filepath.Join(dir, "data.img")
	mkfile(t, meta, 4<<20)
	mkfile(t, data, 8192*128*512)
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	mk := func(name, table string) *mapper.Device {
		t.Helper()
		d, err := m.CreateTable(name, "", false, table)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	mk("mdelay", fmt.Sprintf("0 %d delay %s 0 0 %s 0 0 %s 0 %d", 4<<20/512, meta, meta, meta, flushDelay.Milliseconds()))
	pool := mk("pool", fmt.Sprintf("0 %d thin-pool /dev/mapper/mdelay %s 128 0 1 skip_block_zeroing", 8192*128, data))
	if _, err := pool.Message(0, []string{"create_thin", "1"}); err != nil {
		t.Fatal(err)
	}
	d := mk("t1", "0 131072 thin /dev/mapper/pool 1")

	var (
		wg      sync.WaitGroup
		stop    = make(chan struct{})
		commits atomic.Int64
		commitT atomic.Int64 // longest commit, ns
	)
	wg.Add(1)
	go func() { // the committer
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			t0 := time.Now()
			if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
				t.Error(err)
				return
			}
			el := time.Since(t0)
			if el >= 2*flushDelay { // a flush that committed metadata
				commits.Add(1)
			}
			if int64(el) > commitT.Load() {
				commitT.Store(int64(el))
			}
		}
	}()
	rng := rand.New(rand.NewPCG(5, 5))
	var worst time.Duration
	var ops int
	buf := make([]byte, 4096)
	deadline := time.Now().Add(8 * time.Second)
	for time.Now().Before(deadline) {
		vb := rng.Uint64N(1024)
		r := &mapper.Request{Op: mapper.OpWrite, Sector: vb*128 + rng.Uint64N(120), Sectors: 8, Data: [][]byte{buf}}
		switch rng.IntN(10) {
		case 0, 1, 2:
			r.Op = mapper.OpRead
		case 3: // unmap the block: the next write provisions it again
			r = &mapper.Request{Op: mapper.OpDiscard, Sector: vb * 128, Sectors: 128}
		}
		t0 := time.Now()
		if err := d.Submit(r); err != nil {
			t.Fatal(err)
		}
		worst = max(worst, time.Since(t0))
		ops++
	}
	close(stop)
	wg.Wait()
	t.Logf("%d reads, writes and discards, %d commits (longest %v); longest read, write or discard %v",
		ops, commits.Load(), time.Duration(commitT.Load()), worst)
	if commits.Load() < 2 {
		t.Fatalf("only %d commits ran", commits.Load())
	}
	if c := time.Duration(commitT.Load()); c < 2*flushDelay {
		t.Fatalf("longest commit %v: the metadata flush delay did not apply", c)
	}
	if worst >= flushDelay/2 {
		t.Fatalf("a read, write or discard waited %v during commits (bound %v): commit blocks guest I/O", worst, flushDelay/2)
	}
}
