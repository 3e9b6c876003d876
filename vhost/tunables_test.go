package vhost

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// TestExportTunables runs a deep mixed workload (writes, flushes, reads
// checked against what was written) by default (reads and writes run on
// the ring goroutine when they do not block, no polling) and with polling
// (export.poll-us, export.adaptive-poll). Results must not depend on it.
func TestExportTunables(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  ExportConfig
	}{
		{"default", ExportConfig{}},
		{"poll", ExportConfig{Poll: 20 * time.Microsecond}},
		{"poll-short", ExportConfig{Poll: 5 * time.Microsecond}},
		{"no-adaptive-poll", ExportConfig{NoAdaptivePoll: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forEachLayout(t, func(t *testing.T, packed bool) {
				cfg := tc.cfg
				cfg.Writable, cfg.NumQueues = true, 2
				env := newTestEnv(t, 16<<20, cfg)
				c := env.dial(t, frontend.Config{NumQueues: 2, QueueSize: 128, Indirect: true, Packed: packed})
				ctx := testCtx(t)
				const perQueue = 300
				var wg sync.WaitGroup
				var mu sync.Mutex
				var failures []string
				submit := func(q int, r *frontend.BlkRequest, buf []byte) {
					wg.Add(1)
					for {
						err := c.Submit(q, r, func(res frontend.Result) {
							if res.Status != virtio.BlkStatusOK || res.Err != nil {
								mu.Lock()
								failures = append(failures, fmt.Sprintf("type %d sector %d: %+v", r.Type, r.Sector, res))
								mu.Unlock()
							}
							if buf != nil {
								c.FreeBuf(buf)
							}
							wg.Done()
						})
						if !errors.Is(err, frontend.ErrRingFull) {
							if err != nil {
								t.Fatal(err)
							}
							return
						}
						time.Sleep(50 * time.Microsecond)
					}
				}
				for k := range perQueue {
					for q := range 2 {
						sector := uint64((q*perQueue + k) * 32)
						n := 4096 << (k % 3) // 4, 8 and 16 KiB
						buf, err := c.Buf(n)
						if err != nil {
							t.Fatal(err)
						}
						copy(buf, pattern(sector, n))
						submit(q, &frontend.BlkRequest{Type: virtio.BlkTypeOut, Sector: sector, Data: [][]byte{buf}}, buf)
						if k%50 == 49 {
							submit(q, &frontend.BlkRequest{Type: virtio.BlkTypeFlush}, nil)
						}
					}
				}
				wg.Wait()
				if len(failures) > 0 {
					t.Fatal(failures)
				}
				for k := range perQueue {
					q := k % 2
					sector := uint64((q*perQueue + k) * 32)
					n := 4096 << (k % 3)
					got := make([]byte, n)
					if err := c.ReadAt(ctx, q, got, sector); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, pattern(sector, n)) {
						t.Fatalf("sector %d differs", sector)
					}
				}
				if c.Strays() != 0 {
					t.Fatalf("%d stray used elements", c.Strays())
				}
			})
		})
	}
}
