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

// BenchmarkMirror measures 64 KiB writes through an attached volume,
// unprotected and protected (asynchronous mirroring to a loopback hub,
// drained before the timer stops).
func BenchmarkMirror(b *testing.B) {
	for _, protect := range []bool{false, true} {
		b.Run(fmt.Sprintf("protect=%v", protect), func(b *testing.B) {
			r := reptest.New(b)
			r.StartHub()
			v := r.AddVolume("root", 64<<20)
			r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{v: {Protect: protect}})
			if protect {
				r.WaitProtected(60*time.Second, v)
			}
			data := reptest.Pattern(1, 64<<10)
			b.SetBytes(int64(len(data)))
			i := uint64(0)
			for b.Loop() {
				sector := (i * 128) % uint64(v.Size/512)
				i++
				if err := v.Wrapped.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: sector, Sectors: 128, Data: [][]byte{data}}); err != nil {
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
