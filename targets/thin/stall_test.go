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
// flushes in a loop (each flush after a change commits). The bound is
// half a metadata flush plus the longest stall the host itself imposed
// meanwhile on a goroutine that does nothing but sleep 1 ms (a loaded,
// shared host stalls any goroutine); a commit that held the lock across
// its I/O stalls guest I/O for both flushes, 2 s. The longest read or
// write must stay well under one metadata flush: commits do their
// metadata I/O without the pool's lock.
func TestCommitStall(t *testing.T) {
	const flushDelay = time.Second
	// The metadata file in memory where the host has /dev/shm: the
	// metadata I/O is the delay target's.
	dir := t.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "thinstall"); err == nil {
		dir = d
		defer os.RemoveAll(d)
	}
	meta := filepath.Join(dir, "meta.img")
	mkfile(t, meta, 4<<20)
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
	// The data device is a zero target: guest data costs no I/O, so a
	// stall is the pool's and not a host disk's under a shared load.
	mk("dzero", fmt.Sprintf("0 %d zero", 16384*128))
	pool := mk("pool", fmt.Sprintf("0 %d thin-pool /dev/mapper/mdelay /dev/mapper/dzero 128 0 1 skip_block_zeroing", 16384*128))
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
	// The probe measures the host's own stalls (scheduling, GC) on a
	// goroutine that touches nothing of the pool: on a host shared by
	// many busy processes they reach hundreds of milliseconds.
	var noise atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			t0 := time.Now()
			time.Sleep(time.Millisecond)
			if late := int64(time.Since(t0) - time.Millisecond); late > noise.Load() {
				noise.Store(late)
			}
		}
	}()
	rng := rand.New(rand.NewPCG(5, 5))
	var worst time.Duration
	var ops int
	var lastDiscard time.Time
	buf := make([]byte, 4096)
	deadline := time.Now().Add(8 * time.Second)
	for time.Now().Before(deadline) {
		vb := rng.Uint64N(1024)
		r := &mapper.Request{Op: mapper.OpWrite, Sector: vb*128 + rng.Uint64N(120), Sectors: 8, Data: [][]byte{buf}}
		// A discarded block is free again only once the commit has
		// landed: with one discard in 50 requests, and at most one a
		// millisecond (8,000 in the run, whatever the machine's speed),
		// the pool of 16384 blocks for 1024 virtual ones never runs
		// short (which would make a write wait for the commit, rightly).
		switch rng.IntN(50) {
		case 0:
			if time.Since(lastDiscard) < time.Millisecond {
				break
			}
			lastDiscard = time.Now()
			r = &mapper.Request{Op: mapper.OpDiscard, Sector: vb * 128, Sectors: 128}
		case 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15:
			r.Op = mapper.OpRead
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
	hostStall := time.Duration(noise.Load())
	t.Logf("%d reads, writes and discards, %d commits (longest %v); longest read, write or discard %v; longest host stall %v",
		ops, commits.Load(), time.Duration(commitT.Load()), worst, hostStall)
	if commits.Load() < 2 {
		t.Fatalf("only %d commits ran", commits.Load())
	}
	if c := time.Duration(commitT.Load()); c < 2*flushDelay {
		t.Fatalf("longest commit %v: the metadata flush delay did not apply", c)
	}
	if bound := flushDelay/2 + hostStall; worst >= bound {
		t.Fatalf("a read, write or discard waited %v during commits (bound %v: half a metadata flush and the host's stall): commit blocks guest I/O", worst, bound)
	}
}
