package targets_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"golang.org/x/sys/unix"
)

// TestTrySubmit: a device's non-blocking submit completes reads and writes
// through targets that only remap (linear, striped, zero, error and a
// stack of devices) when the page cache serves them, and returns
// ErrWouldBlock, without waiting, for a target that sleeps (delay), a
// request split onto one, an operation without a non-blocking form, a
// suspended device and data that is not in memory.
func TestTrySubmit(t *testing.T) {
	fs := files(t, 4, 4<<20)
	m := manager(t)
	table := fmt.Sprintf("0 2048 linear %s 0\n"+
		"2048 2048 striped 2 8 %s 0 %s 0\n"+
		"4096 2048 zero\n"+
		"6144 2048 error\n"+
		"8192 2048 delay %s 0 1000\n", fs[0], fs[1], fs[2], fs[3])
	dev, err := m.CreateTable("nw", "", false, table)
	if err != nil {
		t.Fatal(err)
	}
	upper, err := m.CreateTable("upper", "", false, "0 4096 linear /dev/mapper/nw 0")
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(3, 64<<10)
	// Written (through the page cache) with the blocking path first.
	for _, sector := range []uint64{0, 2048} {
		if err := dev.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: sector, Sectors: 128, Data: [][]byte{data}}); err != nil {
			t.Fatal(err)
		}
	}
	read := func(d *mapper.Device, sector uint64, n int) ([]byte, error) {
		buf := make([]byte, n)
		for i := range buf {
			buf[i] = 0xa5
		}
		return buf, d.TrySubmit(&mapper.Request{Op: mapper.OpRead, Sector: sector, Sectors: uint64(n / 512), Data: [][]byte{buf[:n/2], buf[n/2:]}})
	}

	for _, tc := range []struct {
		name   string
		dev    *mapper.Device
		sector uint64
		want   []byte
	}{
		{"linear", dev, 0, data},
		{"striped across chunks", dev, 2048, data},
		{"zero", dev, 4096, make([]byte, len(data))},
		{"stacked linear", upper, 0, data},
		{"stacked striped", upper, 2048, data},
	} {
		got, err := read(tc.dev, tc.sector, len(tc.want))
		if err != nil {
			t.Errorf("%s: TrySubmit read: %v", tc.name, err)
		} else if !bytes.Equal(got, tc.want) {
			t.Errorf("%s: TrySubmit read the wrong data", tc.name)
		}
	}
	if _, err := read(dev, 6144, 4096); !errors.Is(err, mapper.ErrIO) {
		t.Errorf("error target: %v, want an I/O error (not would-block)", err)
	}

	for _, tc := range []struct {
		name string
		r    mapper.Request
	}{
		{"delay read", mapper.Request{Op: mapper.OpRead, Sector: 8192, Sectors: 8, Data: [][]byte{make([]byte, 4096)}}},
		{"delay write", mapper.Request{Op: mapper.OpWrite, Sector: 8192, Sectors: 8, Data: [][]byte{make([]byte, 4096)}}},
		{"split onto delay", mapper.Request{Op: mapper.OpRead, Sector: 8188, Sectors: 8, Data: [][]byte{make([]byte, 4096)}}},
		{"split zero onto error then delay", mapper.Request{Op: mapper.OpRead, Sector: 6136, Sectors: 4096, Data: [][]byte{make([]byte, 4096*512)}}},
		{"flush", mapper.Request{Op: mapper.OpFlush}},
		{"discard", mapper.Request{Op: mapper.OpDiscard, Sector: 0, Sectors: 8}},
		{"write-zeroes", mapper.Request{Op: mapper.OpWriteZeroes, Sector: 0, Sectors: 8}},
		{"FUA write", mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: 8, FUA: true, Data: [][]byte{data[:4096]}}},
	} {
		start := time.Now()
		if err := dev.TrySubmit(&tc.r); !errors.Is(err, mapper.ErrWouldBlock) {
			t.Errorf("%s: %v, want ErrWouldBlock", tc.name, err)
		}
		// The delay is 1 s: an attempt that took it waited.
		if d := time.Since(start); d >= time.Second {
			t.Errorf("%s: would-block attempt took %v: it waited", tc.name, d)
		}
	}
	if _, err := read(dev, 10240, 4096); !errors.Is(err, mapper.ErrInvalid) {
		t.Errorf("read beyond the end: %v, want ErrInvalid", err)
	}

	// A write either completes without blocking or would block (ext4
	// has no non-blocking buffered writes); after the blocking path the
	// data is there either way.
	w := pattern(9, 8192)
	r := mapper.Request{Op: mapper.OpWrite, Sector: 64, Sectors: 16, Data: [][]byte{w}}
	if err := dev.TrySubmit(&r); errors.Is(err, mapper.ErrWouldBlock) {
		if err := dev.Submit(&r); err != nil {
			t.Fatal(err)
		}
	} else if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(w))
	if err := dev.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 64, Sectors: 16, Data: [][]byte{got}}); err != nil || !bytes.Equal(got, w) {
		t.Fatalf("after the write: %v, data equal %v", err, bytes.Equal(got, w))
	}

	// Suspended: would block at once instead of waiting for resume.
	if err := dev.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if _, err := read(dev, 0, 4096); !errors.Is(err, mapper.ErrWouldBlock) {
		t.Errorf("suspended device: %v, want ErrWouldBlock", err)
	}
	if err := dev.Resume(); err != nil {
		t.Fatal(err)
	}
}

// TestTrySubmitPageCache: a read of data that is not in the page cache
// would block (RWF_NOWAIT); once the blocking path has read it, the same
// read completes without blocking.
func TestTrySubmitPageCache(t *testing.T) {
	fs := files(t, 1, 4<<20)
	data := pattern(5, 1<<20)
	if err := os.WriteFile(fs[0], data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(fs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	dev, err := manager(t).CreateTable("pc", "", true, fmt.Sprintf("0 2048 linear %s 0", fs[0]))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	r := mapper.Request{Op: mapper.OpRead, Sector: 512, Sectors: 128, Data: [][]byte{buf}}
	if err := dev.TrySubmit(&r); !errors.Is(err, mapper.ErrWouldBlock) {
		t.Fatalf("read of evicted data: %v, want ErrWouldBlock", err)
	}
	if err := dev.Submit(&r); err != nil {
		t.Fatal(err)
	}
	clear(buf)
	if err := dev.TrySubmit(&r); err != nil {
		t.Fatalf("read of cached data: %v", err)
	}
	if !bytes.Equal(buf, data[512*512:512*512+len(buf)]) {
		t.Fatal("wrong data")
	}
}

// TestTrySubmitManyLinear: a table of many linear lines over one file in
// a permuted order (scripts/bench-vs-qsd.sh's 1000-line table), with a
// zero line among them and lines of a length that fits the lookup index's
// buckets and of one that does not: TrySubmit reads, inside a line and
// across two, find what the blocking path reads, and its writes land
// where the table says.
func TestTrySubmitManyLinear(t *testing.T) {
	for _, seg := range []uint64{1024, 1000} {
		const nseg = 200
		fs := files(t, 1, int64(nseg*seg*512))
		img := pattern(seg, int(nseg*seg*512))
		if err := os.WriteFile(fs[0], img, 0o600); err != nil {
			t.Fatal(err)
		}
		var table strings.Builder
		model := func(s uint64) (off uint64, zero bool) { // byte offset of device sector s in img
			i := s / seg
			if i == 7 {
				return 0, true
			}
			return ((i*89%nseg)*seg + s%seg) * 512, false
		}
		for i := range uint64(nseg) {
			if i == 7 {
				fmt.Fprintf(&table, "%d %d zero\n", i*seg, seg)
				continue
			}
			fmt.Fprintf(&table, "%d %d linear %s %d\n", i*seg, seg, fs[0], (i*89%nseg)*seg)
		}
		m := manager(t)
		dev, err := m.CreateTable(fmt.Sprintf("many%d", seg), "", false, table.String())
		if err != nil {
			t.Fatal(err)
		}
		want := func(s, n uint64) []byte {
			var b []byte
			for x := s; x < s+n; x++ {
				off, zero := model(x)
				if zero {
					b = append(b, make([]byte, 512)...)
				} else {
					b = append(b, img[off:off+512]...)
				}
			}
			return b
		}
		rng := rand.New(rand.NewPCG(seg, 1))
		var sectors []uint64
		for range 300 {
			sectors = append(sectors, rng.Uint64N(nseg*seg-8))
		}
		for i := range uint64(nseg - 1) {
			sectors = append(sectors, (i+1)*seg-4, i*seg) // across two lines, a line's first
		}
		for _, s := range sectors {
			buf := make([]byte, 4096)
			r := mapper.Request{Op: mapper.OpRead, Sector: s, Sectors: 8, Data: [][]byte{buf[:1536], buf[1536:]}}
			err := dev.TrySubmit(&r)
			if errors.Is(err, mapper.ErrWouldBlock) { // not in the page cache
				err = dev.Submit(&r)
			}
			if err != nil {
				t.Fatalf("lines of %d: read at %d: %v", seg, s, err)
			}
			if r.Sector != s || !bytes.Equal(buf, want(s, 8)) {
				t.Fatalf("lines of %d: read at %d: wrong data (request sector now %d)", seg, s, r.Sector)
			}
		}
		// A write inside line 3 lands at its place in the file.
		w := pattern(seg+1, 4096)
		s := 3*seg + 16
		r := mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: 8, Data: [][]byte{w}}
		if err := dev.TrySubmit(&r); errors.Is(err, mapper.ErrWouldBlock) {
			err = dev.Submit(&r)
			if err != nil {
				t.Fatal(err)
			}
		} else if err != nil {
			t.Fatal(err)
		}
		if err := dev.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(fs[0])
		if err != nil {
			t.Fatal(err)
		}
		off, _ := model(s)
		if !bytes.Equal(got[off:off+4096], w) {
			t.Errorf("lines of %d: the write at %d is not at byte %d of the file", seg, s, off)
		}
	}
}
