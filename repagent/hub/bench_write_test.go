package hub_test

import (
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// BenchmarkHubWrite measures the hub's per-write path alone: a raw agent
// on a loopback connection streams PROTECTED_WRITE frames (4 KiB random or
// 1 MiB sequential, up to 32 MiB unacknowledged, as the agent's queue
// allows) to a hub that journals them (group commit, fdatasync) and
// acknowledges them, with the default point-in-time window (nothing
// applied during the run) and with retain 0 (the applier writes the
// replica image as the writes come). Reported besides ns/op: the hub's
// CPU time per write (the process's minus the client's threads'), the
// metric that counts on a machine whose cores the hub shares with the
// source. The paced case sends 4 KiB writes at a source's rate (32 frames
// every 800 µs, 40,000 writes a second, as a guest's writes reach the hub
// in scripts/bench-replication.sh) instead of as fast as the hub takes
// them: the hub then idles between frames and commits a few hundred
// writes at a time, and what a wake-up or a group commit costs shows.
func BenchmarkHubWrite(b *testing.B) {
	for _, retain := range []time.Duration{24 * time.Hour, 0} {
		for _, bs := range []int{4 << 10, 1 << 20} {
			b.Run(fmt.Sprintf("bs=%dk/retain=%v", bs>>10, retain), func(b *testing.B) {
				benchHubWrite(b, bs, retain, 0)
			})
		}
	}
	b.Run("bs=4k/retain=24h/paced=40k", func(b *testing.B) {
		benchHubWrite(b, 4<<10, 24*time.Hour, 40000)
	})
}

// benchHubWrite streams b.N writes of bs bytes, perSec a second (0: as
// fast as the hub acknowledges them).
func benchHubWrite(b *testing.B, bs int, retain time.Duration, perSec int) {
	const volBytes = 256 << 20
	dir := b.TempDir()
	h, addr := reptest.ServeHub(b, hub.Config{Store: filepath.Join(dir, "store"), Logger: reptest.Logger(),
		Heartbeat: time.Second, Name: "hub", Retain: retain})
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	rd := wire.NewReader(nc, 0)
	send := func(m wire.Message) {
		if _, err := nc.Write(wire.AppendFrame(nil, m)); err != nil {
			b.Fatal(err)
		}
	}
	send(&wire.Hello{MaxVersion: wire.MaxVersion, Session: 1, Name: "vm1"})
	send(&wire.ReportVolumes{Volumes: []wire.VolumeInfo{{Name: "disk", Sectors: volBytes / 512, Protect: true}}})
	// Initial sync of an all-zero source, then protecting.
	var vol uint64
	nc.SetReadDeadline(time.Now().Add(60 * time.Second))
	for {
		f, err := rd.ReadFrame()
		if err != nil {
			b.Fatal(err)
		}
		m, err := wire.Decode(f)
		if err != nil {
			b.Fatal(err)
		}
		switch m := m.(type) {
		case *wire.StartProtect:
			vol = m.Volume
			send(&wire.DirtyMap{Seq: 1, Volume: m.Volume, Initial: true, RegionSectors: 8})
		case *wire.RemoteIOReq:
			send(&wire.RemoteIORes{ID: m.ID, Volume: m.Volume, Sectors: m.Sectors, Zero: true})
		}
		if vol != 0 && h.Status()[0].Volumes[0].State == hub.StateProtecting {
			break
		}
	}
	nc.SetReadDeadline(time.Time{})

	// Frames are prepared once; only their sequence numbers change.
	const batch = 32 // frames per socket write
	data := reptest.Pattern(7, bs)
	frameLen := len(wire.AppendFrame(nil, &wire.ProtectedWrite{Seq: 1, Volume: vol, Sectors: uint32(bs / 512), Data: [][]byte{data}}))
	nb := min(batch, max(1, (1<<20)/frameLen))
	buf := make([]byte, 0, nb*frameLen)
	blocks := uint64(volBytes / bs)
	var acked atomic.Uint64
	ackErr := make(chan error, 1)
	var clientCPU atomic.Int64
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		t0 := threadCPU()
		defer func() { clientCPU.Add(int64(threadCPU() - t0)) }()
		for {
			f, err := rd.ReadFrame()
			if err != nil {
				ackErr <- err
				return
			}
			if f.Cmd == wire.CmdWriteAck {
				acked.Store(f.Seq)
			}
		}
	}()
	window := uint64(max(1, (32<<20)/bs))
	seq := uint64(1)
	rng := uint64(0x9e3779b97f4a7c15)
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	done := make(chan struct{})
	start := processCPU()
	ru0 := rusage()
	b.ResetTimer()
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		t0 := threadCPU()
		defer func() { clientCPU.Add(int64(threadCPU() - t0)) }()
		n := uint64(b.N)
		i := uint64(0)
		began := time.Now()
		for i < n {
			k := min(uint64(nb), n-i)
			for seq+k-1 > acked.Load()+window {
				time.Sleep(50 * time.Microsecond)
			}
			if perSec > 0 {
				if d := time.Duration(i) * time.Second / time.Duration(perSec); time.Since(began) < d {
					time.Sleep(d - time.Since(began))
				}
			}
			buf = buf[:0]
			for range k {
				seq++
				var blk uint64
				if bs >= 64<<10 {
					blk = i % blocks
				} else {
					rng ^= rng << 13
					rng ^= rng >> 7
					rng ^= rng << 17
					blk = rng % blocks
				}
				i++
				buf = wire.AppendFrame(buf, &wire.ProtectedWrite{Seq: seq, Volume: vol, Sector: blk * uint64(bs/512),
					Sectors: uint32(bs / 512), Data: [][]byte{data}})
			}
			if _, err := nc.Write(buf); err != nil {
				b.Error(err)
				return
			}
		}
	}()
	<-done
	for acked.Load() < seq {
		select {
		case err := <-ackErr:
			b.Fatalf("after ack %d of %d: %v", acked.Load(), seq, err)
		default:
			time.Sleep(100 * time.Microsecond)
		}
	}
	b.StopTimer()
	total := processCPU() - start
	ru1 := rusage()
	nc.Close()
	<-ackErr
	hubCPU := total - time.Duration(clientCPU.Load())
	b.ReportMetric(float64(hubCPU.Microseconds())/float64(b.N), "hub-cpu-µs/write")
	b.ReportMetric(float64(time.Duration(clientCPU.Load()).Microseconds())/float64(b.N), "client-cpu-µs/write")
	// Counts, less at the mercy of a shared machine than CPU time: page
	// faults (fresh memory) and context switches per write, the
	// client's included.
	b.ReportMetric(float64(ru1.Minflt-ru0.Minflt)/float64(b.N), "faults/write")
	b.ReportMetric(float64(ru1.Nvcsw+ru1.Nivcsw-ru0.Nvcsw-ru0.Nivcsw)/float64(b.N), "switches/write")
	if j := h.Status()[0].Journal; j != nil && j.Commits > 0 {
		b.ReportMetric(float64(j.Records)/float64(j.Commits), "records/commit")
	}
}

// processCPU returns the process's user plus system CPU time.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// rusage returns the process's resource usage.
func rusage() syscall.Rusage {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru
}

// threadCPU returns the calling OS thread's user plus system CPU time.
func threadCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
