package repagent

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// BenchmarkMirror measures 64 KiB writes through an attached volume,
// unprotected and protected (asynchronous mirroring to a loopback hub,
// drained before the timer stops).
func BenchmarkMirror(b *testing.B) {
	for _, protect := range []bool{false, true} {
		b.Run(fmt.Sprintf("protect=%v", protect), func(b *testing.B) {
			r := newRig(b)
			r.startHub()
			v := r.addVolume("root", 64<<20)
			r.startAgent(map[*rigVol]VolumeOptions{v: {Protect: protect}})
			if protect {
				r.waitProtected(60*time.Second, v)
			}
			data := pattern(1, 64<<10)
			b.SetBytes(int64(len(data)))
			i := uint64(0)
			for b.Loop() {
				sector := (i * 128) % uint64(v.size/512)
				i++
				if err := v.wrapped.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: sector, Sectors: 128, Data: [][]byte{data}}); err != nil {
					b.Fatal(err)
				}
				if protect && i%256 == 0 {
					// Keep the queue from overflowing into the dirty
					// map: measure the mirror, not the bitmap.
					for r.agent.Status().Volumes[0].BacklogBytes > 32<<20 {
						time.Sleep(time.Millisecond)
					}
				}
			}
			if protect {
				r.waitProtected(60*time.Second, v)
				b.ReportMetric(float64(r.agent.Status().Volumes[0].Stats.Dirtied), "dirtied")
			}
		})
	}
}

// BenchmarkInitialSync measures the initial sync of a 64 MiB volume of
// random data over loopback (remote reads of 1 MiB, 4 outstanding).
func BenchmarkInitialSync(b *testing.B) {
	for b.Loop() {
		b.StopTimer()
		r := newRig(b)
		r.startHub()
		v := r.addVolume("root", 64<<20)
		os.WriteFile(v.backing, pattern(3, int(v.size)), 0o600)
		b.SetBytes(v.size)
		b.StartTimer()
		r.startAgent(map[*rigVol]VolumeOptions{v: {Protect: true}})
		r.waitProtected(120*time.Second, v)
	}
}
