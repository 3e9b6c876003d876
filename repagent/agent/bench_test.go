package agent_test

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// BenchmarkGuestWrite measures the guest's path through an attached
// volume (the wrapper's Submit: local write, the one copy, the ring, the
// sender) with qd writers at once, unprotected (protect=none) and
// protected: mirrored to a hub on loopback in the same process
// (protect=hub, drained before the timer stops)
// or to a sink hub (protect=sink: it acknowledges every batch at once and
// stores nothing, so the figures are the agent's own), as
// scripts/bench-replication.sh's rows: 4 KiB random writes at QD32 and
// 1 MiB sequential writes at QD8. "dirtied" counts writes that went to the
// dirty map (the hub re-reads them): 0 while the hub keeps up;
// "cpu-µs/write" is the process's CPU time per write (agent and, when
// protected, the hub), which a loaded machine distorts less than ns/op. Profile the
// agent alone with -cpuprofile and pprof -focus=repagent/agent.
func BenchmarkGuestWrite(b *testing.B) {
	for _, c := range []struct {
		name   string
		bs, qd int
		random bool
	}{
		{"4k-rand-qd32", 4 << 10, 32, true},
		{"1m-seq-qd8", 1 << 20, 8, false},
	} {
		for _, hub := range []string{"none", "sink", "hub"} {
			b.Run(fmt.Sprintf("%s/protect=%s", c.name, hub), func(b *testing.B) {
				benchGuestWrite(b, c.bs, c.qd, c.random, hub)
			})
		}
	}
}

func benchGuestWrite(b *testing.B, bs, qd int, random bool, hub string) {
	protect := hub != "none"
	r := reptest.New(b)
	r.HubCfg.Heartbeat = time.Second
	r.AgentCfg.Heartbeat = time.Second
	if hub == "sink" {
		r.Addr = sinkHub(b)
	} else {
		r.StartHub()
	}
	v := r.AddVolume("root", 64<<20)
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{v: {Protect: protect}})
	waitIdle := func() {
		switch hub {
		case "hub":
			r.WaitProtected(120*time.Second, v)
		case "sink":
			for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(time.Millisecond) {
				av := r.Agent.Status().Volumes[0]
				if av.Mirroring && av.BacklogIOs == 0 && av.DirtyRegions == 0 {
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("the sink hub did not acknowledge everything: %+v", av)
				}
			}
		}
	}
	waitIdle()
	data := reptest.Pattern(1, bs)
	n := uint64(bs / 512)
	slots := uint64(v.Size) / uint64(bs)
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	var next atomic.Uint64
	var wg sync.WaitGroup
	for range qd {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= uint64(b.N) {
					return
				}
				slot := i % slots
				if random {
					slot = (i * 2654435761) % slots
				}
				if err := v.Wrapped.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: slot * n, Sectors: n, Data: [][]byte{data}}); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	waitIdle()
	b.StopTimer()
	// The process's CPU time per write: the agent's and (protected) the
	// in-process hub's, what a loaded machine does not distort.
	b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/write")
	if protect {
		b.ReportMetric(float64(r.Agent.Status().Volumes[0].Stats.Dirtied), "dirtied")
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "writes/s")
}

// cpuTime returns the CPU time (user and system) the process used so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// sinkHub serves the hub's side of the repagent protocol as cheaply as it
// can, for the agent's benchmarks: it answers HELLO, mirrors every volume
// reported, and acknowledges what it has read whenever it has read all
// that arrived, storing nothing. It returns its address.
func sinkHub(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	go func() {
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			go sinkConn(nc)
		}
	}()
	return l.Addr().String()
}

func sinkConn(nc net.Conn) {
	defer nc.Close()
	r, w := wire.NewReader(nc, 0), wire.NewWriter(nc)
	var wmu sync.Mutex
	send := func(m wire.Message) error {
		wmu.Lock()
		defer wmu.Unlock()
		if err := w.WriteMessage(m); err != nil {
			return err
		}
		return w.Flush()
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if send(&wire.Heartbeat{}) != nil {
					return
				}
			}
		}
	}()
	var seq, acked, ids uint64
	for {
		f, err := r.ReadFrame()
		if err != nil {
			return
		}
		m, err := wire.Decode(f)
		if err != nil {
			return
		}
		switch m := m.(type) {
		case *wire.Hello:
			err = send(&wire.Hello{Reply: true, MaxVersion: m.MaxVersion, Name: "sink"})
		case *wire.ReportVolumes:
			for _, v := range m.Volumes {
				ids++
				if err = send(&wire.StartProtect{Volume: ids, Name: v.Name, Mirror: v.Protect}); err != nil {
					break
				}
			}
		case *wire.ProtectedWrite:
			seq = max(seq, m.Seq)
		case *wire.DirtyMap:
			seq = max(seq, m.Seq)
		case *wire.Checkpoint:
			seq = max(seq, m.Seq)
		case *wire.AgentShutdown:
			err = send(&wire.AgentShutdown{Reply: true})
		}
		if err != nil {
			return
		}
		if seq > acked && r.Buffered() == 0 {
			acked = seq
			if send(&wire.WriteAck{Seq: seq}) != nil {
				return
			}
		}
	}
}
