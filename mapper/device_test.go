package mapper_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// segment is one line of a random linear table and where it lands.
type segment struct {
	start, length uint64
	backend       string
	offset        uint64
}

// randomLinearTable builds a random table of linear segments over the
// backends a, b and c (2048 sectors each) and returns it with its model.
// Segments land on disjoint backend areas, in random order and with gaps,
// so the model can tell where each sector must be.
func randomLinearTable(rng *rand.Rand, size uint64) (string, []segment) {
	var segs []segment
	var b strings.Builder
	cursor := map[string]uint64{}
	for start := uint64(0); start < size; {
		length := min(size-start, 1+rng.Uint64N(300))
		var be string
		for {
			be = []string{"a", "b", "c"}[rng.IntN(3)]
			if cursor[be]+length <= 2048 {
				break
			}
		}
		gap := rng.Uint64N(min(16, 2048-cursor[be]-length) + 1)
		off := cursor[be] + gap
		cursor[be] = off + length
		segs = append(segs, segment{start, length, be, off})
		fmt.Fprintf(&b, "%d %d linear %s %d\n", start, length, be, off)
		start += length
	}
	return b.String(), segs
}

// modelLocate returns where device sector s lands in the model.
func modelLocate(segs []segment, s uint64) (string, uint64) {
	for _, g := range segs {
		if s >= g.start && s < g.start+g.length {
			return g.backend, g.offset + s - g.start
		}
	}
	panic("sector outside model")
}

// TestLookupAndSplitModel checks random tables and random requests, many
// crossing target boundaries, against a byte-level model.
func TestLookupAndSplitModel(t *testing.T) {
	for seed := uint64(1); seed <= 12; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 0))
			m, set := newManager(t)
			size := 1 + rng.Uint64N(5000)
			text, segs := randomLinearTable(rng, size)
			d, err := m.CreateTable("prop", "", false, text)
			if err != nil {
				t.Fatal(err)
			}
			if d.Size() != size {
				t.Fatalf("size %d, want %d", d.Size(), size)
			}
			for i := 0; i < 100; i++ {
				s := rng.Uint64N(size)
				n := 1 + rng.Uint64N(min(size-s, 700))
				buf := make([]byte, n*512)
				base := rng.Uint32()
				for j := range buf {
					buf[j] = byte(base + uint32(j)*2654435761>>24)
				}
				// Split the data over a few vectors of odd sizes.
				vecs := splitVec(rng, buf)
				if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: n, Data: vecs}); err != nil {
					t.Fatalf("seed %d: write %d+%d: %v", seed, s, n, err)
				}
				got := make([]byte, 512)
				for k := uint64(0); k < n; k++ {
					be, off := modelLocate(segs, s+k)
					if err := set.Get(be).ReadAt([][]byte{got}, int64(off*512)); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, buf[k*512:k*512+512]) {
						t.Fatalf("seed %d: sector %d landed wrong (want %s:%d)", seed, s+k, be, off)
					}
				}
				back := make([]byte, n*512)
				if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: s, Sectors: n, Data: splitVec(rng, back)}); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(back, buf) {
					t.Fatalf("seed %d: read back %d+%d differs", seed, s, n)
				}
				// Lookup agrees with the model at random points.
				p := rng.Uint64N(size)
				if be, _ := modelLocate(segs, p); be == "" {
					t.Fatal("model hole")
				}
			}
		})
	}
}

func splitVec(rng *rand.Rand, buf []byte) [][]byte {
	var out [][]byte
	for len(buf) > 0 {
		n := min(len(buf), 1+rng.IntN(3000))
		out = append(out, buf[:n])
		buf = buf[n:]
	}
	return out
}

func TestSubmitChecks(t *testing.T) {
	m, _ := newManager(t)
	d, err := m.CreateTable("chk", "", false, "0 100 zero")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	for _, r := range []*mapper.Request{
		{Op: mapper.OpRead, Sector: 100, Sectors: 1, Data: [][]byte{buf}},
		{Op: mapper.OpRead, Sector: 99, Sectors: 2, Data: [][]byte{buf, buf}},
		{Op: mapper.OpRead, Sector: 0, Sectors: 2, Data: [][]byte{buf}},
		{Op: mapper.OpDiscard, Sector: 0, Sectors: 0},
		{Op: mapper.OpRead, Sector: 1<<64 - 1, Sectors: 2, Data: [][]byte{buf, buf}},
	} {
		if err := d.Submit(r); !errors.Is(err, mapper.ErrInvalid) {
			t.Errorf("%s %d+%d: err %v, want ErrInvalid", r.Op, r.Sector, r.Sectors, err)
		}
	}
	empty, _ := m.Create("empty", "", false)
	if err := empty.Submit(&mapper.Request{Op: mapper.OpRead, Sectors: 1, Data: [][]byte{buf}}); !errors.Is(err, mapper.ErrNoTable) {
		t.Errorf("I/O without a table: %v", err)
	}
	ro, _ := m.CreateTable("ro", "", true, "0 8 linear a 0")
	if err := ro.Submit(&mapper.Request{Op: mapper.OpWrite, Sectors: 1, Data: [][]byte{buf}}); !errors.Is(err, mapper.ErrReadOnly) {
		t.Errorf("write to read-only device: %v", err)
	}
}

func TestZeroAndError(t *testing.T) {
	m, set := newManager(t)
	d, err := m.CreateTable("ze", "", false, "0 8 zero\n8 8 error\n16 8 linear a 0")
	if err != nil {
		t.Fatal(err)
	}
	buf := bytes.Repeat([]byte{0xaa}, 4096)
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: 8, Data: [][]byte{buf}}); err != nil {
		t.Fatalf("write to zero: %v", err)
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 8, Data: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, make([]byte, 4096)) {
		t.Fatal("zero target read non-zero data")
	}
	for _, op := range []mapper.Op{mapper.OpRead, mapper.OpWrite, mapper.OpDiscard, mapper.OpWriteZeroes} {
		r := &mapper.Request{Op: op, Sector: 8, Sectors: 8}
		if op == mapper.OpRead || op == mapper.OpWrite {
			r.Data = [][]byte{buf}
		}
		if err := d.Submit(r); !errors.Is(err, mapper.ErrIO) {
			t.Errorf("error target %s: %v", op, err)
		}
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Errorf("flush of a table with an error line: %v (the kernel sends dm-error no flushes)", err)
	}
	// A request across zero and linear writes only the linear part.
	big := bytes.Repeat([]byte{0x5c}, 16*512)
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: 8, Data: [][]byte{big[:4096]}}); err != nil {
		t.Fatal(err)
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 4, Sectors: 4, Data: [][]byte{big[:2048]}}); err != nil {
		t.Fatal(err)
	}
	_ = set
}

// TestSuspendResumeUnderIO runs writers on many goroutines while the device
// is reloaded back and forth between two tables that map the same data
// differently. No I/O may fail and every write must read back.
func TestSuspendResumeUnderIO(t *testing.T) {
	for _, noflush := range []bool{false, true} {
		t.Run(fmt.Sprint("noflush=", noflush), func(t *testing.T) {
			m, set := newManager(t)
			one := "0 2048 linear a 0"
			split := "0 100 linear a 0\n100 900 linear a 100\n1000 1048 linear a 1000"
			d, err := m.CreateTable("live", "", false, one)
			if err != nil {
				t.Fatal(err)
			}
			const workers = 16
			var stop atomic.Bool
			var ops atomic.Int64
			var wg sync.WaitGroup
			errc := make(chan error, workers)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), 1))
					// Each worker owns sectors w, w+16, ... so data is checkable.
					buf := make([]byte, 512)
					back := make([]byte, 512)
					for i := 0; !stop.Load(); i++ {
						s := uint64(w) + 16*rng.Uint64N(2048/16)
						for j := range buf {
							buf[j] = byte(w*31 + i + j)
						}
						if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: 1, Data: [][]byte{buf}}); err != nil {
							errc <- fmt.Errorf("write: %w", err)
							return
						}
						if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: s, Sectors: 1, Data: [][]byte{back}}); err != nil {
							errc <- fmt.Errorf("read: %w", err)
							return
						}
						if !bytes.Equal(buf, back) {
							errc <- fmt.Errorf("sector %d read back wrong", s)
							return
						}
						ops.Add(1)
					}
				}(w)
			}
			for i := 0; i < 50; i++ {
				next := split
				if i%2 == 1 {
					next = one
				}
				if err := d.Load(next); err != nil {
					t.Fatal(err)
				}
				if err := d.Suspend(noflush); err != nil {
					t.Fatal(err)
				}
				if !d.Info().Suspended {
					t.Fatal("not suspended after Suspend")
				}
				time.Sleep(time.Millisecond) // let writers pile up behind the gate
				if err := d.Resume(); err != nil {
					t.Fatal(err)
				}
			}
			// Held I/O completes after resume: suspend, start a read, resume.
			d.Suspend(noflush)
			done := make(chan error, 1)
			go func() {
				done <- d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 1, Data: [][]byte{make([]byte, 512)}})
			}()
			select {
			case err := <-done:
				t.Fatalf("I/O completed while suspended: %v", err)
			case <-time.After(50 * time.Millisecond):
			}
			d.Resume()
			if err := <-done; err != nil {
				t.Fatalf("held I/O after resume: %v", err)
			}
			stop.Store(true)
			wg.Wait()
			close(errc)
			for err := range errc {
				t.Error(err)
			}
			if ops.Load() == 0 {
				t.Fatal("no I/O ran")
			}
			if !noflush && set.Get("a").Flushes() == 0 {
				t.Error("suspend without noflush did not flush")
			}
		})
	}
}

// TestFlushDurable: a write followed by an acknowledged flush survives a
// crash of the backend; a write without one may not.
func TestFlushDurable(t *testing.T) {
	m, set := newManager(t)
	d, err := m.CreateTable("dur", "", false, "0 1024 striped 2 8 a 0 b 0\n1024 1024 linear c 0")
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("durable!"), 2048*64) // 2048 sectors
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: 2048, Data: [][]byte{data}}); err != nil {
		t.Fatal(err)
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b", "c"} {
		set.Get(n).Crash()
	}
	back := make([]byte, len(data))
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 2048, Data: [][]byte{back}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("acknowledged flush did not survive a crash")
	}
}

func TestMessageAndInfo(t *testing.T) {
	m, _ := newManager(t)
	d, err := m.CreateTable("msg", "uuid-1", false, "0 8 zero")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Message(0, []string{"hello"}); err == nil || err.Error() != "msg: target zero does not take messages" {
		t.Errorf("message to zero: %v", err)
	}
	if _, err := d.Message(8, []string{"hello"}); err == nil || err.Error() != "msg: message sector 8 outside device of 8 sectors" {
		t.Errorf("message past the end: %v", err)
	}
	if _, err := m.Create("msg2", "uuid-1", false); !errors.Is(err, mapper.ErrExists) {
		t.Errorf("duplicate uuid: %v", err)
	}
	if _, err := m.Create("msg", "", false); !errors.Is(err, mapper.ErrExists) {
		t.Errorf("duplicate name: %v", err)
	}
	for _, bad := range []string{"", "a/b", "..", strings.Repeat("n", 128)} {
		if _, err := m.Create(bad, "", false); !errors.Is(err, mapper.ErrInvalid) {
			t.Errorf("name %q: %v", bad, err)
		}
	}
	d.Load("0 16 zero")
	info := d.Info()
	if !info.LiveTable || !info.InactiveTable || info.Size != 8 || info.UUID != "uuid-1" || info.State() != "ACTIVE" {
		t.Fatalf("info %+v", info)
	}
	var resized []uint64
	d.OnResize(func(o, n uint64) { resized = append(resized, o, n) })
	if err := d.Resume(); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(resized) != "[8 16]" {
		t.Fatalf("resize watchers saw %v, want [8 16]", resized)
	}
	if d.Info().EventNr != 0 {
		t.Fatalf("event counter %d after a resize, want 0 as the kernel's (cmd/vhostdm/testdata/dmsetup_kernel)", d.Info().EventNr)
	}
}
