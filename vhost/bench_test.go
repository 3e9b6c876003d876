package vhost

import (
	"context"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/mapper"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// benchRing lays out a split ring of num entries in heap guest memory with a
// header, data and status descriptor chain for every third head.
func benchRing(b *testing.B, num uint16) (*Mem, *splitRing) {
	gm := make([]byte, 4<<20)
	m := NewMemFromBytes(0, gm)
	r := &splitRing{}
	if _, err := r.setup(m, num, wire.VringAddr{Desc: 0, Avail: 0x40000, Used: 0x50000}); err != nil {
		b.Fatal(err)
	}
	r.eventIdx = true
	r.indirect = true
	for h := 0; h+2 < int(num); h += 3 {
		data := uint64(0x100000 + h*4096)
		virtio.WriteDesc(r.desc[h*16:], virtio.Desc{Addr: 0x60000 + uint64(h)*16, Len: 16, Flags: virtio.DescFlagNext, Next: uint16(h + 1)})
		virtio.WriteDesc(r.desc[(h+1)*16:], virtio.Desc{Addr: data, Len: 4096, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: uint16(h + 2)})
		virtio.WriteDesc(r.desc[(h+2)*16:], virtio.Desc{Addr: 0x70000 + uint64(h), Len: 1, Flags: virtio.DescFlagWrite})
	}
	return m, r
}

// BenchmarkDescriptorChain walks and translates a header, data, status
// chain: the per-request parsing cost. It must not allocate.
func BenchmarkDescriptorChain(b *testing.B) {
	m, r := benchRing(b, 256)
	var c chain
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		head := uint16(i%85) * 3
		if err := walkChain(m, r.desc, r.num, head, true, &c); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVringPopPush makes a chain available as a driver does, pops and
// walks it, then puts it in the used ring and publishes it with the
// notification check, as the device does for each request. It must not
// allocate.
func BenchmarkVringPopPush(b *testing.B) {
	m, r := benchRing(b, 256)
	var c chain
	var availIdx uint16
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		head := uint16(i%85) * 3
		// Driver.
		le.PutUint16(r.avail[4+2*int(availIdx&(r.num-1)):], head)
		availIdx++
		virtio.StoreWord(r.avail, 0, availIdx)
		// Device.
		n, err := r.pending()
		if err != nil || n != 1 {
			b.Fatal(n, err)
		}
		h := r.availHead(r.lastAvail)
		r.lastAvail++
		if err := walkChain(m, r.desc, r.num, h, true, &c); err != nil {
			b.Fatal(err)
		}
		r.putUsed(h, 4097)
		r.publish()
		r.armKick()
	}
}

// zeroDevice is a Device that reads zeros and drops writes, without a
// mapper table: it measures the export alone.
type zeroDevice struct{}

func (zeroDevice) Submit(r *mapper.Request) error {
	if r.Op == mapper.OpRead {
		mapper.ZeroBufs(r.Data)
	}
	return nil
}
func (zeroDevice) Size() uint64                                  { return 1 << 21 }
func (zeroDevice) ReadOnly() bool                                { return false }
func (zeroDevice) OnResize(func(uint64, uint64)) (cancel func()) { return func() {} }

// nowaitZeroDevice is a zeroDevice that completes without blocking
// (NowaitDevice), as the mapper's zero and linear-on-page-cache targets
// do: its requests run to completion on the ring goroutine.
type nowaitZeroDevice struct{ zeroDevice }

func (d nowaitZeroDevice) TrySubmit(r *mapper.Request) error { return d.Submit(r) }

// BenchmarkExportRead4K reads 4 KiB at queue depth 32 through a real socket
// and eventfds from an export of a zero device: the whole data path, with
// every request handed to a worker goroutine.
func BenchmarkExportRead4K(b *testing.B) { benchExportRead4K(b, zeroDevice{}, false, 1) }

// BenchmarkExportRead4KPacked is BenchmarkExportRead4K on a packed ring.
func BenchmarkExportRead4KPacked(b *testing.B) { benchExportRead4K(b, zeroDevice{}, true, 1) }

// BenchmarkExportRead4KNowait is BenchmarkExportRead4K with requests run
// to completion on the ring goroutine (the null path of
// scripts/bench-vs-qsd.sh rows 1 and 2).
func BenchmarkExportRead4KNowait(b *testing.B) { benchExportRead4K(b, nowaitZeroDevice{}, false, 1) }

// BenchmarkExportRead4KNowait2Q is BenchmarkExportRead4KNowait on two
// queues, queue depth 32 each (row 1 of scripts/bench-vs-qsd.sh).
func BenchmarkExportRead4KNowait2Q(b *testing.B) { benchExportRead4K(b, nowaitZeroDevice{}, false, 2) }

// benchExportRead4K reads 4 KiB at queue depth 32 on each of queues
// queues. Besides ns/op and cpu-ns/op it reports the wake-ups per
// request: calls/op (call eventfd writes, each a wake-up of the client),
// kicks/op (kicks read) and parks/op (the ring goroutines' waits in the
// poller).
func benchExportRead4K(b *testing.B, dev Device, packed bool, queues int) {
	dir := b.TempDir()
	e, err := NewExport(ExportConfig{ID: "bench", Socket: dir + "/s", Writable: true, NumQueues: queues, Logger: testLogger()}, dev)
	if err != nil {
		b.Fatal(err)
	}
	go e.Serve(context.Background())
	defer e.Close()
	c, err := frontend.Dial(context.Background(), frontend.Config{Socket: dir + "/s", NumQueues: queues, QueueSize: 128, Indirect: true, Packed: packed})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	qd := 32 * queues
	bufs := make([][]byte, qd)
	for i := range bufs {
		bufs[i], _ = c.Buf(4096)
	}
	b.ReportAllocs()
	driveClosedLoop(b, c, qd, func(slot, _ int) (int, *frontend.BlkRequest) {
		return slot % queues, &frontend.BlkRequest{Type: virtio.BlkTypeIn, Sector: uint64(slot * 8), Data: [][]byte{bufs[slot]}}
	})
	e.mu.Lock()
	var calls, kicks, parks uint64
	if e.conn != nil {
		for _, q := range e.conn.dev.queues {
			calls += q.notified.Load()
			kicks += q.kicks.Load()
			parks += q.parks.Load()
		}
	}
	e.mu.Unlock()
	b.ReportMetric(float64(calls)/float64(b.N), "calls/op")
	b.ReportMetric(float64(kicks)/float64(b.N), "kicks/op")
	b.ReportMetric(float64(parks)/float64(b.N), "parks/op")
}

// driveClosedLoop keeps qd requests in flight until b.N have been
// issued, each slot issuing its next request as its last completes:
// req(slot, k) gives the k-th request (counted over all slots) and its
// queue. It resets the timer at the start and reports the process's CPU
// time (back end and client) per request as cpu-ns/op: on a shared
// machine, a steadier figure than ns/op.
func driveClosedLoop(b *testing.B, c *frontend.Client, qd int, req func(slot, k int) (int, *frontend.BlkRequest)) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	left, next := b.N, 0
	var submit func(slot int)
	submit = func(slot int) {
		mu.Lock()
		if left == 0 {
			mu.Unlock()
			wg.Done()
			return
		}
		left--
		k := next
		next++
		mu.Unlock()
		q, r := req(slot, k)
		err := c.Submit(q, r, func(r frontend.Result) {
			if r.Err != nil || r.Status != virtio.BlkStatusOK {
				b.Error("result", r)
			}
			submit(slot)
		})
		if err != nil {
			b.Error(err)
			wg.Done()
		}
	}
	b.ResetTimer()
	cpu0 := processCPU()
	for slot := range qd {
		wg.Add(1)
		submit(slot)
	}
	wg.Wait()
	b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
}

// processCPU returns the process's user and system CPU time.
func processCPU() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
