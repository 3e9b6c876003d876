package targets_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
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
