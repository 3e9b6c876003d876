package mapper_test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// dirtyRuns returns a bitmap's dirty runs as "off+len" strings.
func dirtyRuns(b *mapper.DirtyBitmap, size uint64) []string {
	var out []string
	var off uint64
	b.Extents(0, size, func(e mapper.Extent) bool {
		if e.Dirty {
			out = append(out, fmt.Sprintf("%d+%d", off, e.Length))
		}
		off += e.Length
		return true
	})
	return out
}

// TestBitmapRecordsWrites: writes, discards and write-zeroes set the bits
// of the chunks they touch in recording bitmaps only; reads and flushes
// set none; clear, disable, enable, merge and remove act as QEMU's.
func TestBitmapRecordsWrites(t *testing.T) {
	m, _ := newManager(t)
	d, err := m.CreateTable("d", "", false, "0 2048 linear a 0") // 1 MiB
	if err != nil {
		t.Fatal(err)
	}
	b0, err := d.AddBitmap(mapper.BitmapOptions{Name: "b0", Granularity: 65536})
	if err != nil {
		t.Fatal(err)
	}
	off, _ := d.AddBitmap(mapper.BitmapOptions{Name: "off", Granularity: 4096, Disabled: true})
	buf := make([]byte, 4096)
	for _, r := range []*mapper.Request{
		{Op: mapper.OpWrite, Sector: 127, Sectors: 2, Data: [][]byte{buf[:1024]}}, // chunks 0 and 1
		{Op: mapper.OpRead, Sector: 1000, Sectors: 8, Data: [][]byte{buf}},
		{Op: mapper.OpFlush},
		{Op: mapper.OpDiscard, Sector: 1024, Sectors: 8},     // chunk 8
		{Op: mapper.OpWriteZeroes, Sector: 2047, Sectors: 1}, // chunk 15
	} {
		if err := d.Submit(r); err != nil {
			t.Fatal(err)
		}
	}
	if got := strings.Join(dirtyRuns(b0, 1<<20), " "); got != "0+131072 524288+65536 983040+65536" {
		t.Errorf("b0 dirty runs %q", got)
	}
	if b0.Count() != 4*65536 || off.Count() != 0 {
		t.Errorf("counts: b0 %d, disabled bitmap %d", b0.Count(), off.Count())
	}
	if _, err := d.AddBitmap(mapper.BitmapOptions{Name: "b0"}); err == nil || err.Error() != "Bitmap already exists: b0" {
		t.Errorf("duplicate add: %v", err)
	}
	for _, g := range []uint64{256, 3 << 10, 1 << 32} {
		if _, err := d.AddBitmap(mapper.BitmapOptions{Name: "g", Granularity: g}); err == nil {
			t.Errorf("granularity %d accepted", g)
		}
	}
	if _, err := d.AddBitmap(mapper.BitmapOptions{Name: "p", Persistent: true}); err == nil {
		t.Error("persistent bitmap accepted without a state directory")
	}
	if err := d.MergeBitmaps("off", []string{"b0"}); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(dirtyRuns(off, 1<<20), " "); got != "0+131072 524288+65536 983040+65536" {
		t.Errorf("merged runs %q", got)
	}
	d.DisableBitmap("b0")
	d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 600, Sectors: 8, Data: [][]byte{buf}})
	if b0.Count() != 4*65536 {
		t.Error("a disabled bitmap recorded a write")
	}
	b0.Acquire()
	if err := d.ClearBitmap("b0"); err == nil || !strings.Contains(err.Error(), "currently in use") {
		t.Errorf("clear of a busy bitmap: %v", err)
	}
	b0.Release()
	if err := d.ClearBitmap("b0"); err != nil || b0.Count() != 0 {
		t.Errorf("clear: %v, count %d", err, b0.Count())
	}
	if err := d.RemoveBitmap("b0"); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Bitmap("b0"); err == nil || err.Error() != "Dirty bitmap 'b0' not found" {
		t.Errorf("lookup after remove: %v", err)
	}
}

// TestBitmapResize: a resume to a bigger table keeps the bits and covers
// the new sectors.
func TestBitmapResize(t *testing.T) {
	m, _ := newManager(t)
	d, err := m.CreateTable("d", "", false, "0 1000 linear a 0")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := d.AddBitmap(mapper.BitmapOptions{Name: "b", Granularity: 512})
	buf := make([]byte, 512)
	d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 999, Sectors: 1, Data: [][]byte{buf}})
	if err := d.Reload("0 2000 linear a 0"); err != nil {
		t.Fatal(err)
	}
	d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 1999, Sectors: 1, Data: [][]byte{buf}})
	if got := strings.Join(dirtyRuns(b, 2000*512), " "); got != "511488+512 1023488+512" {
		t.Errorf("runs after grow %q", got)
	}
}

// TestBitmapHotPathAllocates nothing: recording is an atomic OR per word.
func TestBitmapHotPathAllocatesNothing(t *testing.T) {
	m, _ := newManager(t)
	d, _ := m.CreateTable("d", "", false, "0 2048 zero")
	d.AddBitmap(mapper.BitmapOptions{Name: "a"})
	d.AddBitmap(mapper.BitmapOptions{Name: "b", Granularity: 512})
	r := &mapper.Request{Op: mapper.OpWriteZeroes, Sector: 100, Sectors: 300}
	if n := testing.AllocsPerRun(100, func() { d.Submit(r) }); n != 0 {
		t.Errorf("Submit with two bitmaps: %v allocations", n)
	}
}

// BenchmarkSubmitWithBitmaps measures the recording cost on a zero
// target: 4 KiB write-zeroes with 0, 1 and 4 recording bitmaps.
func BenchmarkSubmitWithBitmaps(b *testing.B) {
	for _, n := range []int{0, 1, 4} {
		b.Run(fmt.Sprintf("bitmaps=%d", n), func(b *testing.B) {
			m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
			defer m.Close()
			d, _ := m.CreateTable("d", "", false, "0 2097152 zero")
			for i := range n {
				d.AddBitmap(mapper.BitmapOptions{Name: fmt.Sprint(i)})
			}
			r := &mapper.Request{Op: mapper.OpWriteZeroes, Sector: 100, Sectors: 8}
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					d.Submit(r)
				}
			})
		})
	}
}

// TestBitmapExtentsModel compares Extents, at random offsets and lengths,
// with a model of which chunks random writes touched.
func TestBitmapExtentsModel(t *testing.T) {
	m, _ := newManager(t)
	const sectors = 2048 // 1 MiB, 2048 bits at 512 bytes
	d, _ := m.CreateTable("d", "", false, fmt.Sprintf("0 %d zero", sectors))
	b, _ := d.AddBitmap(mapper.BitmapOptions{Name: "b", Granularity: 512})
	rng := rand.New(rand.NewPCG(1, 2))
	model := make([]bool, sectors)
	for i := 0; i < 40; i++ {
		s := rng.Uint64N(sectors)
		n := 1 + rng.Uint64N(min(300, sectors-s))
		if i%7 == 0 {
			n = min(sectors-s, 64*uint64(1+rng.IntN(4))) // whole words
		}
		d.Submit(&mapper.Request{Op: mapper.OpWriteZeroes, Sector: s, Sectors: n})
		for k := s; k < s+n; k++ {
			model[k] = true
		}
	}
	for i := 0; i < 200; i++ {
		off := rng.Uint64N(sectors * 512)
		n := 1 + rng.Uint64N(sectors*512-off)
		pos := off
		b.Extents(off, n, func(e mapper.Extent) bool {
			for p := pos; p < pos+e.Length; p = (p/512 + 1) * 512 {
				if model[p/512] != e.Dirty {
					t.Fatalf("extents of %d+%d: byte %d dirty=%v, model %v", off, n, p, e.Dirty, model[p/512])
				}
			}
			pos += e.Length
			return true
		})
		if pos != off+n {
			t.Fatalf("extents of %d+%d cover up to %d", off, n, pos)
		}
	}
}
