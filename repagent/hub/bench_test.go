package hub_test

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
)

// BenchmarkMirror measures 4 and 64 KiB writes through an attached volume
// (the agent's submit path: local write, copy, queue, sender), unprotected
// and protected (asynchronous mirroring to a loopback hub,
// drained before the timer stops).
func BenchmarkMirror(b *testing.B) {
	for _, bs := range []int{4 << 10, 64 << 10} {
		for _, protect := range []bool{false, true} {
			benchMirror(b, bs, protect)
		}
	}
}

func benchMirror(b *testing.B, bs int, protect bool) {
	{
		b.Run(fmt.Sprintf("bs=%dk/protect=%v", bs>>10, protect), func(b *testing.B) {
			r := reptest.New(b)
			r.StartHub()
			v := r.AddVolume("root", 64<<20)
			r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{v: {Protect: protect}})
			if protect {
				r.WaitProtected(60*time.Second, v)
			}
			data := reptest.Pattern(1, bs)
			n := uint64(bs / 512)
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			i := uint64(0)
			for b.Loop() {
				sector := (i * n) % uint64(v.Size/512)
				i++
				if err := v.Wrapped.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: sector, Sectors: n, Data: [][]byte{data}}); err != nil {
					b.Fatal(err)
				}
				if protect && i%256 == 0 {
					// Keep the queue from overflowing into the dirty
					// map: measure the mirror, not the bitmap.
					for r.Agent.Status().Volumes[0].BacklogBytes > 32<<20 {
						time.Sleep(time.Millisecond)
					}
				}
			}
			if protect {
				r.WaitProtected(60*time.Second, v)
				b.ReportMetric(float64(r.Agent.Status().Volumes[0].Stats.Dirtied), "dirtied")
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "writes/s")
				if j := r.Hub.Status()[0].Journal; j != nil && j.Commits > 0 {
					b.ReportMetric(float64(j.Records)/float64(j.Commits), "records/commit")
				}
			}
		})
	}
}

// BenchmarkInitialSync measures the initial sync of a 64 MiB volume of
// random data over loopback (remote reads of 1 MiB, 4 outstanding).
func BenchmarkInitialSync(b *testing.B) {
	for b.Loop() {
		b.StopTimer()
		r := reptest.New(b)
		r.StartHub()
		v := r.AddVolume("root", 64<<20)
		os.WriteFile(v.Backing, reptest.Pattern(3, int(v.Size)), 0o600)
		b.SetBytes(v.Size)
		b.StartTimer()
		r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{v: {Protect: true}})
		r.WaitProtected(120*time.Second, v)
	}
}
