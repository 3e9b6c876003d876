//go:build !vhostdm_nouring

package mapper

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// TestLaneStall blocks a request in the lane (a write into a full pipe, a
// real blocking write) and checks that a buffered write to a regular file
// queued behind it completes long before the blocked one does, on a lane
// goroutine started for the stall; then unblocks the first.
func TestLaneStall(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	m := NewManager(ManagerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	t.Cleanup(func() { m.Close() })
	d, err := m.CreateTableWith("lane", "", DeviceOptions{}, fmt.Sprintf("0 2048 linear %s 0\n", path))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan uint64, 4)
	q, err := NewIOQueue(IOQueueConfig{Depth: 8, Complete: func(tag uint64, err error) {
		if err != nil {
			t.Errorf("request %d: %v", tag, err)
		}
		done <- tag
	}})
	if err != nil {
		t.Fatalf("io_uring engine: %v (this test needs Linux >= 5.5 with io_uring allowed)", err)
	}

	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	// pwritev2 at offset -1 writes at the current position, which for a
	// pipe is a plain write: more than the pipe holds blocks.
	pipe := &fileBackend{name: "pipe", fd: int(pw.Fd())}
	big := make([]byte, 1<<20)
	d.inflight.Add(1)
	if err := q.queue(d, pipe, OpWrite, [][]byte{big}, -1, 0, 0, 1, true, false); err != nil {
		t.Fatal(err)
	}
	q.Flush()
	time.Sleep(20 * time.Millisecond) // the lane goroutine is now blocked in the pipe

	want := bytes.Repeat([]byte{3}, 4096)
	r := Request{Op: OpWrite, Sector: 8, Sectors: 8, Data: [][]byte{want}}
	start := time.Now()
	if err := d.SubmitAsync(q, &r, 2); err != nil {
		t.Fatal(err)
	}
	q.Flush()
	select {
	case tag := <-done:
		if tag != 2 {
			t.Fatalf("request %d completed first, want the write behind the blocked one", tag)
		}
		if el := time.Since(start); el > 500*time.Millisecond {
			t.Fatalf("the write behind a blocked one took %v", el)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a write queued behind a blocked lane request did not complete in 5 s")
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[4096:8192], want) {
		t.Fatal("the write behind the blocked one is not in the file")
	}

	// Unblock the first: drain the pipe.
	go io.Copy(io.Discard, pr)
	select {
	case tag := <-done:
		if tag != 1 {
			t.Fatalf("completion of %d, want 1", tag)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the unblocked request did not complete")
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestLaneRefill queues large buffered writes on the lane at once and
// checks that the lane delivers the completions of the first ones while
// the last is still to be written (so that the submitter can send the
// next requests while the lane copies), and that small writes are still
// delivered together; every write reaches the file.
func TestLaneRefill(t *testing.T) {
	const mib = 1 << 20
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, make([]byte, 4*mib), 0o600); err != nil {
		t.Fatal(err)
	}
	m := NewManager(ManagerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	t.Cleanup(func() { m.Close() })
	d, err := m.CreateTableWith("refill", "", DeviceOptions{}, fmt.Sprintf("0 8192 linear %s 0\n", path))
	if err != nil {
		t.Fatal(err)
	}
	// Every callback runs on the one lane goroutine, one after another:
	// n needs no lock; BatchEnd sends each batch's size.
	n := 0
	ended := make(chan int, 16)
	q, err := NewIOQueue(IOQueueConfig{
		Depth: 32,
		Complete: func(tag uint64, err error) {
			if err != nil {
				t.Errorf("request %d: %v", tag, err)
			}
			n++
		},
		BatchStart: func() { n = 0 },
		BatchEnd:   func() { ended <- n },
	})
	if err != nil {
		t.Fatalf("io_uring engine: %v (this test needs Linux >= 5.5 with io_uring allowed)", err)
	}
	defer q.Close()

	// run submits writes of size bytes each, filled with their index, at
	// once, and returns the sizes of the batches they were delivered in.
	run := func(count, size int) []int {
		var batches []int
		for i := range count {
			data := bytes.Repeat([]byte{byte(i + 1)}, size)
			r := Request{Op: OpWrite, Sector: uint64(i*size) >> SectorShift, Sectors: uint64(size) >> SectorShift, Data: [][]byte{data}}
			if err := d.SubmitAsync(q, &r, uint64(i)); err != nil {
				t.Fatal(err)
			}
		}
		q.Flush()
		for got := 0; got < count; {
			select {
			case b := <-ended:
				batches = append(batches, b)
				got += b
			case <-time.After(10 * time.Second):
				t.Fatalf("%d of %d writes of %d bytes completed in 10 s", got, count, size)
			}
		}
		file, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for i := range count {
			if file[i*size] != byte(i+1) || file[(i+1)*size-1] != byte(i+1) {
				t.Fatalf("write %d of %d bytes is not in the file", i, size)
			}
		}
		return batches
	}

	// Four 1 MiB writes: the first three are delivered when one MiB is
	// left to write, the last when the queue is empty.
	if got := run(4, mib); len(got) != 2 || got[0] != 3 || got[1] != 1 {
		t.Errorf("four 1 MiB writes delivered in batches %v, want [3 1]", got)
	}
	// Eight 4 KiB writes add up to far less: one batch.
	if got := run(8, 4096); len(got) != 1 || got[0] != 8 {
		t.Errorf("eight 4 KiB writes delivered in batches %v, want [8]", got)
	}
}

// TestIOQueueRawSubmit: a batch whose requests all have resident buffers
// is submitted with a raw io_uring_enter; one with any other request goes
// through the Go scheduler, and the next batch is judged afresh.
func TestIOQueueRawSubmit(t *testing.T) {
	done := make(chan error, 8)
	q, err := NewIOQueue(IOQueueConfig{Depth: 8, Complete: func(_ uint64, err error) { done <- err }})
	if err != nil {
		t.Fatalf("io_uring engine: %v (this test needs Linux >= 5.5 with io_uring allowed)", err)
	}
	defer q.Close()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	fb, err := openFile(path, true, CacheWriteback)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	m := NewManager(ManagerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	t.Cleanup(func() { m.Close() })
	d, err := m.CreateTableWith("raw", "", DeviceOptions{}, fmt.Sprintf("0 128 linear %s 0\n", path))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for _, batch := range [][]bool{{true, true}, {true, false}, {true}} {
		for _, resident := range batch {
			d.inflight.Add(1)
			if err := q.queue(d, fb, OpRead, [][]byte{buf}, 0, 0, 8, 1, false, resident); err != nil {
				t.Fatal(err)
			}
		}
		q.mu.Lock()
		mixed := q.mixed
		q.mu.Unlock()
		if want := slices.Contains(batch, false); mixed != want {
			t.Errorf("batch %v: submitted through the scheduler %v, want %v", batch, mixed, want)
		}
		q.Flush()
		for range batch {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
		q.mu.Lock()
		mixed = q.mixed
		q.mu.Unlock()
		if mixed {
			t.Errorf("batch %v: still marked after its submission", batch)
		}
	}
}
