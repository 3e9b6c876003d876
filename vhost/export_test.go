package vhost

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// TestExportRequests drives every request type through a real socket on 1
// and 4 queues, direct and indirect chains, one and two memory regions.
func TestExportRequests(t *testing.T) {
	for _, tc := range []struct {
		name string
		cc   frontend.Config
	}{
		{"1q", frontend.Config{NumQueues: 1}},
		{"4q-indirect-2regions", frontend.Config{NumQueues: 4, Indirect: true, Regions: 2}},
		{"1q-memtable-noeventidx", frontend.Config{NumQueues: 1, MemTable: true, NoEventIdx: true, QueueSize: 64}},
		{"packed-1q-size100", frontend.Config{NumQueues: 1, Packed: true, QueueSize: 100}},
		{"packed-4q-indirect-2regions", frontend.Config{NumQueues: 4, Packed: true, Indirect: true, Regions: 2}},
		{"packed-1q-memtable-noeventidx", frontend.Config{NumQueues: 1, Packed: true, MemTable: true, NoEventIdx: true, QueueSize: 64}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 16 << 20
			env := newTestEnv(t, size, ExportConfig{Writable: true, NumQueues: 4, Serial: "serial-0123"})
			c := env.dial(t, tc.cc)
			if c.Packed() != tc.cc.Packed {
				t.Fatalf("packed ring negotiated: %v, want %v", c.Packed(), tc.cc.Packed)
			}
			ctx := testCtx(t)
			cfg := c.Config()
			if cfg.Capacity != size/512 || cfg.BlkSize != 512 || cfg.NumQueues != 4 || cfg.SegMax != blkSegMax {
				t.Fatalf("config %+v", cfg)
			}
			if !env.exp.Connected() {
				t.Fatal("export does not report the connection")
			}
			// Writes on every queue, concurrently, then read back on another.
			var wg sync.WaitGroup
			errs := make(chan error, 64)
			for q := range c.NumQueues() {
				for k := range 8 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						sector := uint64((q*8 + k) * 16)
						if err := c.WriteAt(ctx, q, pattern(sector, 8192), sector); err != nil {
							errs <- fmt.Errorf("write q%d sector %d: %w", q, sector, err)
						}
					}()
				}
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if err := c.Flush(ctx, 0); err != nil {
				t.Fatal(err)
			}
			file, err := os.ReadFile(env.backing)
			if err != nil {
				t.Fatal(err)
			}
			for q := range c.NumQueues() {
				for k := range 8 {
					sector := uint64((q*8 + k) * 16)
					want := pattern(sector, 8192)
					got := make([]byte, 8192)
					if err := c.ReadAt(ctx, (q+1)%c.NumQueues(), got, sector); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, want) {
						t.Fatalf("sector %d: read back differs", sector)
					}
					if !bytes.Equal(file[sector*512:sector*512+8192], want) {
						t.Fatalf("sector %d: backing file differs", sector)
					}
				}
			}
			// A read split across several guest buffers.
			b1, _ := c.Buf(4096)
			b2, _ := c.Buf(512)
			b3, _ := c.Buf(3584)
			res, err := c.Do(ctx, 0, &frontend.BlkRequest{Type: virtio.BlkTypeIn, Sector: 16, Data: [][]byte{b1, b2, b3}})
			if err != nil || res.Status != virtio.BlkStatusOK || res.Len != 8193 {
				t.Fatalf("split read: %+v %v", res, err)
			}
			if got := append(append(append([]byte{}, b1...), b2...), b3...); !bytes.Equal(got, pattern(16, 8192)) {
				t.Fatal("split read differs")
			}
			// Discard and write-zeroes read back zeros.
			zero := make([]byte, 8192)
			if err := c.Discard(ctx, 0, 0, 16); err != nil {
				t.Fatal(err)
			}
			if err := c.WriteZeroes(ctx, 0, 16, 16, false); err != nil {
				t.Fatal(err)
			}
			if err := c.WriteZeroes(ctx, 0, 32, 16, true); err != nil {
				t.Fatal(err)
			}
			for _, s := range []uint64{0, 16, 32} {
				got := make([]byte, 8192)
				if err := c.ReadAt(ctx, 0, got, s); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, zero) {
					t.Fatalf("sector %d: not zero after discard/write-zeroes", s)
				}
			}
			// Discard with the unmap flag is UNSUPP (virtio 1.x 5.2.6.2).
			res, err = c.Do(ctx, 0, &frontend.BlkRequest{Type: virtio.BlkTypeDiscard, Ranges: []frontend.Range{{Sector: 0, Sectors: 8, Flags: virtio.BlkDiscardUnmap}}})
			if err != nil || res.Status != virtio.BlkStatusUnsupp {
				t.Fatalf("discard with unmap: %+v %v", res, err)
			}
			id, err := c.GetID(ctx, c.NumQueues()-1)
			if err != nil || id != "serial-0123" {
				t.Fatalf("GET_ID = %q, %v", id, err)
			}
			// Unknown request types are UNSUPP.
			res, err = c.Do(ctx, 0, &frontend.BlkRequest{Type: virtio.BlkTypeGetLifetime})
			if err != nil || res.Status != virtio.BlkStatusUnsupp {
				t.Fatalf("GET_LIFETIME: %+v %v", res, err)
			}
			// Out of range and misaligned requests fail alone.
			var se *frontend.StatusError
			if err := c.ReadAt(ctx, 0, make([]byte, 4096), size/512-4); !errors.As(err, &se) || se.Status != virtio.BlkStatusIOErr {
				t.Fatalf("read beyond capacity: %v", err)
			}
			if err := c.WriteAt(ctx, 0, make([]byte, 100), 0); !errors.As(err, &se) || se.Status != virtio.BlkStatusIOErr {
				t.Fatalf("write of 100 bytes: %v", err)
			}
			if err := c.ReadAt(ctx, 0, make([]byte, 4096), 0); err != nil {
				t.Fatalf("export stopped serving: %v", err)
			}
		})
	}
}

// TestExportQueueDepth keeps many requests in flight on every queue and
// checks that each completes exactly once with the right data.
func TestExportQueueDepth(t *testing.T) { forEachLayout(t, testExportQueueDepth) }

func testExportQueueDepth(t *testing.T, packed bool) {
	env := newTestEnv(t, 64<<20, ExportConfig{Writable: true, NumQueues: 4})
	c := env.dial(t, frontend.Config{NumQueues: 4, QueueSize: 256, Indirect: true, Packed: packed})
	ctx := testCtx(t)
	const perQueue = 200
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	for q := range 4 {
		for k := range perQueue {
			sector := uint64((q*perQueue + k) * 8)
			buf, err := c.Buf(4096)
			if err != nil {
				t.Fatal(err)
			}
			copy(buf, pattern(sector, 4096))
			wg.Add(1)
			for {
				err = c.Submit(q, &frontend.BlkRequest{Type: virtio.BlkTypeOut, Sector: sector, Data: [][]byte{buf}}, func(r frontend.Result) {
					if r.Status != virtio.BlkStatusOK || r.Err != nil {
						mu.Lock()
						failures = append(failures, fmt.Sprintf("sector %d: %+v", sector, r))
						mu.Unlock()
					}
					c.FreeBuf(buf)
					wg.Done()
				})
				if !errors.Is(err, frontend.ErrRingFull) {
					break
				}
				time.Sleep(100 * time.Microsecond)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatal(failures)
	}
	for q := range 4 {
		for k := 0; k < perQueue; k += 37 {
			sector := uint64((q*perQueue + k) * 8)
			got := make([]byte, 4096)
			if err := c.ReadAt(ctx, q, got, sector); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, pattern(sector, 4096)) {
				t.Fatalf("sector %d differs", sector)
			}
		}
	}
	if c.Strays() != 0 {
		t.Fatalf("%d stray used elements", c.Strays())
	}
}

// TestExportReadOnly checks that a read-only export advertises RO and
// refuses writes, discards and write-zeroes with IOERR.
func TestExportReadOnly(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: false})
	c := env.dial(t, frontend.Config{})
	ctx := testCtx(t)
	if c.Features()&virtio.BlkFeatureRO == 0 {
		t.Fatal("read-only export does not offer VIRTIO_BLK_F_RO")
	}
	var se *frontend.StatusError
	if err := c.WriteAt(ctx, 0, make([]byte, 512), 0); !errors.As(err, &se) || se.Status != virtio.BlkStatusIOErr {
		t.Fatalf("write: %v", err)
	}
	if err := c.Discard(ctx, 0, 0, 8); !errors.As(err, &se) || se.Status != virtio.BlkStatusIOErr {
		t.Fatalf("discard: %v", err)
	}
	if err := c.WriteZeroes(ctx, 0, 0, 8, false); !errors.As(err, &se) || se.Status != virtio.BlkStatusIOErr {
		t.Fatalf("write-zeroes: %v", err)
	}
	if err := c.ReadAt(ctx, 0, make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(ctx, 0); err != nil {
		t.Fatal(err)
	}
}

// TestExportBlockSize4K checks the 4096-byte logical block size: config and
// alignment checks.
func TestExportBlockSize4K(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true, LogicalBlockSize: 4096})
	c := env.dial(t, frontend.Config{})
	ctx := testCtx(t)
	cfg := c.Config()
	if cfg.BlkSize != 4096 || cfg.DiscardSectorAlign != 8 {
		t.Fatalf("config %+v", cfg)
	}
	var se *frontend.StatusError
	if err := c.WriteAt(ctx, 0, make([]byte, 512), 0); !errors.As(err, &se) {
		t.Fatalf("512-byte write on a 4K export: %v", err)
	}
	if err := c.WriteAt(ctx, 0, make([]byte, 4096), 1); !errors.As(err, &se) {
		t.Fatalf("misaligned write on a 4K export: %v", err)
	}
	if err := c.WriteAt(ctx, 0, pattern(1, 4096), 8); err != nil {
		t.Fatal(err)
	}
}

// TestExportConfigValidation checks NewExport's errors.
func TestExportConfigValidation(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	dir := t.TempDir()
	for _, tc := range []struct {
		cfg  ExportConfig
		want string
	}{
		{ExportConfig{Socket: dir + "/a"}, "needs an id or a serial"},
		{ExportConfig{ID: "x"}, "no socket path"},
		{ExportConfig{ID: "x", Socket: dir + "/b", NumQueues: 65}, "num-queues 65"},
		{ExportConfig{ID: "x", Socket: dir + "/c", LogicalBlockSize: 1000}, "logical-block-size 1000"},
		{ExportConfig{ID: "x", Socket: dir + "/d", LogicalBlockSize: 4 << 20}, "logical-block-size"},
		{ExportConfig{ID: "x", Socket: dir + "/e", Serial: "123456789012345678901"}, "longer than 20"},
	} {
		_, err := NewExport(tc.cfg, env.dev)
		if err == nil || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
			t.Errorf("%+v: error %v, want %q", tc.cfg, err, tc.want)
		}
	}
	// A regular file in the socket's place is not removed.
	if err := os.WriteFile(dir+"/file", nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewExport(ExportConfig{ID: "x", Socket: dir + "/file"}, env.dev); err == nil {
		t.Error("NewExport replaced a regular file")
	}
	// A stale socket is replaced; the socket is mode 0600.
	e, err := NewExport(ExportConfig{ID: "y", Socket: dir + "/s"}, env.dev)
	if err != nil {
		t.Fatal(err)
	}
	e.ln.SetUnlinkOnClose(false)
	e.Close()
	e2, err := NewExport(ExportConfig{ID: "y", Socket: dir + "/s"}, env.dev)
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	defer e2.Close()
	st, err := os.Stat(dir + "/s")
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v", st.Mode(), err)
	}
	if got := e2.Config(); got.Serial != "y" || got.NumQueues != 1 || got.LogicalBlockSize != 512 {
		t.Fatalf("defaults: %+v", got)
	}
}

// TestExportReconnect checks that the export accepts a new front end after
// one goes away, and that GET_VRING_BASE returns after requests complete.
func TestExportReconnect(t *testing.T) { forEachLayout(t, testExportReconnect) }

func testExportReconnect(t *testing.T, packed bool) {
	var events []string
	var mu sync.Mutex
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true, NumQueues: 2,
		OnConnect:    func() { mu.Lock(); events = append(events, "connect"); mu.Unlock() },
		OnDisconnect: func() { mu.Lock(); events = append(events, "disconnect"); mu.Unlock() },
	})
	ctx := testCtx(t)
	c := env.dial(t, frontend.Config{NumQueues: 2, Packed: packed})
	if err := c.WriteAt(ctx, 1, pattern(7, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := c.Reconnect(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := c.ReadAt(ctx, 1, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pattern(7, 4096)) {
		t.Fatal("data lost across reconnect")
	}
	c.Close()
	c2 := env.dial(t, frontend.Config{NumQueues: 1, Packed: packed})
	if err := c2.ReadAt(ctx, 0, got, 0); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	deadline := time.Now().Add(5 * time.Second)
	for env.exp.Connected() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(events) < 4 || events[0] != "connect" || events[1] != "disconnect" {
		t.Fatalf("events %v", events)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var _ = context.Background
