//go:build !vhostdm_nouring

// The engine's tests. Built with the vhostdm_nouring tag (go test -tags
// vhostdm_nouring ./...), which only tests use, NewIOQueue always fails,
// so that every suite (mapper, targets, vhost, cmd/vhostdm) runs on the
// worker-pool fallback; engine_off_test.go then checks that it does.

package mapper_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/mapper"
)

// newQueue returns an io_uring queue or fails the test naming why.
func newQueue(t testing.TB, res *results) *mapper.IOQueue {
	t.Helper()
	q, err := mapper.NewIOQueue(mapper.IOQueueConfig{Depth: 64, Complete: res.complete, Log: discard()})
	if err != nil {
		t.Fatalf("io_uring engine: %v (this test needs Linux >= 5.5 with io_uring allowed)", err)
	}
	t.Cleanup(func() {
		if err := q.Close(); err != nil {
			t.Error(err)
		}
	})
	return q
}

// TestIOQueueReadWrite writes to a block device through the engine, in
// batches, and reads back through the engine and through Submit: what the
// engine acknowledged is there; a flush after the writes is not
// coalesced away (the writes count as completed); a request beyond the
// device fails as Submit's does; flushes and FUA writes are left to
// Submit.
func TestIOQueueReadWrite(t *testing.T) {
	d := blockDevice(t, 1<<20, mapper.CacheWriteback)
	res := newResults()
	q := newQueue(t, res)
	const n = 32
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = bytes.Repeat([]byte{byte(i + 1)}, 4096)
		r := mapper.Request{Op: mapper.OpWrite, Sector: uint64(i * 8), Sectors: 8,
			Data: [][]byte{bufs[i][:1000], bufs[i][1000:]}}
		if err := d.SubmitAsync(q, &r, uint64(i)); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	q.Flush()
	for i := 0; i < n; i++ {
		if err := res.wait(uint64(i)); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		got := make([]byte, 4096)
		if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: uint64(i * 8), Sectors: 8, Data: [][]byte{got}}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, bufs[i]) {
			t.Fatalf("block %d: not what the engine wrote", i)
		}
	}
	for i := 0; i < n; i++ {
		got := make([]byte, 4096)
		r := mapper.Request{Op: mapper.OpRead, Sector: uint64(i * 8), Sectors: 8, Data: [][]byte{got}}
		if err := d.SubmitAsync(q, &r, uint64(100+i)); err != nil {
			t.Fatal(err)
		}
		q.Flush()
		if err := res.wait(uint64(100 + i)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, bufs[i]) {
			t.Fatalf("read %d: not what was written", i)
		}
	}
	// Beyond the device: the request's error, nothing queued.
	got := make([]byte, 8192)
	r := mapper.Request{Op: mapper.OpRead, Sector: 1 << 20, Sectors: 8, Data: [][]byte{got[:4096]}}
	if err := d.SubmitAsync(q, &r, 8); err == nil || errors.Is(err, mapper.ErrWouldBlock) {
		t.Fatalf("read beyond the device: %v, want an error", err)
	}
	// A flush and a FUA write are not for the engine.
	for _, r := range []mapper.Request{{Op: mapper.OpFlush}, {Op: mapper.OpWrite, FUA: true, Sectors: 8, Data: [][]byte{got[:4096]}}} {
		if err := d.SubmitAsync(q, &r, 9); !errors.Is(err, mapper.ErrWouldBlock) {
			t.Fatalf("op %v fua %v: %v, want ErrWouldBlock", r.Op, r.FUA, err)
		}
	}
}

// TestIOQueueFile reads a regular file through the engine, across the
// end of the file (which shrank under the device): the data, then zeros,
// as ReadAt gives; and writes one through the engine's lane.
func TestIOQueueFile(t *testing.T) {
	d, path := engineDevice(t, t.TempDir(), 1<<20, mapper.CacheWriteback)
	res := newResults()
	q := newQueue(t, res)
	want := bytes.Repeat([]byte{7}, 4096)
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sectors: 8, Data: [][]byte{want}}); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 4096); err != nil {
		t.Fatal(err)
	}
	got := bytes.Repeat([]byte{0xff}, 8192)
	r := mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 16, Data: [][]byte{got[:100], got[100:]}}
	if err := d.SubmitAsync(q, &r, 7); err != nil {
		t.Fatal(err)
	}
	q.Flush()
	if err := res.wait(7); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:4096], want) || !bytes.Equal(got[4096:], make([]byte, 4096)) {
		t.Fatal("a read across the end of the file: want the data, then zeros")
	}
	// A buffered write to a regular file goes to the engine's lane.
	want2 := bytes.Repeat([]byte{9}, 8192)
	r = mapper.Request{Op: mapper.OpWrite, Sector: 8, Sectors: 16, Data: [][]byte{want2[:512], want2[512:]}}
	if err := d.SubmitAsync(q, &r, 8); err != nil {
		t.Fatalf("write to a regular file: %v, want it queued", err)
	}
	q.Flush()
	if err := res.wait(8); err != nil {
		t.Fatal(err)
	}
	onDisk, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk[4096:4096+8192], want2) {
		t.Fatal("a buffered write through the engine's lane: the file does not hold it")
	}
}

// TestIOQueueSuspend checks that a suspended device refuses the engine
// (the caller falls back to Submit, which waits) and that suspend waits
// for requests the engine has in flight.
func TestIOQueueSuspend(t *testing.T) {
	d, _ := engineDevice(t, t.TempDir(), 1<<20, mapper.CacheWriteback)
	res := newResults()
	q := newQueue(t, res)
	buf := make([]byte, 4096)
	r := mapper.Request{Op: mapper.OpRead, Sectors: 8, Data: [][]byte{buf}}
	if err := d.SubmitAsync(q, &r, 1); err != nil {
		t.Fatal(err)
	}
	suspended := make(chan error, 1)
	go func() { suspended <- d.Suspend(false) }()
	q.Flush()
	if err := res.wait(1); err != nil {
		t.Fatal(err)
	}
	if err := <-suspended; err != nil {
		t.Fatal(err)
	}
	if err := d.SubmitAsync(q, &r, 2); !errors.Is(err, mapper.ErrWouldBlock) {
		t.Fatalf("suspended: %v, want ErrWouldBlock", err)
	}
	if err := d.Resume(); err != nil {
		t.Fatal(err)
	}
}

// warm reads the whole device once, so that both benchmarks find it in
// the page cache.
func warm(b *testing.B, d *mapper.Device) {
	buf := make([]byte, 1<<20)
	for s := uint64(0); s < d.Size(); s += 2048 {
		if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: s, Sectors: 2048, Data: [][]byte{buf}}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIOQueue measures 4 KiB random reads and writes through the
// engine, 32 at a time (one io_uring_enter per batch), and the same
// through Submit from 32 goroutines for comparison, on a loop device over
// a file and on a regular file (all in the page cache): the engine sends
// the file's writes to its lane (lane.go), everything else to io_uring.
func BenchmarkIOQueue(b *testing.B) {
	const qd = 32
	devs := []struct {
		name string
		open func(b *testing.B) *mapper.Device
	}{
		{"loop", func(b *testing.B) *mapper.Device { return blockDevice(b, 64<<20, mapper.CacheWriteback) }},
		{"file", func(b *testing.B) *mapper.Device {
			d, _ := engineDevice(b, b.TempDir(), 64<<20, mapper.CacheWriteback)
			buf := make([]byte, 1<<20) // allocate the file: no holes
			for s := uint64(0); s < d.Size(); s += 2048 {
				if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: 2048, Data: [][]byte{buf}}); err != nil {
					b.Fatal(err)
				}
			}
			return d
		}},
	}
	for _, dv := range devs {
		for _, op := range []mapper.Op{mapper.OpRead, mapper.OpWrite} {
			b.Run(fmt.Sprintf("%s/%v/engine", dv.name, op), func(b *testing.B) {
				d := dv.open(b)
				warm(b, d)
				done := make(chan uint64, qd)
				q, err := mapper.NewIOQueue(mapper.IOQueueConfig{Depth: qd, Log: discard(),
					Complete: func(tag uint64, err error) {
						if err != nil {
							panic(err)
						}
						done <- tag
					}})
				if err != nil {
					b.Fatal(err)
				}
				defer q.Close()
				bufs := make([][]byte, qd)
				reqs := make([]mapper.Request, qd)
				for i := range bufs {
					bufs[i] = make([]byte, 4096)
				}
				sector := uint64(0)
				next := func(i int) {
					sector = (sector + 7919*8) % (64 << 20 / 512)
					reqs[i] = mapper.Request{Op: op, Sector: sector &^ 7, Sectors: 8, Data: bufs[i : i+1]}
					if err := d.SubmitAsync(q, &reqs[i], uint64(i)); err != nil {
						b.Fatal(err)
					}
				}
				for i := range qd {
					next(i)
				}
				q.Flush()
				b.ResetTimer()
				for n := 0; n < b.N; {
					tag := <-done
					n++
					next(int(tag))
					for k := len(done); k > 0; k-- {
						next(int(<-done))
						n++
					}
					q.Flush()
				}
				b.StopTimer()
				for range qd {
					<-done
				}
			})
			b.Run(fmt.Sprintf("%s/%v/submit", dv.name, op), func(b *testing.B) {
				d := dv.open(b)
				warm(b, d)
				b.SetParallelism(qd)
				b.RunParallel(func(pb *testing.PB) {
					buf := make([]byte, 4096)
					sector := uint64(0)
					for pb.Next() {
						sector = (sector + 7919*8) % (64 << 20 / 512)
						r := mapper.Request{Op: op, Sector: sector &^ 7, Sectors: 8, Data: [][]byte{buf}}
						if err := d.Submit(&r); err != nil {
							b.Fatal(err)
						}
					}
				})
			})
		}
	}
}

// TestIOQueueDirect sends O_DIRECT reads and writes of a cache = "none"
// device over a block device through the engine: aligned buffers go to
// io_uring, unaligned ones are left to the blocking path (ErrWouldBlock),
// which bounces them.
func TestIOQueueDirect(t *testing.T) {
	d := blockDevice(t, 1<<20, mapper.CacheNone)
	res := newResults()
	q := newQueue(t, res)
	r := mapper.Request{Op: mapper.OpRead, Sectors: 8, Data: [][]byte{misaligned(4096, 1, 0)}}
	if err := d.SubmitAsync(q, &r, 1); !errors.Is(err, mapper.ErrWouldBlock) {
		t.Fatalf("unaligned buffer to the engine: %v, want ErrWouldBlock", err)
	}
	want := misaligned(4096, 0, 9)
	r = mapper.Request{Op: mapper.OpWrite, Sector: 64, Sectors: 8, Data: [][]byte{want}}
	if err := d.SubmitAsync(q, &r, 2); err != nil {
		t.Fatal(err)
	}
	q.Flush()
	if err := res.wait(2); err != nil {
		t.Fatal(err)
	}
	got := misaligned(4096, 0, 0)
	r = mapper.Request{Op: mapper.OpRead, Sector: 64, Sectors: 8, Data: [][]byte{got}}
	if err := d.SubmitAsync(q, &r, 3); err != nil {
		t.Fatal(err)
	}
	q.Flush()
	if err := res.wait(3); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("O_DIRECT through io_uring: read is not what was written")
	}
}

// TestIOQueueDirectFile writes and reads an O_DIRECT (cache = "none")
// regular file through the engine: unlike buffered writes to a regular
// file, O_DIRECT ones go to io_uring, and what was written reads back,
// through the engine and through the page cache after close.
func TestIOQueueDirectFile(t *testing.T) {
	d, path := engineDevice(t, t.TempDir(), 1<<20, mapper.CacheNone)
	res := newResults()
	q := newQueue(t, res)
	want := misaligned(8192, 0, 5)
	r := mapper.Request{Op: mapper.OpWrite, Sector: 16, Sectors: 16, Data: [][]byte{want[:4096], want[4096:]}}
	if err := d.SubmitAsync(q, &r, 1); err != nil {
		t.Fatalf("O_DIRECT write to a regular file: %v, want it queued", err)
	}
	q.Flush()
	if err := res.wait(1); err != nil {
		t.Fatal(err)
	}
	got := misaligned(8192, 0, 0)
	r = mapper.Request{Op: mapper.OpRead, Sector: 16, Sectors: 16, Data: [][]byte{got}}
	if err := d.SubmitAsync(q, &r, 2); err != nil {
		t.Fatal(err)
	}
	q.Flush()
	if err := res.wait(2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("O_DIRECT file through io_uring: read is not what was written")
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	onDisk, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk[16*512:16*512+8192], want) {
		t.Fatal("O_DIRECT write through io_uring: the file does not hold it")
	}
	// An unaligned buffer is left to the blocking path, which bounces it.
	r = mapper.Request{Op: mapper.OpWrite, Sector: 16, Sectors: 8, Data: [][]byte{misaligned(4096, 1, 3)}}
	if err := d.SubmitAsync(q, &r, 3); !errors.Is(err, mapper.ErrWouldBlock) {
		t.Fatalf("unaligned O_DIRECT write: %v, want ErrWouldBlock", err)
	}
}

// TestIOQueueLargeRead reads 1 MiB of a regular file through the engine
// in three unequal buffers: a buffered read that large goes to an io-wq
// thread at once (IOSQE_ASYNC) and must return the same bytes as ReadAt.
func TestIOQueueLargeRead(t *testing.T) {
	d, _ := engineDevice(t, t.TempDir(), 4<<20, mapper.CacheWriteback)
	res := newResults()
	q := newQueue(t, res)
	want := misaligned(1<<20, 0, 11)
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 2048, Sectors: 2048, Data: [][]byte{want}}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	r := mapper.Request{Op: mapper.OpRead, Sector: 2048, Sectors: 2048, Data: [][]byte{got[:4096], got[4096 : 300<<10], got[300<<10:]}}
	if err := d.SubmitAsync(q, &r, 4); err != nil {
		t.Fatal(err)
	}
	q.Flush()
	if err := res.wait(4); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("1 MiB read through the engine: not the data written")
	}
}

// inIOURingEnter returns the threads of this process that are in
// io_uring_enter (/proc/self/task/TID/syscall), leaving out the kernel's
// io-wq workers (named iou-wrk-*), which show the io_uring_enter they
// were started from for good.
func inIOURingEnter(t *testing.T) []string {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	var in []string
	for _, task := range tasks {
		comm, err := os.ReadFile("/proc/self/task/" + task.Name() + "/comm")
		if err != nil || strings.HasPrefix(string(comm), "iou-") {
			continue // exited, or an io-wq worker
		}
		b, err := os.ReadFile("/proc/self/task/" + task.Name() + "/syscall")
		if err != nil {
			continue // the thread exited
		}
		if f := strings.Fields(string(b)); len(f) > 0 && f[0] == fmt.Sprint(unix.SYS_IO_URING_ENTER) {
			in = append(in, task.Name())
		}
	}
	return in
}

// TestIOQueueWaitsInPoller: between batches the completion goroutine waits
// in Go's poller (on the ring's eventfd), not in a thread blocked in
// io_uring_enter; reads with resident buffers (submitted with a raw
// io_uring_enter) and without complete with the right data, one batch
// after another.
func TestIOQueueWaitsInPoller(t *testing.T) {
	d, _ := engineDevice(t, t.TempDir(), 1<<20, mapper.CacheWriteback)
	res := newResults()
	q := newQueue(t, res)
	want := make([]byte, 1<<20)
	for i := range want {
		want[i] = byte(i/4096 + i)
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sectors: 2048, Data: [][]byte{want}}); err != nil {
		t.Fatal(err)
	}
	for i := range 64 {
		got := make([]byte, 4096)
		r := mapper.Request{Op: mapper.OpRead, Sector: uint64(i * 8), Sectors: 8, Data: [][]byte{got}, Resident: i%2 == 0}
		if err := d.SubmitAsync(q, &r, uint64(i)); err != nil {
			t.Fatal(err)
		}
		q.Flush()
		if err := res.wait(uint64(i)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[i*4096:(i+1)*4096]) {
			t.Fatalf("read %d (resident %v): wrong data", i, i%2 == 0)
		}
	}
	// The completion goroutine is idle now; give it time to park.
	deadline := time.Now().Add(2 * time.Second)
	for {
		in := inIOURingEnter(t)
		if len(in) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("threads %v wait in io_uring_enter while the engine is idle", in)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestIOQueueSubmitsInChunks: SubmitAsync submits every SubmitBatch
// requests by itself, so that a long batch of requests reaches the device
// in chunks instead of all at Flush: the first chunk's reads complete, with
// the right data, although the submitter never calls Flush nor submits
// anything after them (their completions are reaped without waiting for
// another submission); the requests of an unfinished chunk go with Flush.
// Both with the default batch and with SubmitBatch 1.
func TestIOQueueSubmitsInChunks(t *testing.T) {
	for _, batch := range []int{0, 1} {
		t.Run(fmt.Sprintf("batch=%d", batch), func(t *testing.T) {
			d, _ := engineDevice(t, t.TempDir(), 1<<20, mapper.CacheNone)
			want := misaligned(1<<20, 0, 7)
			if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sectors: 2048, Data: [][]byte{want}}); err != nil {
				t.Fatal(err)
			}
			res := newResults()
			q, err := mapper.NewIOQueue(mapper.IOQueueConfig{Depth: 64, SubmitBatch: batch, Complete: res.complete, Log: discard()})
			if err != nil {
				t.Fatalf("io_uring engine: %v", err)
			}
			t.Cleanup(func() {
				if err := q.Close(); err != nil {
					t.Error(err)
				}
			})
			chunk := batch
			if chunk == 0 {
				chunk = mapper.DefaultSubmitBatch
			}
			n := chunk + chunk/2 // a whole chunk and part of the next
			got := make([][]byte, n)
			for i := range n {
				got[i] = misaligned(4096, 0, 0)
				r := mapper.Request{Op: mapper.OpRead, Sector: uint64(i * 8), Sectors: 8, Data: [][]byte{got[i]}}
				if err := d.SubmitAsync(q, &r, uint64(i)); err != nil {
					t.Fatal(err)
				}
			}
			for i := range chunk {
				if err := res.waitWithin(t, uint64(i), 10*time.Second); err != nil {
					t.Fatalf("read %d of the first chunk: %v", i, err)
				}
			}
			q.Flush()
			for i := chunk; i < n; i++ {
				if err := res.waitWithin(t, uint64(i), 10*time.Second); err != nil {
					t.Fatalf("read %d, submitted by Flush: %v", i, err)
				}
			}
			for i := range n {
				if !bytes.Equal(got[i], want[i*4096:(i+1)*4096]) {
					t.Fatalf("read %d: not the data written", i)
				}
			}
		})
	}
}
