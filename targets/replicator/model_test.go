package replicator

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// image is a model of one site's devices: the result of applying the
// log's entries in order.
type image map[uint32][]byte

func (m image) apply(en *Entry) {
	b := m[en.Dev]
	off := en.Sector * mapper.SectorSize
	n := en.Sectors * mapper.SectorSize
	if en.Op == mapper.OpWrite {
		copy(b[off:off+n], en.Data)
	} else {
		clear(b[off : off+n])
	}
}

func newImage(devs int) image {
	m := image{}
	for d := 1; d <= devs; d++ {
		m[uint32(d)] = make([]byte, devBytes)
	}
	return m
}

// TestModelWriteOrder runs random writes from several goroutines across
// three replicator-dev devices sharing one log, with a sync site, a slowed
// async site and an async site cut off for a while. Whenever an async site
// is in sync, its devices must hold exactly the log's prefix up to what it
// has applied (write order across all devices); at the end every site is
// identical to the primary and to the model.
func TestModelWriteOrder(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	const devs = 3
	w := newWorld(t)
	w.sizes["log"] = 512 * mapper.SectorSize // a small ring: it wraps and fills
	w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 512 blockdev 1 0 blockdev 2 1 sync "+
		"blockdev 4 2 async ios 64 blockdev 4 3 async size 1m")
	e := w.engine("rep")

	var (
		mu       sync.Mutex
		logged   = map[uint64]*Entry{}
		tags     = map[uint64]uint64{} // write tag -> sequence
		shadows  = map[uint32]image{1: newImage(devs), 2: newImage(devs), 3: newImage(devs)}
		shadowAt = map[uint32]uint64{}
		checks   = map[uint32]int{}
		stopped  atomic.Bool
		failures []string
	)
	e.mu.Lock()
	e.testLogged = func(en *Entry) {
		mu.Lock()
		defer mu.Unlock()
		c := *en
		logged[en.Seq] = &c
		if en.Op == mapper.OpWrite {
			tags[binary.LittleEndian.Uint64(en.Data)] = en.Seq
		}
	}
	e.testApplied = func(slink uint32, seq uint64, applied, consistent bool) {
		if stopped.Load() {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		sh := shadows[slink]
		if shadowAt[slink]+1 != seq && shadowAt[slink] != 0 {
			failures = append(failures, fmt.Sprintf("slink %d consumed entry %d after %d", slink, seq, shadowAt[slink]))
		}
		en := logged[seq]
		if en == nil {
			failures = append(failures, fmt.Sprintf("slink %d consumed unlogged entry %d", slink, seq))
			return
		}
		sh.apply(en)
		shadowAt[slink] = seq
		if !applied || !consistent || seq%7 != 0 {
			return
		}
		checks[slink]++
		prefix := map[uint32]string{1: "a", 2: "b", 3: "c"}[slink]
		for d := uint32(1); d <= devs; d++ {
			if got := w.mems[fmt.Sprintf("%s%d", prefix, d)].Bytes(); !bytes.Equal(got, sh[d]) {
				failures = append(failures, fmt.Sprintf("slink %d dev %d at seq %d: not the log's prefix", slink, d, seq))
			}
		}
	}
	e.mu.Unlock()
	defer stopped.Store(true)

	var devices []*mapper.Device
	for d := 1; d <= devs; d++ {
		tab := fmt.Sprintf("0 1024 replicator-dev /dev/mapper/rep %d 0 1 l%d nolog 0 1 1 a%d core 1 64 2 1 b%d core 1 64 3 1 c%d core 1 32", d, d, d, d, d)
		devices = append(devices, w.create(fmt.Sprintf("d%d", d), tab))
	}
	waitDrained(t, e)
	w.fake("b1").setDelay(100 * time.Microsecond)
	w.fake("b2").setDelay(100 * time.Microsecond)
	w.fake("b3").setDelay(100 * time.Microsecond)

	const writers, ops = 3, 300
	var wg sync.WaitGroup
	mine := make([][]uint64, writers)
	errs := make(chan error, writers)
	for wr := 0; wr < writers; wr++ {
		wg.Add(1)
		go func(wr int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(wr)))
			for i := 0; i < ops; i++ {
				if wr == 0 && i == ops/4 {
					for d := 1; d <= devs; d++ {
						w.fake(fmt.Sprintf("c%d", d)).setCut(true)
					}
				}
				if wr == 0 && i == ops*3/4 {
					for d := 1; d <= devs; d++ {
						w.fake(fmt.Sprintf("c%d", d)).setCut(false)
					}
				}
				dev := devices[rng.IntN(devs)]
				n := uint64(1 + rng.IntN(16))
				s := rng.Uint64N(dev.Size() - n)
				r := &mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: n}
				switch p := rng.IntN(20); {
				case p == 0:
					r.Op = mapper.OpDiscard
				case p == 1:
					r.Op = mapper.OpWriteZeroes
				default:
					buf := randData(rng, int(n))
					tag := uint64(wr)<<32 | uint64(i)
					binary.LittleEndian.PutUint64(buf, tag)
					r.Data = [][]byte{buf}
					mine[wr] = append(mine[wr], tag)
				}
				if err := dev.Submit(r); err != nil {
					errs <- fmt.Errorf("writer %d op %d: %v", wr, i, err)
					return
				}
			}
		}(wr)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	waitDrained(t, e)
	stopped.Store(true)
	mu.Lock()
	defer mu.Unlock()
	for _, f := range failures[:min(len(failures), 10)] {
		t.Error(f)
	}
	// Each writer's writes are in the log in the order it issued them.
	for wr, ts := range mine {
		for i := 1; i < len(ts); i++ {
			if tags[ts[i]] <= tags[ts[i-1]] {
				t.Fatalf("writer %d: write %d logged at %d, before its predecessor at %d", wr, i, tags[ts[i]], tags[ts[i-1]])
			}
		}
	}
	// Every site ends identical to the primary and to the model.
	final := newImage(devs)
	for seq := uint64(1); logged[seq] != nil; seq++ {
		final.apply(logged[seq])
	}
	for d := 1; d <= devs; d++ {
		got := readAll(t, devices[d-1])
		if !bytes.Equal(got, final[uint32(d)]) {
			t.Errorf("device %d differs from the model", d)
		}
		w.sameAs(t, got, fmt.Sprintf("l%d", d), fmt.Sprintf("a%d", d), fmt.Sprintf("b%d", d), fmt.Sprintf("c%d", d))
	}
	if checks[1] == 0 || checks[2] == 0 || checks[3] == 0 {
		t.Errorf("prefix checks per site: %v", checks)
	}
	t.Logf("entries %d, prefix checks %v, events %d", len(logged), checks, len(w.eventKinds()))
}

// TestCrashReplay kills the process under writes (and drops what the
// backends had not flushed), restarts it and checks that every write the
// guest saw acknowledged is on the primary after replay, and that the sites
// converge from the log and their disk dirty logs (regions an overflowing
// async site missed must survive the crash in its dirty log).
func TestCrashReplay(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	const table = "0 8 replicator ringbuffer 4 log 0 auto 256 blockdev 1 0 blockdev 2 1 sync blockdev 2 2 async"
	for round := 0; round < 3; round++ {
		w := newWorld(t)
		w.sizes["log"] = 256 * mapper.SectorSize
		devTab := func(d int) string {
			return fmt.Sprintf("0 1024 replicator-dev /dev/mapper/rep %d 0 1 l%d nolog 0 1 1 a%d disk 2 dla%d 64 2 1 b%d disk 2 dlb%d 64", d, d, d, d, d, d)
		}
		start := func() []*mapper.Device {
			w.create("rep", table)
			return []*mapper.Device{w.create("d1", devTab(1)), w.create("d2", devTab(2))}
		}
		devices := start()
		w.fake("b1").setDelay(200 * time.Microsecond)
		const blocks = 16 // 8-sector blocks per writer
		type state struct {
			acked []byte
			maybe [][]byte // written without an answer (or with an error)
		}
		const writers = 4
		st := make([][]state, writers)
		var wg sync.WaitGroup
		var stop atomic.Bool
		for wr := 0; wr < writers; wr++ {
			st[wr] = make([]state, blocks)
			for b := range st[wr] {
				st[wr][b].acked = make([]byte, 4096)
			}
			wg.Add(1)
			go func(wr int) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed+uint64(round), uint64(wr)))
				dev := devices[wr%2]
				for !stop.Load() {
					b := rng.IntN(blocks)
					buf := randData(rng, 8)
					s := &st[wr][b]
					s.maybe = append(s.maybe, buf)
					sector := uint64((wr/2)*blocks+b) * 8
					if err := dev.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: sector, Sectors: 8, Data: [][]byte{buf}}); err != nil {
						return
					}
					s.acked, s.maybe = buf, nil
				}
			}(wr)
		}
		time.Sleep(time.Duration(20+10*round) * time.Millisecond)
		w.kill()
		stop.Store(true)
		wg.Wait()
		devices = start()
		e := w.engine("rep")
		e.mu.Lock()
		replayed := len(e.q)
		e.mu.Unlock()
		t.Logf("round %d: %d entries in the log after restart", round, replayed)
		for wr := 0; wr < writers; wr++ {
			got := readAll(t, devices[wr%2])
			for b := 0; b < blocks; b++ {
				off := ((wr/2)*blocks + b) * 4096
				blk := got[off : off+4096]
				ok := bytes.Equal(blk, st[wr][b].acked)
				for _, m := range st[wr][b].maybe {
					ok = ok || bytes.Equal(blk, m)
				}
				if !ok {
					t.Fatalf("round %d: writer %d block %d: an acknowledged write was lost", round, wr, b)
				}
			}
		}
		waitDrained(t, w.engine("rep"))
		for d, dev := range devices {
			w.sameAs(t, readAll(t, dev), fmt.Sprintf("l%d", d+1), fmt.Sprintf("a%d", d+1), fmt.Sprintf("b%d", d+1))
		}
	}
}
