package mapper_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/mapper"
)

// benchDevice builds a device of n linear lines of 8 sectors over one
// file, each line at its own offset in it: sequential device reads read
// the file forward, as the one-line device's do, so that the benchmarks
// compare the mapper and not the order of the file's reads (reversed, the
// kernel took about 550 ns more per 4 KiB read on a quiet machine).
func benchDevice(b *testing.B, lines int) *mapper.Device {
	b.Helper()
	path := filepath.Join(b.TempDir(), "disk.img")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	f.Truncate(int64(lines) * 8 * 512 * 2)
	f.Close()
	var t strings.Builder
	for i := 0; i < lines; i++ {
		fmt.Fprintf(&t, "%d 8 linear %s %d\n", i*8, path, i*8)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
	b.Cleanup(func() { m.Close() })
	d, err := m.CreateTable("bench", "", false, t.String())
	if err != nil {
		b.Fatal(err)
	}
	return d
}

// BenchmarkTableLookup measures Find on tables of growing size: a binary
// search, so the cost grows with the logarithm of the line count. "stride"
// looks sectors up 7919 apart (modulo the size: each near the one before,
// so a branch predictor learns the path), "random" at random sectors, as
// random guest I/O does.
func BenchmarkTableLookup(b *testing.B) {
	for _, pattern := range []string{"stride", "random"} {
		for _, n := range []int{1, 10, 1000, 100000} {
			b.Run(fmt.Sprintf("%s/%d", pattern, n), func(b *testing.B) {
				var t strings.Builder
				for i := 0; i < n; i++ {
					fmt.Fprintf(&t, "%d 8 zero\n", i*8)
				}
				tab, err := mapper.BuildTable(t.String(), mapper.TableOptions{})
				if err != nil {
					b.Fatal(err)
				}
				secs := lookupSectors(pattern, tab.Size())
				b.ResetTimer()
				var sink int
				for i := 0; b.Loop(); i++ {
					sink += tab.Find(secs[i%len(secs)])
				}
				_ = sink
			})
		}
	}
}

// lookupSectors returns 4096 sectors below size in the benchmark's
// pattern.
func lookupSectors(pattern string, size uint64) []uint64 {
	rng := rand.New(rand.NewPCG(1, 2))
	secs := make([]uint64, 4096)
	for i := range secs {
		if pattern == "random" {
			secs[i] = rng.Uint64N(size)
		} else {
			secs[i] = uint64(i*7919) % size
		}
	}
	return secs
}

// BenchmarkSubmitRead4k measures a 4 KiB read through the mapper onto a
// page-cached file: one linear line versus 1000 lines.
func BenchmarkSubmitRead4k(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("lines=%d", n), func(b *testing.B) {
			d := benchDevice(b, max(n, 1))
			if n == 1 {
				d = benchDeviceOneLine(b, 8000)
			}
			buf := make([]byte, 4096)
			r := &mapper.Request{Op: mapper.OpRead, Sectors: 8, Data: [][]byte{buf}}
			size := d.Size()
			b.SetBytes(4096)
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				r.Sector = uint64(i*8) % size
				if err := d.Submit(r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSubmitMapCost measures what the mapper itself costs a request:
// 4 KiB writes through Device.Submit (admission, checks, the dirty-bitmap
// hook, the lookup, the target's Map) onto zero targets, which drop them,
// so no I/O hides the difference. One line of 8000 sectors against 1000
// lines of 8 over the same range, at random 4 KiB positions (as random
// guest I/O: no branch predictor learns the lookup's path). The ns/op
// difference between the two is the cost of a 1000-line table per
// request.
func BenchmarkSubmitMapCost(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("lines=%d", n), func(b *testing.B) {
			var t strings.Builder
			for i := 0; i < n; i++ {
				fmt.Fprintf(&t, "%d %d zero\n", i*8000/n, 8000/n)
			}
			m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
			b.Cleanup(func() { m.Close() })
			d, err := m.CreateTable("cost", "", false, t.String())
			if err != nil {
				b.Fatal(err)
			}
			r := &mapper.Request{Op: mapper.OpWrite, Sectors: 8, Data: [][]byte{make([]byte, 4096)}}
			secs := lookupSectors("random", 1000)
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				r.Sector = secs[i%len(secs)] * 8
				if err := d.Submit(r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkTrySubmitRead4k is BenchmarkSubmitRead4k through the
// non-blocking path (preadv2 with RWF_NOWAIT) that vhost queues run on
// their ring goroutines; the data is read once first so that the page
// cache holds it. "wouldblock/op" counts the reads that had to fall back.
func BenchmarkTrySubmitRead4k(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("lines=%d", n), func(b *testing.B) {
			d := benchDevice(b, max(n, 1))
			if n == 1 {
				d = benchDeviceOneLine(b, 8000)
			}
			buf := make([]byte, 4096)
			r := &mapper.Request{Op: mapper.OpRead, Sectors: 8, Data: [][]byte{buf}}
			size := d.Size()
			for s := uint64(0); s < size; s += 8 {
				r.Sector = s
				if err := d.Submit(r); err != nil {
					b.Fatal(err)
				}
			}
			b.SetBytes(4096)
			b.ReportAllocs()
			blocked := 0
			for i := 0; b.Loop(); i++ {
				r.Sector = uint64(i*8) % size
				err := d.TrySubmit(r)
				if errors.Is(err, mapper.ErrWouldBlock) {
					blocked++
					err = d.Submit(r)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(blocked)/float64(b.N), "wouldblock/op")
		})
	}
}

func benchDeviceOneLine(b *testing.B, sectors int) *mapper.Device {
	path := filepath.Join(b.TempDir(), "one.img")
	f, _ := os.Create(path)
	f.Truncate(int64(sectors) * 512)
	f.Close()
	m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
	b.Cleanup(func() { m.Close() })
	d, err := m.CreateTable("one", "", false, fmt.Sprintf("0 %d linear %s 0", sectors, path))
	if err != nil {
		b.Fatal(err)
	}
	return d
}

// BenchmarkSplit measures a 64 KiB write that crosses 16 target lines.
func BenchmarkSplit(b *testing.B) {
	var t strings.Builder
	for i := 0; i < 1024; i++ {
		fmt.Fprintf(&t, "%d 8 zero\n", i*8)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
	b.Cleanup(func() { m.Close() })
	d, err := m.CreateTable("split", "", false, t.String())
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	r := &mapper.Request{Op: mapper.OpWrite, Sectors: 128, Data: [][]byte{buf}}
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		r.Sector = uint64(i*128) % (8192 - 128)
		if err := d.Submit(r); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFileBackend measures the file backend alone on a page-cached
// file: one preadv or pwritev per request, 4 KiB at random offsets and
// 1 MiB sequentially. It must not allocate.
func BenchmarkFileBackend(b *testing.B) {
	const size = 64 << 20
	path := filepath.Join(b.TempDir(), "file.img")
	if err := os.WriteFile(path, make([]byte, size), 0o600); err != nil {
		b.Fatal(err)
	}
	fb, err := mapper.OpenFile(path, false)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { fb.Close() })
	for _, bs := range []int{4 << 10, 1 << 20} {
		for _, op := range []string{"read", "write"} {
			b.Run(fmt.Sprintf("%s/%dk", op, bs>>10), func(b *testing.B) {
				bufs := [][]byte{make([]byte, bs)}
				blocks := int64(size / bs)
				b.SetBytes(int64(bs))
				b.ReportAllocs()
				for i := int64(0); b.Loop(); i++ {
					off := (i * 7919 % blocks) * int64(bs)
					if op == "read" {
						err = fb.ReadAt(bufs, off)
					} else {
						err = fb.WriteAt(bufs, off)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkTableCost measures what a 1000-line table costs a request
// against a one-line table over the same range, paired: the two devices
// take turns in blocks of 256 requests (in the order one, 1000, 1000, one,
// ...), so that drift in the machine's load falls on both alike, and each
// block is timed by the wall clock and by the thread's CPU clock (which
// time taken by other processes does not count). It reports, per request,
// "1line-ns" and "1000line-ns" (wall), "1line-cpu-ns" and
// "1000line-cpu-ns", and "cpu-ratio" (1000 lines over one); ns/op is the
// mean of both devices.
//
//   - zero: 4 KiB writes through Device.Submit onto zero targets, which
//     drop them: the mapper alone (admission, checks, lookup, Map).
//   - linear: 4 KiB reads through Device.TrySubmit (preadv2 with
//     RWF_NOWAIT, the ring goroutine's path) onto a page-cached 64 MiB
//     file, the 1000-line table a permutation of its 64 KiB segments as
//     scripts/bench-vs-qsd.sh's row 5 is of 512 KiB ones.
//
// Both at random 4 KiB positions, the same sequence on both devices.
func BenchmarkTableCost(b *testing.B) {
	for _, kind := range []string{"zero", "linear"} {
		b.Run(kind, func(b *testing.B) {
			m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
			b.Cleanup(func() { m.Close() })
			const segs, segSectors = 1000, 128 // 1000 x 64 KiB
			var one, thousand strings.Builder
			op := mapper.OpWrite
			submit := (*mapper.Device).Submit
			if kind == "zero" {
				fmt.Fprintf(&one, "0 %d zero", segs*segSectors)
				for i := range segs {
					fmt.Fprintf(&thousand, "%d %d zero\n", i*segSectors, segSectors)
				}
			} else {
				path := filepath.Join(b.TempDir(), "disk.img")
				data := make([]byte, segs*segSectors*512)
				rand.NewChaCha8([32]byte{5}).Read(data)
				if err := os.WriteFile(path, data, 0o600); err != nil {
					b.Fatal(err)
				}
				fmt.Fprintf(&one, "0 %d linear %s 0", segs*segSectors, path)
				for i := range segs {
					fmt.Fprintf(&thousand, "%d %d linear %s %d\n", i*segSectors, segSectors, path, (i*389%segs)*segSectors)
				}
				op = mapper.OpRead
				submit = func(d *mapper.Device, r *mapper.Request) error {
					err := d.TrySubmit(r)
					if errors.Is(err, mapper.ErrWouldBlock) {
						err = d.Submit(r)
					}
					return err
				}
			}
			var devs [2]*mapper.Device
			for i, text := range []string{one.String(), thousand.String()} {
				d, err := m.CreateTable(fmt.Sprintf("cost%d", i), "", false, text)
				if err != nil {
					b.Fatal(err)
				}
				devs[i] = d
			}
			if n := len(devs[1].Status(mapper.StatusTable, false)); n != segs {
				b.Fatalf("1000-line device has %d lines", n)
			}
			r := &mapper.Request{Op: op, Sectors: 8, Data: [][]byte{make([]byte, 4096)}}
			if op == mapper.OpRead { // into the page cache
				for s := uint64(0); s < segs*segSectors; s += 8 {
					r.Sector = s
					if err := devs[0].Submit(r); err != nil {
						b.Fatal(err)
					}
				}
			}
			secs := lookupSectors("random", segs*segSectors/8)
			const block = 256
			var next [2]int
			var wall, cpu [2]time.Duration
			var reqs [2]int
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				dev := (i ^ i>>1) & 1
				d := devs[dev]
				c0, w0 := threadCPU(b), time.Now()
				for range block {
					r.Sector = secs[next[dev]%len(secs)] * 8
					next[dev]++
					if err := submit(d, r); err != nil {
						b.Fatal(err)
					}
				}
				wall[dev] += time.Since(w0)
				cpu[dev] += threadCPU(b) - c0
				reqs[dev] += block
			}
			per := func(t time.Duration, n int) float64 { return float64(t.Nanoseconds()) / float64(max(n, 1)) }
			b.ReportMetric(per(wall[0]+wall[1], reqs[0]+reqs[1]), "ns/op")
			b.ReportMetric(per(wall[0], reqs[0]), "1line-ns")
			b.ReportMetric(per(wall[1], reqs[1]), "1000line-ns")
			b.ReportMetric(per(cpu[0], reqs[0]), "1line-cpu-ns")
			b.ReportMetric(per(cpu[1], reqs[1]), "1000line-cpu-ns")
			if cpu[0] > 0 && reqs[1] > 0 {
				b.ReportMetric(per(cpu[1], reqs[1])/per(cpu[0], reqs[0]), "cpu-ratio")
			}
		})
	}
}

// threadCPU returns the CPU time of the calling thread (the caller locks
// its goroutine to the thread).
func threadCPU(b *testing.B) time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ts.Nano())
}
