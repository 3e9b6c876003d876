package thin_test

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// md5Of returns the md5 of a whole device as vhostdm reads it.
func md5Of(t testing.TB, d *mapper.Device) string {
	t.Helper()
	buf := make([]byte, d.Size()*512)
	submit(t, d, mapper.OpRead, 0, buf)
	s := md5.Sum(buf)
	return hex.EncodeToString(s[:])
}

// TestKernelCompat proves the format both ways with Linux 6.1's dm-thin in
// one boot of the kernel oracle (test/oracle):
//
//   - K1: a pool written by vhostdm (three thin devices, a snapshot of a
//     snapshot, blocks shared and broken) is activated by the kernel;
//     every device reads back the same (md5) with the same status.
//   - K2: a pool written by the kernel (dd onto thin devices, a snapshot
//     of a live origin taken with suspend/create_snap/resume, a delete) is
//     served by vhostdm with the same content and status, and passes
//     thin_check.
func TestKernelCompat(t *testing.T) {
	oracle.Modules = append(oracle.Modules, "crc32c_generic", "dm-thin-pool")
	const bs, nrBlocks, virt = 128, 256, 8192 // pool 16 MiB, devices 4 MiB
	e := newEnv(t, bs, nrBlocks, 4<<20, "")
	rng := rand.New(rand.NewPCG(11, 11))
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	e.virt = virt
	e.activate(1)
	for i := 0; i < 30; i++ {
		e.write(1, rng.Uint64N(virt-64), pattern(rng, 512*(1+rng.IntN(64))))
	}
	e.snapshot(2, 1)
	e.activate(2)
	for i := 0; i < 10; i++ {
		e.write(1, rng.Uint64N(virt-64), pattern(rng, 4096))
		e.write(2, rng.Uint64N(virt-64), pattern(rng, 4096))
	}
	e.snapshot(4, 2)
	e.activate(4)
	e.write(4, 1000, pattern(rng, 8192))
	e.mustMsg("create_thin", "3")
	e.model.devs[3] = map[uint64][]byte{}
	e.activate(3)
	e.write(3, 0, pattern(rng, 128*512*3))
	e.discard(1, 2, 3)
	e.mustMsg("set_transaction_id", "0", "9")
	ours := map[uint64][2]string{}
	for id, d := range e.thins {
		ours[id] = [2]string{md5Of(t, d), d.Status(mapper.StatusInfo, false)[0].Params}
	}
	ourPool := fmt.Sprintf("0 %d thin-pool %s", bs*nrBlocks, e.pool.Status(mapper.StatusInfo, false)[0].Params)
	e.stop()
	thinCheck(t, e.meta)

	dir := t.TempDir()
	meta2, data2 := filepath.Join(dir, "meta2.img"), filepath.Join(dir, "data2.img")
	mkfile(t, meta2, 4<<20)
	mkfile(t, data2, bs*512*nrBlocks)
	script := fmt.Sprintf(`
mk() { dmsetup create "$@" && dmsetup mknodes; }
mk pool --table "0 %[1]d thin-pool /dev/vdb /dev/vdc %[2]d 0"
for id in 1 2 3 4; do
  mk t$id --table "0 %[3]d thin /dev/mapper/pool $id"
  echo "K1MD5_$id $(md5sum < /dev/mapper/t$id)"
  echo "K1ST_$id $(dmsetup status t$id)"
  dmsetup remove t$id
done
echo "K1POOL $(dmsetup status pool)"
dmsetup remove pool
mk pool2 --table "0 %[1]d thin-pool /dev/vdd /dev/vde %[2]d 0"
dmsetup message pool2 0 "create_thin 1"
mk u1 --table "0 %[3]d thin /dev/mapper/pool2 1"
dd if=/dev/urandom of=/dev/mapper/u1 bs=4096 seek=3 count=40 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/u1 bs=512 seek=5000 count=3 2>/dev/null
sync
dmsetup suspend u1
dmsetup message pool2 0 "create_snap 2 1"
dmsetup resume u1
mk u2 --table "0 %[3]d thin /dev/mapper/pool2 2"
dd if=/dev/urandom of=/dev/mapper/u1 bs=4096 seek=10 count=5 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/u2 bs=4096 seek=700 count=9 2>/dev/null
dmsetup message pool2 0 "create_thin 3"
mk u3 --table "0 %[3]d thin /dev/mapper/pool2 3"
dd if=/dev/urandom of=/dev/mapper/u3 bs=65536 count=4 2>/dev/null
dmsetup message pool2 0 "create_thin 5"
sync
for id in 1 2 3; do
  echo "K2MD5_$id $(md5sum < /dev/mapper/u$id)"
  echo "K2ST_$id $(dmsetup status u$id)"
done
dmsetup remove u3
dmsetup message pool2 0 "delete 3"
dmsetup message pool2 0 "set_transaction_id 0 4"
echo "K2POOL $(dmsetup status pool2)"
dmsetup remove u1
dmsetup remove u2
dmsetup remove pool2
`, bs*nrBlocks, bs, virt)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	t0 := time.Now()
	g, err := oracle.NewGuest(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	out, err := g.Run(ctx, script, []string{e.meta, e.data, meta2, data2})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s ran in %v:\n%s", g.Release, time.Since(t0), out)
	got := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, " "); ok {
			got[k] = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "-"))
		}
	}

	// K1: the kernel reads our pool.
	for id, o := range ours {
		if h := got[fmt.Sprintf("K1MD5_%d", id)]; h != o[0] {
			t.Errorf("K1: kernel reads device %d as md5 %q, vhostdm as %q", id, h, o[0])
		}
		want := fmt.Sprintf("0 %d thin %s", virt, o[1])
		if st := strings.TrimSpace(got[fmt.Sprintf("K1ST_%d", id)]); st != want && st+" -" != want {
			t.Errorf("K1: kernel status of device %d %q, vhostdm's %q", id, st, want)
		}
	}
	if st := got["K1POOL"]; st != ourPool {
		t.Errorf("K1: kernel pool status %q, vhostdm's %q", st, ourPool)
	}

	// K2: we read the kernel's pool.
	thinCheck(t, meta2)
	e2 := &env{t: t, meta: meta2, data: data2, bs: bs, nrBlocks: nrBlocks, virt: virt,
		model: &model{devs: map[uint64]map[uint64][]byte{1: nil, 2: nil, 5: nil}}}
	e2.start()
	defer e2.m.Close()
	for id := uint64(1); id <= 2; id++ {
		d := e2.thins[id]
		if h, want := md5Of(t, d), got[fmt.Sprintf("K2MD5_%d", id)]; h != want {
			t.Errorf("K2: vhostdm reads kernel device %d as md5 %s, kernel %s", id, h, want)
		}
		st := fmt.Sprintf("0 %d thin %s", virt, d.Status(mapper.StatusInfo, false)[0].Params)
		if want := strings.TrimSpace(got[fmt.Sprintf("K2ST_%d", id)]); st != want && st != want+" -" {
			t.Errorf("K2: vhostdm status of kernel device %d %q, kernel's %q", id, st, want)
		}
	}
	// The pool status as the kernel printed it after the delete.
	st := fmt.Sprintf("0 %d thin-pool %s", bs*nrBlocks, e2.pool.Status(mapper.StatusInfo, false)[0].Params)
	if want := got["K2POOL"]; st != want {
		t.Errorf("K2: vhostdm pool status %q, kernel's %q", st, want)
	}
	if _, err := e2.m.CreateTable("u3", "", false, fmt.Sprintf("0 %d thin /dev/mapper/pool 3", virt)); err == nil {
		t.Error("K2: device 3, deleted by the kernel, still opens")
	}
}
