package agent_test

import (
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent"
)

// BenchmarkGuestWrite measures the guest's path through an attached
// volume (the wrapper's Submit: local write, the one copy, the ring, the
// sender) with qd writers at once, unprotected and protected (mirrored to
// a hub on loopback in the same process, drained before the timer stops),
// as scripts/bench-replication.sh's rows: 4 KiB random writes at QD32 and
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
		for _, protect := range []bool{false, true} {
			b.Run(fmt.Sprintf("%s/protect=%v", c.name, protect), func(b *testing.B) {
				benchGuestWrite(b, c.bs, c.qd, c.random, protect)
			})
		}
	}
}

func benchGuestWrite(b *testing.B, bs, qd int, random, protect bool) {
	r := reptest.New(b)
	r.HubCfg.Heartbeat = time.Second
	r.AgentCfg.Heartbeat = time.Second
	r.StartHub()
	v := r.AddVolume("root", 64<<20)
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{v: {Protect: protect}})
	if protect {
		r.WaitProtected(60*time.Second, v)
	}
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
	if protect {
		r.WaitProtected(120*time.Second, v)
	}
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
