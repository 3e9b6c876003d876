//go:build !vhostdm_nouring

package mapper

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
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
	if err := q.queue(d, pipe, OpWrite, [][]byte{big}, -1, 0, 0, 1, true); err != nil {
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
