package journal

import (
	"bytes"
	"errors"
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
	if got, err := os.ReadFile(f.Name()); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("file holds %d bytes (%v), want %d", len(got), err, len(want))
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
}
