package thin_test

import (
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// poolField returns field i of the pool's INFO line.
func (e *env) poolField(i int) string {
	return strings.Fields(e.pool.Status(mapper.StatusInfo, false)[0].Params)[i]
}

// TestMetadataGrow grows a pool's metadata device from 1 MiB (256
// blocks) to 80 MiB (20480 blocks, a second space map bitmap) with a
// reload, as the kernel's pool preresume does: the status shows the new
// total, I/O and snapshots go on, the metadata passes thin_check and
// thin_dump before and after a restart, and a reload over a device
// smaller than the metadata space map is refused.
func TestMetadataGrow(t *testing.T) {
	e := newEnv(t, 128, 512, 1<<20, "")
	rng := rand.New(rand.NewPCG(7, 7))
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	e.activate(1)
	for i := 0; i < 40; i++ {
		e.write(1, rng.Uint64N(e.virt-64), pattern(rng, 512*(1+rng.IntN(64))))
	}
	if got := e.poolField(1); !strings.HasSuffix(got, "/256") {
		t.Fatalf("metadata usage %s, want a total of 256 blocks", got)
	}
	if err := os.Truncate(e.meta, 80<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.pool.Reload(e.poolTable()); err != nil {
		t.Fatal(err)
	}
	if got := e.poolField(1); !strings.HasSuffix(got, "/20480") {
		t.Fatalf("metadata usage %s after growing, want a total of 20480 blocks", got)
	}
	if got := e.poolField(8); got != "1024" {
		t.Fatalf("metadata low water mark %s after growing, want 1024", got)
	}
	e.snapshot(2, 1)
	e.activate(2)
	for i := 0; i < 40; i++ {
		e.write(1+uint64(i%2), rng.Uint64N(e.virt-64), pattern(rng, 512*(1+rng.IntN(64))))
	}
	e.verify()
	e.stop()
	judge(t, e.meta, e.data, e.bs, e.model)
	e.start()
	defer e.m.Close()
	e.verify()
	if got := e.poolField(1); !strings.HasSuffix(got, "/20480") {
		t.Fatalf("metadata usage %s after a restart, want a total of 20480 blocks", got)
	}
	if err := os.Truncate(e.meta, 40<<20); err != nil {
		t.Fatal(err)
	}
	err := e.pool.Reload(e.poolTable())
	if err == nil || !strings.Contains(err.Error(), "metadata device (10240 blocks) too small: expected 20480") {
		t.Fatalf("reload over a shrunk metadata device: %v", err)
	}
	e.write(1, 0, pattern(rng, 4096))
	e.verify()
}
