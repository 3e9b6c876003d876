package copier_test

import (
	"bytes"
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vhostdm/vhostdm/copier"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

func fill(m *mappertest.Mem, seed byte) []byte {
	b := make([]byte, len(m.Bytes()))
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
	m.WriteAt([][]byte{b}, 0)
	return b
}

// counting counts concurrent reads of a backend.
type counting struct {
	*mappertest.Mem
	cur, peak atomic.Int32
}

func (c *counting) ReadAt(b [][]byte, off int64) error {
	n := c.cur.Add(1)
	for {
		p := c.peak.Load()
		if n <= p || c.peak.CompareAndSwap(p, n) {
			break
		}
	}
	defer c.cur.Add(-1)
	return c.Mem.ReadAt(b, off)
}

func TestCopyToSeveral(t *testing.T) {
	src := &counting{Mem: mappertest.NewMem("src", 4<<20)}
	data := fill(src.Mem, 1)
	c := copier.New(copier.Options{MemoryBytes: 64 << 10, PieceBytes: 16 << 10})
	defer c.Close()
	var dsts []copier.Region
	var mems []*mappertest.Mem
	for i := 0; i < 3; i++ {
		m := mappertest.NewMem("dst", 4<<20)
		mems = append(mems, m)
		dsts = append(dsts, copier.Region{Dev: m, Sector: uint64(i) * 8, Sectors: 4000})
	}
	res := c.CopySync(copier.Region{Dev: src, Sector: 100, Sectors: 4000}, dsts)
	if err := res.Err(); err != nil {
		t.Fatal(err)
	}
	for i, m := range mems {
		got := m.Bytes()[i*8*512 : (i*8+4000)*512]
		if !bytes.Equal(got, data[100*512:4100*512]) {
			t.Fatalf("destination %d differs", i)
		}
	}
	if p := src.peak.Load(); p > 4 || p < 1 {
		t.Fatalf("%d reads in flight with memory for 4 pieces", p)
	}
}

func TestErrors(t *testing.T) {
	c := copier.New(copier.Options{PieceBytes: 4096})
	src := mappertest.NewMem("src", 1<<20)
	fill(src, 2)
	a, b := mappertest.NewMem("a", 1<<20), mappertest.NewMem("b", 1<<20)
	b.FailNth(mapper.OpWrite, 3)
	res := c.CopySync(copier.Region{Dev: src, Sectors: 64}, []copier.Region{{Dev: a, Sectors: 64}, {Dev: b, Sectors: 64}})
	if res.ReadErr != nil || res.WriteErrs[0] != nil || !errors.Is(res.WriteErrs[1], mapper.ErrIO) {
		t.Fatalf("write failure on b: %+v", res)
	}
	if !bytes.Equal(a.Bytes()[:64*512], src.Bytes()[:64*512]) {
		t.Fatal("a was not fully written despite b's failure")
	}
	src.FailNth(mapper.OpRead, 2)
	res = c.CopySync(copier.Region{Dev: src, Sectors: 64}, []copier.Region{{Dev: mappertest.NewMem("c", 1<<20), Sectors: 64}})
	if !errors.Is(res.ReadErr, mapper.ErrIO) || !res.Failed(0) {
		t.Fatalf("read failure: %+v", res)
	}
	// A destination shorter than the source is refused.
	res = c.CopySync(copier.Region{Dev: src, Sectors: 64}, []copier.Region{{Dev: a, Sectors: 8}})
	if res.WriteErrs[0] == nil {
		t.Fatal("short destination accepted")
	}
	// Zero.
	res = waitZero(c, []copier.Region{{Dev: a, Sector: 8, Sectors: 8}})
	if res.Err() != nil || !bytes.Equal(a.Bytes()[8*512:16*512], make([]byte, 4096)) {
		t.Fatalf("zero: %+v", res)
	}
	c.Close()
	if res := c.CopySync(copier.Region{Dev: src, Sectors: 8}, []copier.Region{{Dev: a, Sectors: 8}}); !errors.Is(res.ReadErr, copier.ErrClosed) {
		t.Fatalf("copy after close: %+v", res)
	}
}

func waitZero(c *copier.Copier, d []copier.Region) copier.Result {
	ch := make(chan copier.Result, 1)
	c.Zero(d, func(r copier.Result) { ch <- r })
	return <-ch
}

// Many concurrent copies complete, each callback once.
func TestConcurrent(t *testing.T) {
	c := copier.New(copier.Options{MemoryBytes: 32 << 10, PieceBytes: 8 << 10})
	src := mappertest.NewMem("src", 1<<20)
	data := fill(src, 3)
	dst := mappertest.NewMem("dst", 1<<20)
	var wg sync.WaitGroup
	var calls atomic.Int32
	for i := 0; i < 64; i++ {
		wg.Add(1)
		c.Copy(copier.Region{Dev: src, Sector: uint64(i) * 32, Sectors: 32}, []copier.Region{{Dev: dst, Sector: uint64(i) * 32, Sectors: 32}}, func(r copier.Result) {
			if r.Err() != nil {
				t.Error(r.Err())
			}
			calls.Add(1)
			wg.Done()
		})
	}
	wg.Wait()
	c.Close()
	if calls.Load() != 64 || !bytes.Equal(dst.Bytes()[:64*32*512], data[:64*32*512]) {
		t.Fatalf("%d callbacks; content equal %v", calls.Load(), bytes.Equal(dst.Bytes()[:64*32*512], data[:64*32*512]))
	}
}
