package thin_test

import (
	"fmt"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// BenchmarkProvision measures first writes to unmapped blocks (one 4 KiB
// write provisions a 64 KiB block: metadata insert plus zeroing), with a
// flush (metadata commit) every 64 writes.
func BenchmarkProvision(b *testing.B) {
	e := newEnv(b, 128, 1<<16, 64<<20, "")
	e.virt = 128 << 16
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	d := e.activate(1)
	buf := make([]byte, 4096)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		vb := uint64(i) % (1 << 16)
		if i > 0 && vb == 0 {
			b.StopTimer()
			e.mustMsg("delete", "1")
			b.StartTimer()
		}
		if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: vb * 128, Sectors: 8, Data: [][]byte{buf}}); err != nil {
			b.Fatal(err)
		}
		if i%64 == 63 {
			if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "provisions/s")
}

// BenchmarkSnapshot measures create_snap (each commits) of a device with
// 4096 mapped blocks, then a first write to the origin (breaking sharing).
func BenchmarkSnapshot(b *testing.B) {
	e := newEnv(b, 128, 1<<14, 64<<20, " 1 skip_block_zeroing")
	e.mustMsg("create_thin", "1")
	e.virt = 128 * 4096
	d := e.activate(1)
	buf := make([]byte, 4096)
	for vb := uint64(0); vb < 4096; vb++ {
		if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: vb * 128, Sectors: 8, Data: [][]byte{buf}}); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		id := fmt.Sprint(i%1000 + 2)
		if i >= 1000 {
			e.mustMsg("delete", id)
		}
		e.mustMsg("create_snap", id, "1")
		if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: uint64(i%4096) * 128, Sectors: 8, Data: [][]byte{buf}}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "snapshots/s")
}
