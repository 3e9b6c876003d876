package vhost

import (
	"bytes"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// TestSlowRequestDoesNotStallQueue: a request held 200 ms by a delay
// target does not hold up fast requests behind it on the same queue. The
// fast ones (a linear target over a page-cached file, served on the ring
// goroutine) complete within a few milliseconds while the slow one waits
// in a worker, and both return the right data.
func TestSlowRequestDoesNotStallQueue(t *testing.T) {
	forEachLayout(t, testSlowRequestDoesNotStallQueue)
}

func testSlowRequestDoesNotStallQueue(t *testing.T, packed bool) {
	const size = 16 << 20
	env := newTestEnv(t, size, ExportConfig{Writable: true})
	// The first MiB goes through a 200 ms delay, the rest straight to
	// the same file.
	table := fmt.Sprintf("0 2048 delay %s 0 200\n2048 %d linear %s 2048", env.backing, size/512-2048, env.backing)
	if err := env.dev.Reload(table); err != nil {
		t.Fatal(err)
	}
	c := env.dial(t, frontend.Config{NumQueues: 1, QueueSize: 128, Indirect: true, Packed: packed})
	ctx := testCtx(t)

	// Put known data in both areas and read it once so that it is in the
	// page cache.
	slowData, fastData := pattern(1, 4096), pattern(2, 4096)
	if err := c.WriteAt(ctx, 0, slowData, 8); err != nil {
		t.Fatal(err)
	}
	for i := range 16 {
		if err := c.WriteAt(ctx, 0, fastData, uint64(4096+8*i)); err != nil {
			t.Fatal(err)
		}
	}

	for _, kind := range []struct {
		name string
		typ  uint32
	}{{"read", virtio.BlkTypeIn}, {"write", virtio.BlkTypeOut}} {
		t.Run(kind.name, func(t *testing.T) {
			slowBuf, err := c.Buf(4096)
			if err != nil {
				t.Fatal(err)
			}
			defer c.FreeBuf(slowBuf)
			if kind.typ == virtio.BlkTypeOut {
				copy(slowBuf, slowData)
			}
			slowDone := make(chan frontend.Result, 1)
			slowStart := time.Now()
			if err := c.Submit(0, &frontend.BlkRequest{Type: kind.typ, Sector: 8, Data: [][]byte{slowBuf}}, func(r frontend.Result) { slowDone <- r }); err != nil {
				t.Fatal(err)
			}
			// Let the ring goroutine pop the slow request first.
			time.Sleep(5 * time.Millisecond)
			var lats []time.Duration
			for i := range 16 {
				buf, err := c.Buf(4096)
				if err != nil {
					t.Fatal(err)
				}
				if kind.typ == virtio.BlkTypeOut {
					copy(buf, fastData)
				}
				start := time.Now()
				res, err := c.Do(ctx, 0, &frontend.BlkRequest{Type: kind.typ, Sector: uint64(4096 + 8*i), Data: [][]byte{buf}})
				lat := time.Since(start)
				if err != nil || res.Status != virtio.BlkStatusOK {
					t.Fatalf("fast %s %d: %+v %v", kind.name, i, res, err)
				}
				if kind.typ == virtio.BlkTypeIn && !bytes.Equal(buf, fastData) {
					t.Fatalf("fast read %d: wrong data", i)
				}
				c.FreeBuf(buf)
				lats = append(lats, lat)
			}
			select {
			case r := <-slowDone:
				t.Fatalf("the slow %s completed after %v, before the fast ones were done (%+v)", kind.name, time.Since(slowStart), r)
			default:
			}
			sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
			t.Logf("fast %ss while a slow one waits: median %v, max %v", kind.name, lats[len(lats)/2], lats[len(lats)-1])
			// A few milliseconds; the bound leaves room for a loaded
			// machine and the race detector, and is far below 200 ms.
			if med, mx := lats[len(lats)/2], lats[len(lats)-1]; med > 5*time.Millisecond || mx > 30*time.Millisecond {
				t.Errorf("fast %ss behind a 200 ms one took median %v, max %v: want a few ms", kind.name, med, mx)
			}
			r := <-slowDone
			if d := time.Since(slowStart); r.Err != nil || r.Status != virtio.BlkStatusOK || d < 190*time.Millisecond {
				t.Fatalf("slow %s: %+v after %v, want OK after 200 ms", kind.name, r, d)
			}
			if kind.typ == virtio.BlkTypeIn && !bytes.Equal(slowBuf, slowData) {
				t.Fatal("slow read: wrong data")
			}
		})
	}
}

// TestOneNotificationPerBatch: a burst of 32 requests made available with
// one kick completes on the ring goroutine (a zero table) with one
// used-index publication and one call-eventfd write, as event-idx asks:
// the driver's used_event names the first completion it waits for.
func TestOneNotificationPerBatch(t *testing.T) { forEachLayout(t, testOneNotificationPerBatch) }

func testOneNotificationPerBatch(t *testing.T, packed bool) {
	env := newTestEnv(t, 16<<20, ExportConfig{Poll: -1})
	if err := env.dev.Reload(fmt.Sprintf("0 %d zero", (16<<20)/512)); err != nil {
		t.Fatal(err)
	}
	c := env.dial(t, frontend.Config{NumQueues: 1, QueueSize: 128, Indirect: true, Packed: packed})
	if c.Features()&virtio.FeatureEventIdx == 0 {
		t.Fatal("event-idx not negotiated")
	}
	ctx := testCtx(t)
	env.exp.mu.Lock()
	bq := env.exp.conn.dev.queues[0]
	env.exp.mu.Unlock()
	for round := range 3 {
		// The ring goroutine is asleep on the kick eventfd.
		if err := c.ReadAt(ctx, 0, make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
		before := bq.notified.Load()
		// Publish 32 requests, then kick once.
		c.HoldKicks(0)
		done := make(chan frontend.Result, 32)
		for i := range 32 {
			buf, err := c.Buf(4096)
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Submit(0, &frontend.BlkRequest{Type: virtio.BlkTypeIn, Sector: uint64(8 * i), Data: [][]byte{buf}}, func(r frontend.Result) { done <- r }); err != nil {
				t.Fatal(err)
			}
		}
		if !c.ReleaseKicks(0) {
			t.Fatal("the device did not ask for a kick")
		}
		for range 32 {
			if r := <-done; r.Err != nil || r.Status != virtio.BlkStatusOK {
				t.Fatalf("round %d: %+v", round, r)
			}
		}
		if n := bq.notified.Load() - before; n != 1 {
			t.Errorf("round %d: %d call-eventfd writes for a batch of 32, want 1", round, n)
		}
	}
}
