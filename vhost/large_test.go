package vhost

import (
	"bytes"
	"math/rand/v2"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// TestLargeReadWrite reads and writes a file-backed linear device in
// 1 MiB requests, eight in flight, the guest's largest default request:
// reads the page cache holds (io_uring's io-wq threads copy them), reads
// it does not (the clean pages dropped with posix_fadvise: read from the
// disk), and writes
// (the engine's lane) must all return the file's data, and what was
// written must read back through the export and from the file.
func TestLargeReadWrite(t *testing.T) { forEachLayout(t, testLargeReadWrite) }

func testLargeReadWrite(t *testing.T, packed bool) {
	const size, bs, qd = 32 << 20, 1 << 20, 8
	env := newTestEnv(t, size, ExportConfig{Writable: true})
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(env.backing, want, 0o600); err != nil {
		t.Fatal(err)
	}
	c := env.dial(t, frontend.Config{NumQueues: 1, QueueSize: 128, Indirect: true, Packed: packed})
	bufs := make([][]byte, qd)
	for i := range bufs {
		var err error
		if bufs[i], err = c.Buf(bs); err != nil {
			t.Fatal(err)
		}
	}
	// run sends every 1 MiB block of the device once, qd at a time, and
	// checks reads against want.
	run := func(what string, typ uint32) {
		t.Helper()
		results := make(chan frontend.Result, qd)
		for base := 0; base < size; base += qd * bs {
			for i := range qd {
				off := base + i*bs
				if typ == virtio.BlkTypeOut {
					copy(bufs[i], want[off:off+bs])
				} else {
					clear(bufs[i])
				}
				err := c.Submit(0, &frontend.BlkRequest{Type: typ, Sector: uint64(off / 512), Data: [][]byte{bufs[i]}}, func(r frontend.Result) { results <- r })
				if err != nil {
					t.Fatal(err)
				}
			}
			for range qd {
				if r := <-results; r.Err != nil || r.Status != virtio.BlkStatusOK {
					t.Fatalf("%s at %d: %+v", what, base, r)
				}
			}
			if typ != virtio.BlkTypeIn {
				continue
			}
			for i := range qd {
				off := base + i*bs
				if !bytes.Equal(bufs[i], want[off:off+bs]) {
					t.Fatalf("%s: block at %d differs from the file", what, off)
				}
			}
		}
	}
	dropCache := func() {
		t.Helper()
		f, err := os.Open(env.backing)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
	}
	run("cached read", virtio.BlkTypeIn)
	dropCache()
	run("uncached read", virtio.BlkTypeIn)
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	run("write", virtio.BlkTypeOut)
	run("read after write", virtio.BlkTypeIn)
	dropCache()
	run("uncached read after write", virtio.BlkTypeIn)
	got, err := os.ReadFile(env.backing)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the file differs from what was written")
	}
}

// BenchmarkExport1M reads and writes 1 MiB blocks sequentially at queue
// depth 8 through a real socket and eventfds from an export of a linear
// device over a page-cached file (scripts/bench-vs-qsd.sh rows 4r and
// 4w). cpu-ns/op is the CPU time of the whole process (back end and
// client) per request, the figure to compare on a shared machine.
func BenchmarkExport1M(b *testing.B) {
	for _, op := range []string{"read", "write"} {
		b.Run(op, func(b *testing.B) {
			typ := uint32(virtio.BlkTypeIn)
			if op == "write" {
				typ = virtio.BlkTypeOut
			}
			benchExport(b, typ, 1<<20, 8, 64<<20)
		})
	}
}

// benchExport runs b.N requests of typ and bs bytes, qd in flight, over
// the blocks of a linear device of size bytes over a file in the page
// cache.
func benchExport(b *testing.B, typ uint32, bs, qd int, size int64) {
	env := newTestEnv(b, size, ExportConfig{Writable: true})
	if err := os.WriteFile(env.backing, make([]byte, size), 0o600); err != nil {
		b.Fatal(err)
	}
	c := env.dial(b, frontend.Config{NumQueues: 1, QueueSize: 128, Indirect: true})
	bufs := make([][]byte, qd)
	for i := range bufs {
		var err error
		if bufs[i], err = c.Buf(bs); err != nil {
			b.Fatal(err)
		}
	}
	blocks := int(size) / bs
	b.SetBytes(int64(bs))
	driveClosedLoop(b, c, qd, func(slot, k int) (int, *frontend.BlkRequest) {
		return 0, &frontend.BlkRequest{Type: typ, Sector: uint64(k % blocks * bs / 512), Data: [][]byte{bufs[slot]}}
	})
}
