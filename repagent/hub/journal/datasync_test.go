package journal

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRingSync: a segment's Sync runs its fdatasync through io_uring
// (waiting in the poller), returns the fsync's error as fdatasync(2)
// would, and the fallback without a ring behaves the same.
func TestRingSync(t *testing.T) {
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "seg"), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	seg := newFileSegment(f)
	defer seg.Close()
	want := bytes.Repeat([]byte("journal"), 1000)
	if err := seg.AppendV([][]byte{want[:10], want[10:]}); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := seg.Sync(); err != nil {
			t.Fatalf("sync: %v", err)
		}
	}
	if seg.rs.ring == nil {
		t.Fatal("Sync did not use io_uring (kernel without it, or io_uring forbidden: kernel.io_uring_disabled, seccomp)")
	}
	// The appends were O_DIRECT: the last block is padded with zeroes
	// until the segment is closed.
	if got, err := os.ReadFile(f.Name()); err != nil || len(got) < len(want) || !bytes.Equal(got[:len(want)], want) || !allZero(got[len(want):]) {
		t.Fatalf("file holds %d bytes (%v), want %d and zero padding", len(got), err, len(want))
	}
	// The fsync's own error comes back (a bad descriptor: EBADF), from
	// the ring and from the fallback.
	if err := seg.rs.datasync(-1); !errors.Is(err, unix.EBADF) {
		t.Errorf("ring: fdatasync of a bad descriptor: %v, want EBADF", err)
	}
	fallback := &ringSync{tried: true}
	if err := fallback.datasync(-1); !errors.Is(err, unix.EBADF) {
		t.Errorf("fallback: fdatasync of a bad descriptor: %v, want EBADF", err)
	}
	if err := fallback.datasync(int(f.Fd())); err != nil {
		t.Errorf("fallback: %v", err)
	}
	// Closing the segment releases the ring; a second close of the
	// sync is harmless.
	if err := seg.Close(); err != nil {
		t.Fatal(err)
	}
	if seg.rs.ring != nil {
		t.Error("the ring outlived its segment")
	}
	seg.rs.close()
	if got, err := os.ReadFile(f.Name()); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("closed: file holds %d bytes (%v), want %d (the padding cut)", len(got), err, len(want))
	}
}

// TestDirectAppend: a segment appends with O_DIRECT (on the file systems
// CI uses), and what it appends, in pieces of any size and across a
// reopen that finds a partial last block, reads back exactly as buffered
// appends would have written it; the ring's write returns the error of
// pwrite(2), as the fallback does.
func TestDirectAppend(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seg")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	seg := newFileSegment(f)
	var model []byte
	rng := rand.New(rand.NewPCG(1, 2))
	appendSome := func(seg fileSegment, k int) {
		t.Helper()
		for range k {
			var bufs [][]byte
			for range 1 + rng.IntN(4) {
				b := make([]byte, rng.IntN(3*directAlign))
				for i := range b {
					b[i] = byte(rng.Uint32())
				}
				bufs = append(bufs, b)
				model = append(model, b...)
			}
			if err := seg.AppendV(bufs); err != nil {
				t.Fatal(err)
			}
			if size, err := seg.Size(); err != nil || size != int64(len(model)) {
				t.Fatalf("Size %d (%v), want %d", size, err, len(model))
			}
			// Bytes appended read back at once, through the page cache.
			got := make([]byte, len(model))
			if _, err := seg.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
				t.Fatalf("after %d bytes: read back differs (%v)", len(model), err)
			}
		}
	}
	appendSome(seg, 20)
	if d := *seg.d; d == nil || d.fd < 0 {
		t.Fatalf("segment in %s did not append with O_DIRECT (a file system without it: run the tests on ext4 or xfs)", path)
	}
	if err := seg.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := seg.Close(); err != nil {
		t.Fatal(err)
	}
	if len(model)%directAlign == 0 {
		t.Fatal("the test wants a partial last block to reopen")
	}
	f, err = os.OpenFile(path, os.O_RDWR|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	seg = newFileSegment(f)
	appendSome(seg, 20)
	if err := seg.Close(); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("file holds %d bytes (%v), want the %d appended", len(got), err, len(model))
	}

	// pwrite's errors, from the ring and from the fallback: a
	// descriptor opened read-only (EBADF).
	ro, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	var rs ringSync
	defer rs.close()
	fallback := &ringSync{tried: true}
	for _, s := range []*ringSync{&rs, fallback} {
		if _, err := s.pwrite(int(ro.Fd()), []byte("x"), 0); !errors.Is(err, unix.EBADF) {
			t.Errorf("pwrite to a read-only descriptor: %v, want EBADF", err)
		}
	}
	if rs.ring == nil {
		t.Error("pwrite did not use io_uring")
	}
}

// TestBufferedFallback: where the file cannot be opened with O_DIRECT
// (tmpfs before Linux 6.6 refuses it; here, a file already unlinked) a
// segment appends through the page cache, exactly, with no padding.
func TestBufferedFallback(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seg")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil { // openDirect's open fails
		t.Fatal(err)
	}
	seg := newFileSegment(f)
	defer seg.Close()
	want := bytes.Repeat([]byte("journal"), 1000)
	if err := seg.AppendV([][]byte{want[:10], want[10:]}); err != nil {
		t.Fatal(err)
	}
	if d := *seg.d; d == nil || d.fd >= 0 {
		t.Fatal("the segment appended with O_DIRECT, want buffered")
	}
	if err := seg.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*len(want))
	n, err := seg.ReadAt(got, 0)
	if !errors.Is(err, io.EOF) || !bytes.Equal(got[:n], want) {
		t.Fatalf("segment holds %d bytes (%v), want %d", n, err, len(want))
	}
	if size, err := seg.Size(); err != nil || size != int64(len(want)) {
		t.Fatalf("Size %d (%v), want %d", size, err, len(want))
	}
}
