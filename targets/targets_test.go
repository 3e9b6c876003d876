package targets_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets"
)

// files makes n sparse files of size bytes in a temp dir.
func files(t *testing.T, n int, size int64) []string {
	t.Helper()
	dir := t.TempDir()
	var out []string
	for i := range n {
		p := filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
		out = append(out, p)
	}
	return out
}

func manager(t *testing.T) *mapper.Manager {
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(func() { m.Close() })
	return m
}

func pattern(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// stripeModel returns the file index and byte offset of target sector s.
func stripeModel(s, chunk uint64, offs []uint64) (int, int64) {
	n := uint64(len(offs))
	c := s / chunk
	i := c % n
	return int(i), int64(((c/n)*chunk + s%chunk + offs[i]) * 512)
}

func TestStripedPlacement(t *testing.T) {
	for _, tc := range []struct {
		stripes int
		chunk   uint64
	}{{1, 8}, {2, 8}, {3, 16}, {4, 128}} {
		t.Run(fmt.Sprintf("%dx%d", tc.stripes, tc.chunk), func(t *testing.T) {
			paths := files(t, tc.stripes, 4<<20)
			offs := make([]uint64, tc.stripes)
			table := fmt.Sprintf("0 %d striped %d %d", uint64(tc.stripes)*tc.chunk*20, tc.stripes, tc.chunk)
			for i, p := range paths {
				offs[i] = uint64(i) * 24
				table += fmt.Sprintf(" %s %d", p, offs[i])
			}
			m := manager(t)
			d, err := m.CreateTable("st", "", false, table)
			if err != nil {
				t.Fatal(err)
			}
			size := d.Size()
			data := pattern(uint64(tc.stripes), int(size*512))
			// Write in odd-sized pieces that cross chunk boundaries.
			rng := rand.New(rand.NewPCG(1, 2))
			for s := uint64(0); s < size; {
				n := min(size-s, 1+rng.Uint64N(3*tc.chunk))
				if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: n, Data: [][]byte{data[s*512 : (s+n)*512]}}); err != nil {
					t.Fatal(err)
				}
				s += n
			}
			if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
				t.Fatal(err)
			}
			// Every sector is in the file the model names, byte for byte.
			raw := make([][]byte, len(paths))
			for i, p := range paths {
				raw[i], _ = os.ReadFile(p)
			}
			for s := uint64(0); s < size; s++ {
				i, off := stripeModel(s, tc.chunk, offs)
				if !bytes.Equal(raw[i][off:off+512], data[s*512:(s+1)*512]) {
					t.Fatalf("sector %d not at %s+%d", s, paths[i], off)
				}
			}
			back := make([]byte, len(data))
			if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: size, Data: [][]byte{back}}); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, data) {
				t.Fatal("striped read-back differs")
			}
			// Discard and write-zeroes of random ranges read back zeros
			// and leave everything else alone.
			for k := 0; k < 20; k++ {
				s := rng.Uint64N(size)
				n := 1 + rng.Uint64N(size-s)
				op := mapper.OpDiscard
				if k%2 == 1 {
					op = mapper.OpWriteZeroes
				}
				if err := d.Submit(&mapper.Request{Op: op, Sector: s, Sectors: n}); err != nil {
					t.Fatalf("%s %d+%d: %v", op, s, n, err)
				}
				clear(data[s*512 : (s+n)*512])
				if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: size, Data: [][]byte{back}}); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(back, data) {
					t.Fatalf("after %s %d+%d the device differs from the model", op, s, n)
				}
			}
		})
	}
}

func TestLinearPlacement(t *testing.T) {
	paths := files(t, 1, 1<<20)
	m := manager(t)
	d, err := m.CreateTable("lin", "", false, fmt.Sprintf("0 512 linear %s 1024\n512 512 linear %s 0", paths[0], paths[0]))
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(9, 1024*512)
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: 1024, Data: [][]byte{data[:1000], data[1000:]}}); err != nil {
		t.Fatal(err)
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(paths[0])
	if !bytes.Equal(raw[1024*512:1536*512], data[:512*512]) || !bytes.Equal(raw[:512*512], data[512*512:]) {
		t.Fatal("linear segments landed in the wrong place")
	}
	if got := d.Status(mapper.StatusTable, false)[0].String(); got != fmt.Sprintf("0 512 linear %s 1024", paths[0]) {
		t.Fatalf("table line %q", got)
	}
	// A file smaller than the table is refused.
	if _, err := m.CreateTable("big", "", false, fmt.Sprintf("0 4096 linear %s 0", paths[0])); err == nil ||
		err.Error() != fmt.Sprintf("create big: line 1: linear: %s too small for target: start=0, len=4096, dev_size=2048", paths[0]) {
		t.Fatalf("oversized table: %v", err)
	}
	if _, err := m.CreateTable("nofile", "", false, "0 8 linear /nonexistent/x.img 0"); err == nil ||
		err.Error() != "create nofile: line 1: linear: open /nonexistent/x.img: no such file or directory" {
		t.Fatalf("missing file: %v", err)
	}
}

func TestStripedStatusFailed(t *testing.T) {
	paths := files(t, 2, 1<<20)
	m := manager(t)
	d, err := m.CreateTable("sf", "", false, fmt.Sprintf("0 64 striped 2 8 %s 0 %s 0", paths[0], paths[1]))
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("0 64 striped 2 %s %s 1 AA", paths[0], paths[1])
	if got := d.Status(mapper.StatusInfo, false)[0].String(); got != want {
		t.Fatalf("status %q, want %q", got, want)
	}
}
