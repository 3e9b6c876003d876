package raid

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

// cacheMode is a stripe cache setting the model tests run under.
type cacheMode struct {
	name    string
	params  string // appended to the raid parameters of raid4/5/6 tables
	entries int    // testCacheEntries
	off     bool   // testNoCache
}

var cacheModes = []cacheMode{
	{name: "nocache", off: true},
	{name: "cache256"},
	{name: "cache17", params: " stripe_cache 17"},
	{name: "cache4", entries: 4},
	{name: "cache1", entries: 1},
}

// set applies the mode's test hooks until the test ends.
func (c cacheMode) set(t testing.TB) {
	testCacheEntries, testNoCache = c.entries, c.off
	t.Cleanup(func() { testCacheEntries, testNoCache = 0, false })
}

// countingMem counts the reads that reach a memory backend.
type countingMem struct {
	*mappertest.Mem
	reads atomic.Int64
}

func (c *countingMem) ReadAt(bufs [][]byte, off int64) error {
	c.reads.Add(1)
	return c.Mem.ReadAt(bufs, off)
}

// countingSet opens countingMems over a mappertest.Set.
type countingSet struct {
	set  *mappertest.Set
	mems map[string]*countingMem
}

func newCountingSet(size int, names ...string) *countingSet {
	cs := &countingSet{set: mappertest.NewSet(size, names...), mems: map[string]*countingMem{}}
	for _, n := range names {
		cs.mems[n] = &countingMem{Mem: cs.set.Get(n)}
	}
	return cs
}

func (cs *countingSet) open(name string, readOnly bool) (mapper.Backend, error) {
	if m, ok := cs.mems[name]; ok {
		return m, nil
	}
	return nil, mapper.Errorf(mapper.ErrNotFound, "open %s: no such backend", name)
}

// OpenBackend implements mapper.Opener.
func (cs *countingSet) OpenBackend(name string, readOnly bool) (mapper.Backend, error) {
	return cs.open(name, readOnly)
}

// reads returns the reads per member so far.
func (cs *countingSet) reads(n int) []int64 {
	out := make([]int64, n)
	for i := range out {
		out[i] = cs.mems[fmt.Sprintf("m%d", i)].reads.Load()
	}
	return out
}

func sum(v []int64) int64 {
	var s int64
	for _, x := range v {
		s += x
	}
	return s
}

// TestStripeCacheReads shows, with backends that count their reads, that
// after the first write to a stripe row, repeated small writes to it, and
// sequential small writes along the stripe, read no member; that the
// array and parity stay right; and that without the cache every such
// write reads the members again.
func TestStripeCacheReads(t *testing.T) {
	for _, c := range []struct {
		typ string
		n   int
	}{{"raid5_ls", 4}, {"raid6_zr", 5}, {"raid4", 3}} {
		for _, cached := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s-cache=%v", c.typ, cached), func(t *testing.T) {
				cacheMode{off: !cached}.set(t)
				const member = 256 << 10
				const chunk = 64
				cs := newCountingSet(member, names(c.n)...)
				d := c.n - (&raidType{level: levelOf(c.typ)}).parity()
				length := uint64(d * member / 512)
				m := mapper.NewManager(mapper.ManagerOptions{Open: cs.open, Logger: slog.New(slog.DiscardHandler)})
				defer m.Close()
				dev, err := m.CreateTable("r", "", false, table(c.typ, c.n, length, chunk, "nosync", legs(c.n)))
				if err != nil {
					t.Fatal(err)
				}
				a := &array{t: t, set: cs.set, m: m, d: dev, n: c.n}
				rng := rand.New(rand.NewPCG(1, 2))
				model := make([]byte, length*512)
				write := func(sector, sectors uint64) {
					buf := make([]byte, sectors*512)
					for i := range buf {
						buf[i] = byte(rng.Uint32())
					}
					a.io(mapper.OpWrite, sector, buf)
					copy(model[sector*512:], buf)
				}
				// Stripe 3 starts at array sector 3*chunk*d.
				base := uint64(3 * chunk * d)
				write(base+8, 8) // data chunk 0, row 1: the first write reads
				first := cs.reads(c.n)
				if sum(first) == 0 {
					t.Fatalf("first write read nothing")
				}
				for i := 0; i < 20; i++ { // repeated small writes to the same row
					write(base+8+rng.Uint64N(8), 1)
					write(base+8, 8)
				}
				repeated := cs.reads(c.n)
				// Sequential 4 KiB writes along data chunk 0 of the stripe.
				for sec := base + 16; sec < base+chunk; sec += 8 {
					write(sec, 8)
				}
				seq := cs.reads(c.n)
				if cached {
					if sum(repeated) != sum(first) {
						t.Errorf("repeated writes read members: reads %v after the first write, %v after", first, repeated)
					}
					// The second sequential row reads ahead to the end of
					// the chunk; the rest read nothing.
					if got := sum(seq) - sum(repeated); got > int64(c.n) {
						t.Errorf("sequential writes read members %d times (%v -> %v)", got, repeated, seq)
					}
				} else if sum(repeated)-sum(first) < 40 {
					t.Errorf("without the cache, repeated writes read only %d times", sum(repeated)-sum(first))
				}
				back := make([]byte, len(model))
				a.io(mapper.OpRead, 0, back)
				if !bytes.Equal(back, model) {
					t.Fatal("array differs from the model")
				}
				if err := modelCheck(c.typ, c.n, chunk, a.members()); err != nil {
					t.Error(err)
				}
				t.Logf("member reads: first write %v, after repeats %v, after sequential %v", first, repeated, seq)
			})
		}
	}
}

// TestStripeCacheModel runs random writes (many small, to few stripes, so
// entries are hit, partly filled and evicted) on healthy arrays under
// every cache setting, and checks reads against a byte model, every P and
// Q against the independent layout model, and the array's own check; a
// resync and a suspend in the middle drop the cache.
func TestStripeCacheModel(t *testing.T) {
	for _, mode := range cacheModes {
		t.Run(mode.name, func(t *testing.T) {
			mode.set(t)
			for _, c := range []struct {
				typ string
				n   int
			}{{"raid5_la", 4}, {"raid5_n", 3}, {"raid6_nc", 5}, {"raid6_ra_6", 6}} {
				t.Run(c.typ, func(t *testing.T) {
					const member = 64 << 10
					const chunk = 32
					set := mappertest.NewSet(member, names(c.n)...)
					d := c.n - (&raidType{level: levelOf(c.typ)}).parity()
					length := uint64(d * member / 512)
					a := newArray(t, set, c.n, table(c.typ, c.n, length, chunk, "nosync"+mode.params, legs(c.n)))
					rng := rand.New(rand.NewPCG(uint64(c.n), 3))
					model := make([]byte, length*512)
					for i := 0; i < 600; i++ {
						switch i {
						case 200:
							a.message("resync")
							waitIdle(t, a.d)
						case 400:
							if err := a.d.Suspend(false); err != nil {
								t.Fatal(err)
							}
							if err := a.d.Resume(); err != nil {
								t.Fatal(err)
							}
						}
						// Mostly within the first four stripes.
						span := uint64(4 * chunk * d)
						if rng.IntN(4) == 0 {
							span = length
						}
						s := rng.Uint64N(span)
						n := min(length-s, 1+rng.Uint64N(24))
						buf := make([]byte, n*512)
						if rng.IntN(3) > 0 {
							for j := range buf {
								buf[j] = byte(rng.Uint32())
							}
							a.io(mapper.OpWrite, s, buf)
							copy(model[s*512:], buf)
						} else {
							a.io(mapper.OpRead, s, buf)
							if !bytes.Equal(buf, model[s*512:(s+n)*512]) {
								t.Fatalf("op %d: read %d+%d differs from the model", i, s, n)
							}
						}
					}
					if err := modelCheck(c.typ, c.n, chunk, a.members()); err != nil {
						t.Error(err)
					}
					a.message("check")
					if st := waitIdle(t, a.d); strings.Fields(st)[5] != "0" {
						t.Errorf("check: %q", st)
					}
				})
			}
		})
	}
}

// TestStripeCacheTable checks stripe_cache as dm-raid reports it: echoed
// only when given, as the entry count md set up (raised to chunk/2).
func TestStripeCacheTable(t *testing.T) {
	set := mappertest.NewSet(1<<20, names(4)...)
	for _, c := range []struct{ params, want string }{
		{"nosync", "raid5_ls 2 64 nosync 4"},
		{"stripe_cache 1", "raid5_ls 3 64 stripe_cache 32 4"},
		{"stripe_cache 1000", "raid5_ls 3 64 stripe_cache 1000 4"},
		{"stripe_cache 256", "raid5_ls 3 64 stripe_cache 256 4"},
	} {
		a := newArray(t, set, 4, table("raid5_ls", 4, 3072, 64, c.params, legs(4)))
		tb := a.d.Status(mapper.StatusTable, false)[0].Params
		if !strings.HasPrefix(tb, c.want+" ") {
			t.Errorf("%s: table %q, want %q...", c.params, tb, c.want)
		}
		a.m.Close()
	}
	// The cache holds at most its entry count.
	cs := newCountingSet(1<<20, names(4)...)
	tbl, err := mapper.BuildTable(table("raid5_ls", 4, 3*2048, 16, "nosync stripe_cache 17", legs(4)),
		mapper.TableOptions{Opener: cs, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer tbl.Close()
	r := tbl.Targets()[0].(*raid)
	buf := make([]byte, 3*2048*512)
	if err := r.Map(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: 3 * 2048, Data: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	if got := r.cache.len(); got != 17 {
		t.Errorf("cache holds %d entries, want 17", got)
	}
}

// BenchmarkRandomWrite4K writes 4 KiB at random aligned offsets of
// raid5 (4 members) and raid6 (6 members) arrays over memory, with and
// without the stripe cache, over a working set that the default cache
// holds (hot: 1 MiB) and one it does not (cold: 64 MiB).
func BenchmarkRandomWrite4K(b *testing.B) {
	for _, c := range []struct {
		typ string
		n   int
	}{{"raid5_ls", 4}, {"raid6_zr", 6}} {
		for _, ws := range []struct {
			name  string
			bytes uint64
		}{{"hot1M", 1 << 20}, {"cold64M", 64 << 20}} {
			for _, cached := range []bool{false, true} {
				b.Run(fmt.Sprintf("%s/%s/cache=%v", c.typ, ws.name, cached), func(b *testing.B) {
					cacheMode{off: !cached}.set(b)
					d := c.n - (&raidType{level: levelOf(c.typ)}).parity()
					const member = 16 << 20
					set := mappertest.NewSet(member, names(c.n)...)
					m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
					defer m.Close()
					length := uint64(d * member / 512)
					dev, err := m.CreateTable("r", "", false, table(c.typ, c.n, length, 128, "nosync", legs(c.n)))
					if err != nil {
						b.Fatal(err)
					}
					blocks := min(ws.bytes, length*512) / 4096
					rng := rand.New(rand.NewPCG(5, 6))
					buf := make([]byte, 4096)
					b.SetBytes(4096)
					b.ResetTimer()
					for b.Loop() {
						s := rng.Uint64N(blocks) * 8
						if err := dev.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: 8, Data: [][]byte{buf}}); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		}
	}
}
