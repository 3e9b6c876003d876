package snapshot_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets"
	"github.com/vhostdm/vhostdm/targets/dirtylog"
	_ "github.com/vhostdm/vhostdm/targets/mirror"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// TestKernelCompat proves on-disk compatibility with Linux 6.1 both ways,
// in one boot of the kernel oracle (test/oracle), for the snapshot COW
// store and the mirror's disk log (the mirror shares the boot to keep CI
// short):
//
//   - S1: a COW device written by vhostdm (copy-outs and direct snapshot
//     writes, more than one metadata area) is activated by the kernel: same
//     snapshot content, same usage status; then the kernel merges it into
//     the origin, which must end up equal to the snapshot.
//   - S2: a COW device written by the kernel is read by vhostdm: same
//     content and status; vhostdm then merges it, with the same result.
//   - M1: a disk log written by vhostdm, with two regions left out of sync
//     by a failing leg, makes the kernel resynchronise those two regions
//     and no other.
//   - M2: the same with the kernel writing the log and vhostdm resyncing.
func TestKernelCompat(t *testing.T) {
	oracle.Modules = append(oracle.Modules, "dm-snapshot", "dm-mirror")
	dir := t.TempDir()
	const size = 4 << 20 // every disk; 8192 sectors
	const sectors = size / 512
	names := []string{"o1", "c1", "o2", "c2", "l1a", "l1b", "g1", "l2a", "l2b", "g2"}
	disk := map[string]string{}
	major := map[string]string{}
	var disks []string
	for i, n := range names {
		p := filepath.Join(dir, n+".img")
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		disk[n] = p
		major[n] = oracle.DiskName(i)
		disks = append(disks, p)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()

	// S1, ours: origin content, a snapshot, then origin and snapshot writes.
	writeFile(t, disk["o1"], 0, pattern(1, size))
	base := create(t, m, "base", fmt.Sprintf("0 %d snapshot-origin %s", sectors, disk["o1"]))
	snap := create(t, m, "s1", fmt.Sprintf("0 %d snapshot %s %s P 8", sectors, disk["o1"], disk["c1"]))
	submit(t, base, mapper.OpWrite, 800, pattern(2, 300*4096))   // 300 copy-outs: two areas
	submit(t, snap, mapper.OpWrite, 7000, pattern(3, 20*512))    // partial chunks
	submit(t, base, mapper.OpWrite, 7004, pattern(4, 8*512))     // already copied out
	submit(t, snap, mapper.OpWrite, 16, pattern(5, 4096))        // a whole chunk
	submit(t, base, mapper.OpWrite, sectors-8, pattern(6, 4096)) // the last chunk
	s1Status := snap.Status(mapper.StatusInfo, false)[0].Params
	s1MD5 := md5Of(t, snap, sectors)
	removeAll(t, m, "s1", "base")

	// M1, ours: regions 2 and 5 of leg b fail, so they stay out of sync.
	writeFile(t, disk["l1a"], 0, pattern(10, size))
	create(t, m, "l1b", fmt.Sprintf("0 2048 linear %[1]s 0\n2048 1024 error\n3072 2048 linear %[1]s 3072\n5120 1024 error\n6144 2048 linear %[1]s 6144", disk["l1b"]))
	mir := create(t, m, "m1", fmt.Sprintf("0 %d mirror disk 2 %s 1024 2 %s 0 /dev/mapper/l1b 0", sectors, disk["g1"], disk["l1a"]))
	waitStatus(t, mir, regexp.MustCompile(` 6/8 1 `))
	submit(t, mir, mapper.OpWrite, 2048+8, pattern(11, 4096))
	submit(t, mir, mapper.OpWrite, 5120+8, pattern(12, 4096))
	submit(t, mir, mapper.OpWrite, 1024, pattern(13, 4096))
	m1Status := mir.Status(mapper.StatusInfo, false)[0].Params
	removeAll(t, m, "m1", "l1b")
	if bits := logBits(t, disk["g1"]); bits != "11011011" {
		t.Fatalf("M1: vhostdm's clean bitmap %s, want regions 2 and 5 dirty (11011011)", bits)
	}
	// Region 7 is clean but differs: a resync of everything would fix it.
	writeFile(t, disk["l1b"], 7*1024*512, pattern(14, 1024*512))
	before := fileBytes(t, disk["l1b"])

	// S2 and M2 are made by the kernel; M2's leg b fails in region 4.
	writeFile(t, disk["o2"], 0, pattern(20, size))
	writeFile(t, disk["l2a"], 0, pattern(21, size))
	d := func(n string) string { return "/dev/vd" + string(rune('b'+indexOf(names, n))) }
	script := fmt.Sprintf(`
mk() { dmsetup create "$@" && dmsetup mknodes; }
waitfor() { for i in $(seq 1 300); do s=$(dmsetup status $1); case "$s" in *"$2"*) break;; esac; sleep 0.1; done; echo "$s"; }
mk s1 --table "0 %[1]d snapshot %[2]s %[3]s P 8"
echo "S1STATUS $(dmsetup status s1)"
echo "S1MD5 $(md5sum < /dev/mapper/s1)"
dmsetup remove s1
mk o1 --table "0 %[1]d snapshot-merge %[2]s %[3]s P 8"
echo "O1MERGE $(waitfor o1 " 16/")"
echo "O1MD5 $(md5sum < /dev/mapper/o1)"
dmsetup remove o1
mk o2 --table "0 %[1]d snapshot-origin %[4]s"
mk s2 --table "0 %[1]d snapshot %[4]s %[5]s P 8"
dd if=/dev/urandom of=/dev/mapper/o2 bs=4096 seek=100 count=300 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/s2 bs=512 seek=6001 count=17 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/o2 bs=512 seek=6003 count=30 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/s2 bs=4096 seek=3 count=1 2>/dev/null
sync
echo "S2STATUS $(dmsetup status s2)"
echo "S2MD5 $(md5sum < /dev/mapper/s2)"
echo "O2MD5 $(md5sum < /dev/mapper/o2)"
dmsetup remove s2
dmsetup remove o2
mk m1 --table "0 %[1]d mirror disk 2 %[6]s 1024 2 %[7]s 0 %[8]s 0"
echo "M1STATUS $(waitfor m1 " 8/8 ")"
dmsetup remove m1
mk l2b --table "0 4096 linear %[9]s 0
4096 1024 error
5120 3072 linear %[9]s 5120"
mk m2 --table "0 %[1]d mirror disk 3 %[10]s 1024 nosync 2 %[11]s 0 /dev/mapper/l2b 0"
dd if=/dev/urandom of=/dev/mapper/m2 bs=4096 seek=520 count=2 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/m2 bs=4096 seek=130 count=2 2>/dev/null
sync
sleep 1
echo "M2STATUS $(dmsetup status m2)"
echo "M2TABLE $(dmsetup table m2)"
dmsetup remove m2
dmsetup remove l2b
`, sectors, d("o1"), d("c1"), d("o2"), d("c2"), d("g1"), d("l1a"), d("l1b"), d("l2b"), d("g2"), d("l2a"))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	t0 := time.Now()
	g, err := oracle.NewGuest(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	out, err := g.Run(ctx, script, disks)
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

	// S1: the kernel sees our snapshot, then merges it.
	if want := fmt.Sprintf("0 %d snapshot %s", sectors, s1Status); got["S1STATUS"] != want {
		t.Errorf("S1: kernel status %q, vhostdm's was %q", got["S1STATUS"], want)
	}
	if got["S1MD5"] != s1MD5 {
		t.Errorf("S1: kernel reads the snapshot as md5 %s, vhostdm as %s", got["S1MD5"], s1MD5)
	}
	if got["O1MD5"] != s1MD5 {
		t.Errorf("S1: origin after the kernel's merge md5 %s, want the snapshot's %s (status %q)", got["O1MD5"], s1MD5, got["O1MERGE"])
	}

	// S2: we read the kernel's COW device, then merge it.
	base = create(t, m, "base2", fmt.Sprintf("0 %d snapshot-origin %s", sectors, disk["o2"]))
	snap = create(t, m, "s2", fmt.Sprintf("0 %d snapshot %s %s P 8", sectors, disk["o2"], disk["c2"]))
	if st := "0 8192 snapshot " + snap.Status(mapper.StatusInfo, false)[0].Params; st != got["S2STATUS"] {
		t.Errorf("S2: vhostdm status %q, kernel's %q", st, got["S2STATUS"])
	}
	if h := md5Of(t, snap, sectors); h != got["S2MD5"] {
		t.Errorf("S2: vhostdm reads the kernel's snapshot as md5 %s, kernel %s", h, got["S2MD5"])
	}
	if h := md5Of(t, base, sectors); h != got["O2MD5"] {
		t.Errorf("S2: origin md5 %s, kernel %s", h, got["O2MD5"])
	}
	if err := base.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if err := base.Load(fmt.Sprintf("0 %d snapshot-merge %s %s P 8", sectors, disk["o2"], disk["c2"])); err != nil {
		t.Fatal(err)
	}
	if err := base.Resume(); err != nil {
		t.Fatal(err)
	}
	removeAll(t, m, "s2")
	waitStatus(t, base, regexp.MustCompile(`^16/8192 16$`))
	if h := md5Of(t, base, sectors); h != got["S2MD5"] {
		t.Errorf("S2: origin after vhostdm's merge md5 %s, want the kernel's snapshot %s", h, got["S2MD5"])
	}
	removeAll(t, m, "base2")

	// M1: the kernel resynced regions 2 and 5 only.
	if !regexp.MustCompile(`^0 8192 mirror 2 254:\d+ 254:\d+ 8/8 1 AA 3 disk 254:\d+ A$`).MatchString(got["M1STATUS"]) {
		t.Errorf("M1: kernel status %q", got["M1STATUS"])
	}
	la, lb := fileBytes(t, disk["l1a"]), fileBytes(t, disk["l1b"])
	for r := 0; r < 8; r++ {
		reg := func(b []byte) []byte { return b[r*1024*512 : (r+1)*1024*512] }
		switch r {
		case 2, 5:
			if !bytes.Equal(reg(la), reg(lb)) {
				t.Errorf("M1: the kernel did not resync region %d that vhostdm's log marks dirty", r)
			}
		default:
			if !bytes.Equal(reg(lb), reg(before)) {
				t.Errorf("M1: the kernel rewrote region %d that vhostdm's log marks clean", r)
			}
		}
	}
	// vhostdm's status has the kernel's shape.
	if !regexp.MustCompile(`^2 \S+ /dev/mapper/l1b 6/8 1 A[SF] 3 disk \S+ A$`).MatchString(m1Status) {
		t.Errorf("M1: vhostdm status %q", m1Status)
	}

	// M2: the kernel's log marks region 4 dirty; vhostdm resyncs it only.
	if !regexp.MustCompile(`^0 8192 mirror 2 254:\d+ 25\d:\d+ 7/8 1 AD 3 disk 254:\d+ A$`).MatchString(got["M2STATUS"]) {
		t.Errorf("M2: kernel status %q", got["M2STATUS"])
	}
	bits := logBits(t, disk["g2"])
	if bits[4] != '0' || bits[6] != '1' {
		t.Fatalf("M2: kernel's clean bitmap %s: want region 4 dirty, 6 clean", bits)
	}
	writeFile(t, disk["l2b"], 6*1024*512, pattern(22, 1024*512))
	before = fileBytes(t, disk["l2b"])
	mir = create(t, m, "m2", fmt.Sprintf("0 %d mirror disk 2 %s 1024 2 %s 0 %s 0", sectors, disk["g2"], disk["l2a"], disk["l2b"]))
	waitStatus(t, mir, regexp.MustCompile(` 8/8 1 AA `))
	removeAll(t, m, "m2")
	la, lb = fileBytes(t, disk["l2a"]), fileBytes(t, disk["l2b"])
	for r := 0; r < 8; r++ {
		reg := func(b []byte) []byte { return b[r*1024*512 : (r+1)*1024*512] }
		if bits[r] == '0' && !bytes.Equal(reg(la), reg(lb)) {
			t.Errorf("M2: vhostdm did not resync region %d that the kernel's log marks dirty", r)
		}
		if bits[r] == '1' && !bytes.Equal(reg(lb), reg(before)) {
			t.Errorf("M2: vhostdm rewrote region %d that the kernel's log marks clean", r)
		}
	}
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	panic(v)
}

// logBits returns a disk log's clean bitmap as 0/1 characters, region 0
// first, after checking its header.
func logBits(t *testing.T, path string) string {
	t.Helper()
	b := fileBytes(t, path)
	if binary.LittleEndian.Uint32(b) != dirtylog.Magic || binary.LittleEndian.Uint32(b[4:]) != dirtylog.Version {
		t.Fatalf("%s: log header % x", path, b[:16])
	}
	n := binary.LittleEndian.Uint64(b[8:])
	var s strings.Builder
	for i := uint64(0); i < n; i++ {
		s.WriteByte('0' + b[dirtylog.BitmapOffset+i/8]>>(i%8)&1)
	}
	return s.String()
}

func fileBytes(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t *testing.T, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
}

func create(t *testing.T, m *mapper.Manager, name, table string) *mapper.Device {
	t.Helper()
	d, err := m.CreateTable(name, "", false, table)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func removeAll(t *testing.T, m *mapper.Manager, names ...string) {
	t.Helper()
	for _, n := range names {
		if err := m.Remove(n, false); err != nil {
			t.Fatal(err)
		}
	}
}

func submit(t *testing.T, d *mapper.Device, op mapper.Op, sector uint64, data []byte) {
	t.Helper()
	if err := d.Submit(&mapper.Request{Op: op, Sector: sector, Sectors: uint64(len(data)) / 512, Data: [][]byte{data}}); err != nil {
		t.Fatalf("%s %s at %d: %v", d.Name(), op, sector, err)
	}
}

func md5Of(t *testing.T, d *mapper.Device, sectors uint64) string {
	t.Helper()
	buf := make([]byte, sectors*512)
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: sectors, Data: [][]byte{buf}}); err != nil {
		t.Fatalf("read %s: %v", d.Name(), err)
	}
	h := md5.Sum(buf)
	return hex.EncodeToString(h[:])
}

// waitStatus waits until the device's INFO matches re.
func waitStatus(t *testing.T, d *mapper.Device, re *regexp.Regexp) {
	t.Helper()
	var st string
	for i := 0; i < 1000; i++ {
		st = d.Status(mapper.StatusInfo, false)[0].Params
		if re.MatchString(st) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: status %q never matched %s", d.Name(), st, re)
}

// TestKernelDiscardAndMerge runs the same steps under the kernel (in the
// TCG guest) and under vhostdm: a snapshot with discard_zeroes_cow, a
// write through it, an origin write, whole-chunk discards of chunks with
// and without exceptions — the TABLE line, the status and the content of
// the snapshot, the origin and a second snapshot must match — then a
// second merge of the same origin, which both refuse with the kernel's
// error. (discard_passdown_origin is not compared: the guest's virtio
// disks ignore discards, vhostdm's files punch holes.)
func TestKernelDiscardAndMerge(t *testing.T) {
	oracle.Modules = append(oracle.Modules, "dm-snapshot")
	const size = 4 << 20
	const sectors = size / 512
	names := []string{"o", "c", "c2", "src"}
	kdir, vdir := t.TempDir(), t.TempDir()
	kdisk, vdisk := map[string]string{}, map[string]string{}
	var disks []string
	for _, n := range names {
		for _, d := range []struct {
			dir string
			m   map[string]string
		}{{kdir, kdisk}, {vdir, vdisk}} {
			p := filepath.Join(d.dir, n+".img")
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(p, size); err != nil {
				t.Fatal(err)
			}
			d.m[n] = p
		}
		disks = append(disks, kdisk[n])
	}
	for _, m := range []map[string]string{kdisk, vdisk} {
		writeFile(t, m["o"], 0, pattern(30, size))
		writeFile(t, m["src"], 0, pattern(31, size))
	}
	dev := func(n string) string { return "/dev/vd" + string(rune('b'+indexOf(names, n))) }
	script := fmt.Sprintf(`
mk() { dmsetup create "$@" && dmsetup mknodes; }
mk o --table "0 %[1]d snapshot-origin %[2]s"
mk s --table "0 %[1]d snapshot %[2]s %[3]s P 8 1 discard_zeroes_cow"
mk s2 --table "0 %[1]d snapshot %[2]s %[4]s P 8"
dd if=%[5]s of=/dev/mapper/s bs=4096 skip=0 seek=2 count=1 2>/dev/null
dd if=%[5]s of=/dev/mapper/o bs=4096 skip=1 seek=5 count=1 2>/dev/null
for c in 2 5 7; do busybox blkdiscard -o $((c*4096)) -l 4096 /dev/mapper/s; done
sync
echo "STABLE $(dmsetup table s)"
echo "SSTATUS $(dmsetup status s)"
echo "SMD5 $(md5sum < /dev/mapper/s)"
echo "OMD5 $(md5sum < /dev/mapper/o)"
echo "S2MD5 $(md5sum < /dev/mapper/s2)"
dmsetup suspend o
dmsetup reload o --table "0 %[1]d snapshot-merge %[2]s %[3]s P 8"
dmsetup suspend s
dmsetup resume o
echo "MERGE1 $?"
dmsetup remove s
dmsetup reload s2 --table "0 %[1]d snapshot-merge %[2]s %[4]s P 8" 2>/dev/null
echo "MERGE2 $?"
echo "KMSG $(dmesg | grep -o 'snapshot-merge: A snapshot is already merging.' | tail -n 1)"
`, sectors, dev("o"), dev("c"), dev("c2"), dev("src"))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g, err := oracle.NewGuest(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	out, err := g.Run(ctx, script, disks)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s:\n%s", g.Release, out)
	got := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, " "); ok {
			got[k] = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "-"))
		}
	}

	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	o := create(t, m, "o", fmt.Sprintf("0 %d snapshot-origin %s", sectors, vdisk["o"]))
	s := create(t, m, "s", fmt.Sprintf("0 %d snapshot %s %s P 8 1 discard_zeroes_cow", sectors, vdisk["o"], vdisk["c"]))
	s2 := create(t, m, "s2", fmt.Sprintf("0 %d snapshot %s %s P 8", sectors, vdisk["o"], vdisk["c2"]))
	src := pattern(31, size)
	submit(t, s, mapper.OpWrite, 2*8, src[:4096])
	submit(t, o, mapper.OpWrite, 5*8, src[4096:8192])
	for _, c := range []uint64{2, 5, 7} {
		if err := s.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: c * 8, Sectors: 8}); err != nil {
			t.Fatal(err)
		}
	}
	// The kernel prints devices as major:minor; compare the rest.
	if tab := regexp.MustCompile(`^0 8192 snapshot \S+ \S+ (.*)$`).FindStringSubmatch(got["STABLE"]); tab == nil || !strings.HasSuffix(s.Status(mapper.StatusTable, false)[0].Params, " "+tab[1]) {
		t.Errorf("TABLE: kernel %q, vhostdm %q", got["STABLE"], s.Status(mapper.StatusTable, false)[0].Params)
	}
	if st := "0 8192 snapshot " + s.Status(mapper.StatusInfo, false)[0].Params; st != got["SSTATUS"] {
		t.Errorf("status: vhostdm %q, kernel %q", st, got["SSTATUS"])
	}
	for _, c := range []struct {
		key string
		d   *mapper.Device
	}{{"SMD5", s}, {"OMD5", o}, {"S2MD5", s2}} {
		if h := md5Of(t, c.d, sectors); h != got[c.key] {
			t.Errorf("%s: vhostdm md5 %s, kernel %s", c.key, h, got[c.key])
		}
	}
	if got["MERGE1"] != "0" || got["MERGE2"] == "0" || got["KMSG"] != "snapshot-merge: A snapshot is already merging." {
		t.Fatalf("kernel: first merge exit %q, second %q, message %q", got["MERGE1"], got["MERGE2"], got["KMSG"])
	}
	if err := o.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if err := o.Load(fmt.Sprintf("0 %d snapshot-merge %s %s P 8", sectors, vdisk["o"], vdisk["c"])); err != nil {
		t.Fatal(err)
	}
	if err := o.Resume(); err != nil {
		t.Fatal(err)
	}
	removeAll(t, m, "s")
	err = s2.Load(fmt.Sprintf("0 %d snapshot-merge %s %s P 8", sectors, vdisk["o"], vdisk["c2"]))
	if err == nil || !strings.HasSuffix(err.Error(), got["KMSG"]) {
		t.Fatalf("vhostdm: second merge: %v, kernel: %q", err, got["KMSG"])
	}
}
