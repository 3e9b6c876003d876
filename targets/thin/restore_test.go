package thin_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// blockPattern is the content the restore test puts in data block b.
func blockPattern(b uint64, n int) []byte {
	return pattern(rand.New(rand.NewPCG(b, 77)), n)
}

// TestRestore is the reverse judge: metadata written by thin_restore from
// XML (a snapshot sharing blocks with its origin, a device large enough
// for a multi-level mapping tree, a held-free pool) is served by vhostdm
// exactly as the XML says; writes then break sharing and the result still
// passes thin_check.
func TestRestore(t *testing.T) {
	const bs, nrBlocks = 128, 2048
	var x strings.Builder
	fmt.Fprintf(&x, `<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="%d" nr_data_blocks="%d">`+"\n", bs, nrBlocks)
	m := &model{transID: 3, devs: map[uint64]map[uint64][]byte{1: {}, 7: {}, 3: {}}}
	bb := bs * 512
	add := func(dev, vb, pb uint64) { m.devs[dev][vb] = blockPattern(pb, bb) }
	x.WriteString(`<device dev_id="1" mapped_blocks="21" transaction="0" creation_time="0" snap_time="1">` + "\n")
	x.WriteString(`<range_mapping origin_begin="0" data_begin="10" length="20" time="0"/>` + "\n")
	x.WriteString(`<single_mapping origin_block="100" data_block="5" time="0"/>` + "\n</device>\n")
	for i := uint64(0); i < 20; i++ {
		add(1, i, 10+i)
		add(7, i, 10+i)
	}
	add(1, 100, 5)
	x.WriteString(`<device dev_id="7" mapped_blocks="21" transaction="0" creation_time="1" snap_time="1">` + "\n")
	x.WriteString(`<range_mapping origin_begin="0" data_begin="10" length="20" time="0"/>` + "\n")
	x.WriteString(`<single_mapping origin_block="200" data_block="6" time="1"/>` + "\n</device>\n")
	add(7, 200, 6)
	x.WriteString(`<device dev_id="3" mapped_blocks="600" transaction="2" creation_time="0" snap_time="0">` + "\n")
	for i := uint64(0); i < 600; i++ {
		fmt.Fprintf(&x, `<single_mapping origin_block="%d" data_block="%d" time="0"/>`+"\n", 2*i, 1000+i)
		add(3, 2*i, 1000+i)
	}
	x.WriteString("</device>\n</superblock>\n")

	e := &env{t: t, bs: bs, nrBlocks: nrBlocks, virt: 1300 * bs, model: m}
	dir := t.TempDir()
	e.meta, e.data = filepath.Join(dir, "meta.img"), filepath.Join(dir, "data.img")
	xmlPath := filepath.Join(dir, "pool.xml")
	if err := os.WriteFile(xmlPath, []byte(x.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	mkfile(t, e.meta, 4<<20)
	if out, err := exec.Command(tool(t, "thin_restore"), "-i", xmlPath, "-o", e.meta).CombinedOutput(); err != nil {
		t.Fatalf("thin_restore: %v\n%s", err, out)
	}
	f, err := os.Create(e.data)
	if err != nil {
		t.Fatal(err)
	}
	for b := uint64(0); b < nrBlocks; b++ {
		f.Write(blockPattern(b, bb))
	}
	f.Close()

	e.start()
	defer func() {
		if e.m != nil {
			e.m.Close()
		}
	}()
	e.verify()
	for id, want := range map[uint64]string{1: "2688 12927", 7: "2688 25727", 3: "76800 153471"} {
		if got := e.thins[id].Status(mapper.StatusInfo, false)[0].Params; got != want {
			t.Errorf("device %d: status %q, want %q", id, got, want)
		}
	}
	if got := e.pool.Status(mapper.StatusInfo, false)[0].Params; !strings.HasPrefix(got, "3 ") || !strings.Contains(got, " 622/2048 - rw ") {
		t.Errorf("pool status %q", got)
	}
	// Break sharing on both sides, write to the big device, delete one.
	rng := rand.New(rand.NewPCG(9, 9))
	e.write(7, 3*bs+5, pattern(rng, 4096))
	e.write(1, 4*bs, pattern(rng, bb))
	e.write(3, 1*bs, pattern(rng, 512))
	e.verify()
	e.stop()
	judge(t, e.meta, e.data, bs, m)
	e.start()
	e.remove(1)
	e.verify()
	e.stop()
	judge(t, e.meta, e.data, bs, m)
	if d := thinDump(t, e.meta); len(d.Devices) != 2 {
		t.Fatalf("after delete: %d devices", len(d.Devices))
	}
}
