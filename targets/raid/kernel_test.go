package raid

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// Geometry of the kernel test: every member is memberSectors long, raid4/5
// arrays have 4 devices, raid6 arrays 5, raid1 2; chunk 32 sectors.
const (
	memberSectors = 1024
	kchunk        = 32
)

// kernelLayouts are every raid type, in the order members are carved.
var kernelLayouts = []struct {
	name string
	n    int
}{
	{"raid1", 2}, {"raid4", 4}, {"raid5_la", 4}, {"raid5_ra", 4}, {"raid5_ls", 4}, {"raid5_rs", 4}, {"raid5_n", 4},
	{"raid6_zr", 5}, {"raid6_nr", 5}, {"raid6_nc", 5}, {"raid6_n_6", 5},
	{"raid6_la_6", 5}, {"raid6_ra_6", 5}, {"raid6_ls_6", 5}, {"raid6_rs_6", 5},
}

// degradedArrays are arrays vhostdm writes whole and the kernel reads with
// the listed devices missing ("- -"): every type, with as many devices
// missing as it survives, data, P and Q devices among them.
var degradedArrays = []struct {
	name    string
	n       int
	missing []int
}{
	{"raid1", 2, []int{0}}, {"raid4", 4, []int{0}}, {"raid5_la", 4, []int{0}}, {"raid5_ra", 4, []int{3}},
	{"raid5_ls", 4, []int{1}}, {"raid5_rs", 4, []int{2}}, {"raid5_n", 4, []int{3}},
	{"raid6_zr", 5, []int{0, 3}}, {"raid6_nr", 5, []int{1, 2}}, {"raid6_nc", 5, []int{3, 4}},
	{"raid6_n_6", 5, []int{3, 4}}, {"raid6_la_6", 5, []int{2, 4}}, {"raid6_ra_6", 5, []int{0, 1}},
	{"raid6_ls_6", 5, []int{1, 4}}, {"raid6_rs_6", 5, []int{2, 3}},
}

// kernelMissing are the devices the B arrays (written by the kernel) miss
// when vhostdm reads them degraded.
func kernelMissing(name string) []int {
	for _, l := range degradedArrays {
		if l.name == name {
			return l.missing
		}
	}
	return nil
}

func arrayLength(name string, n int) uint64 {
	if name == "raid1" {
		return memberSectors
	}
	p := 1
	if strings.HasPrefix(name, "raid6") {
		p = 2
	}
	return uint64(n-p) * memberSectors
}

// kernelTable is the dm-raid table over members first..first+n-1 of disk
// prefix, with the given devices missing.
func kernelTable(name string, n int, prefix string, first int, missing []int) string {
	var b strings.Builder
	if strings.HasPrefix(name, "raid6") { // dm-raid refuses nosync for raid6
		fmt.Fprintf(&b, "0 %d raid %s 1 %d %d", arrayLength(name, n), name, kchunk, n)
	} else {
		fmt.Fprintf(&b, "0 %d raid %s 2 %d nosync %d", arrayLength(name, n), name, kchunk, n)
	}
	for i := 0; i < n; i++ {
		if contains(missing, i) {
			b.WriteString(" - -")
		} else {
			fmt.Fprintf(&b, " - /dev/mapper/%s%d", prefix, first+i)
		}
	}
	return b.String()
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// TestKernelCompat proves data and parity compatibility with Linux 6.1's
// dm-raid both ways, in one boot of the kernel oracle:
//
//   - A: for every raid type vhostdm writes an array (sequential writes of
//     random sizes, then small overwrites: reconstruct-write and
//     read-modify-write); the kernel reads the same bytes, and its "check"
//     finds 0 mismatches, so our P and Q are md's.
//   - B: the kernel writes every array type over zeroed members; vhostdm
//     reads the same bytes, an independent model finds every P and Q
//     byte where md's formulas put it, and vhostdm's check finds 0.
//   - D: arrays of every type vhostdm wrote are read by the kernel with
//     one (raid1/4/5) or two (raid6) devices missing: the kernel
//     reconstructs from our parity; vhostdm reads the same arrays
//     degraded too. The status lines of both are compared. The other way,
//     vhostdm reads every array the kernel wrote (B) with the same devices
//     missing: it reconstructs from the kernel's parity.
func TestKernelCompat(t *testing.T) {
	oracle.Modules = append(oracle.Modules, "dm-raid", "raid456", "raid1")
	dir := t.TempDir()
	members := 0
	for _, l := range kernelLayouts {
		members += l.n
	}
	dMembers := 0
	for _, l := range degradedArrays {
		dMembers += l.n
	}
	disk := map[string]string{}
	counts := map[string]int{"a": members, "b": members, "d": dMembers}
	var disks []string
	for _, p := range []string{"a", "b", "d"} {
		path := filepath.Join(dir, p+".img")
		if err := os.WriteFile(path, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, int64(counts[p]*memberSectors*512)); err != nil {
			t.Fatal(err)
		}
		disk[p] = path
		disks = append(disks, path)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	for _, p := range []string{"a", "b", "d"} {
		for j := 0; j < counts[p]; j++ {
			create(t, m, fmt.Sprintf("%s%d", p, j), fmt.Sprintf("0 %d linear %s %d", memberSectors, disk[p], j*memberSectors))
		}
	}

	// A and D: vhostdm writes.
	rng := rand.New(rand.NewPCG(13, 1))
	ourMD5 := map[string]string{}
	ourStatus := map[string]string{}
	ourTable := map[string]string{}
	first := 0
	for _, l := range kernelLayouts {
		d := create(t, m, "ra_"+l.name, kernelTable(l.name, l.n, "a", first, nil))
		ourMD5[l.name] = fillArray(t, rng, d)
		ourStatus[l.name] = waitIdle(t, d)
		ourTable[l.name] = d.Status(mapper.StatusTable, false)[0].Params
		first += l.n
	}
	first = 0
	dFirst := map[string]int{}
	for _, l := range degradedArrays {
		d := create(t, m, "rd_"+l.name, kernelTable(l.name, l.n, "d", first, nil))
		ourMD5["d_"+l.name] = fillArray(t, rng, d)
		waitIdle(t, d)
		dFirst[l.name] = first
		first += l.n
	}
	for _, dev := range m.Devices() {
		if strings.HasPrefix(dev.Name(), "r") {
			if err := dev.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
				t.Fatal(err)
			}
			if err := m.Remove(dev.Name(), false); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The independent model agrees with what vhostdm wrote.
	first = 0
	for _, l := range kernelLayouts {
		checkParityModel(t, "A "+l.name, l.name, l.n, memberBytes(t, disk["a"], first, l.n))
		first += l.n
	}

	aBefore, err := os.ReadFile(disk["a"])
	if err != nil {
		t.Fatal(err)
	}

	// The guest.
	var sc strings.Builder
	sc.WriteString("set +e\n")
	concise := func(p string, dev string, n int) {
		var specs []string
		for j := 0; j < n; j++ {
			specs = append(specs, fmt.Sprintf("%s%d,,,rw,0 %d linear %s %d", p, j, memberSectors, dev, j*memberSectors))
		}
		fmt.Fprintf(&sc, "dmsetup create --concise %q || echo CONCISE FAILED\n", strings.Join(specs, ";"))
	}
	concise("a", "/dev/vdb", members)
	concise("b", "/dev/vdc", members)
	concise("d", "/dev/vdd", dMembers)
	sc.WriteString("dmsetup mknodes\n")
	first = 0
	for _, l := range kernelLayouts {
		fmt.Fprintf(&sc, "dmsetup create ra_%s --table %q || echo CREATE ra_%s FAILED\n", l.name, kernelTable(l.name, l.n, "a", first, nil), l.name)
		fmt.Fprintf(&sc, "dmsetup create rb_%s --table %q || echo CREATE rb_%s FAILED\n", l.name, kernelTable(l.name, l.n, "b", first, nil), l.name)
		first += l.n
	}
	for _, l := range degradedArrays {
		fmt.Fprintf(&sc, "dmsetup create rd_%s --table %q || echo CREATE rd_%s FAILED\n", l.name, kernelTable(l.name, l.n, "d", dFirst[l.name], l.missing), l.name)
	}
	sc.WriteString("dmsetup mknodes\n")
	for _, l := range kernelLayouts {
		name := l.name
		fmt.Fprintf(&sc, "echo \"AMD5 %s $(md5sum < /dev/mapper/ra_%s)\"\n", name, name)
		fmt.Fprintf(&sc, "echo \"ASTATUS %s $(dmsetup status ra_%s)\"\n", name, name)
		fmt.Fprintf(&sc, "echo \"ATABLE %s $(dmsetup table ra_%s)\"\n", name, name)
		fmt.Fprintf(&sc, "dmsetup message ra_%s 0 check\n", name)
		fmt.Fprintf(&sc, "dd if=/dev/urandom of=/dev/mapper/rb_%s bs=16384 count=%d 2>/dev/null\n", name, arrayLength(name, l.n)/32)
	}
	for _, l := range degradedArrays {
		fmt.Fprintf(&sc, "echo \"DMD5 %s $(md5sum < /dev/mapper/rd_%s)\"\n", l.name, l.name)
		fmt.Fprintf(&sc, "echo \"DSTATUS %s $(dmsetup status rd_%s)\"\n", l.name, l.name)
	}
	sc.WriteString("sync\n")
	for _, l := range kernelLayouts {
		fmt.Fprintf(&sc, "echo \"BMD5 %s $(md5sum < /dev/mapper/rb_%s)\"\n", l.name, l.name)
	}
	sc.WriteString(`for i in $(seq 1 400); do busy=0; for d in $(dmsetup ls | grep -o '^ra_[a-z0-9_]*'); do case "$(dmsetup status $d)" in *" idle "*) ;; *) busy=1;; esac; done; [ $busy = 0 ] && break; sleep 0.1; done
`)
	for _, l := range kernelLayouts {
		fmt.Fprintf(&sc, "echo \"ACHECK %s $(dmsetup status ra_%s)\"\n", l.name, l.name)
	}
	sc.WriteString("sync\ndmesg | grep -i 'raid\\|md/' | grep -iv 'raid6: \\|xor\\|avx\\|sse' | tail -20 | sed 's/^/DMESG /'\n")

	ctx, cancel := context.WithTimeout(context.Background(), 420*time.Second)
	defer cancel()
	t0 := time.Now()
	g, err := oracle.NewGuest(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	out, err := g.Run(ctx, sc.String(), disks)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s ran in %v", g.Release, time.Since(t0))
	got := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.SplitN(line, " ", 3)
		if len(f) == 3 {
			got[f[0]+" "+f[1]] = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(f[2]), "-"))
		}
		if strings.Contains(line, "FAILED") || strings.HasPrefix(line, "DMESG") ||
			strings.HasPrefix(line, "ASTATUS raid1 ") || strings.HasPrefix(line, "ATABLE raid6_zr") || strings.HasPrefix(line, "DSTATUS") {
			t.Log(line)
		}
	}

	// A: the kernel reads our arrays and checks our parity.
	for _, l := range kernelLayouts {
		if got["AMD5 "+l.name] != ourMD5[l.name] {
			t.Errorf("A %s: kernel reads md5 %q, vhostdm wrote %s", l.name, got["AMD5 "+l.name], ourMD5[l.name])
		}
		want := fmt.Sprintf("0 %d raid %s", arrayLength(l.name, l.n), ourStatus[l.name])
		if k := got["ASTATUS "+l.name]; k+" -" != want && k != want {
			t.Errorf("A %s: kernel status %q, vhostdm's %q", l.name, k, want)
		}
		if k, ours := tableParams(got["ATABLE "+l.name]), tableParams("0 0 raid "+ourTable[l.name]); k != ours {
			t.Errorf("A %s: kernel table parameters %q, vhostdm's %q", l.name, k, ours)
		}
		f := strings.Fields(got["ACHECK "+l.name])
		if len(f) < 9 || f[7] != "idle" || f[8] != "0" {
			t.Errorf("A %s: kernel check of vhostdm's parity: status %q, want idle with 0 mismatches", l.name, got["ACHECK "+l.name])
		}
	}
	// Nothing the kernel did (raid6: its initial resync, which rewrites
	// P and Q from data; everything: check) changed a byte we wrote.
	if aAfter, err := os.ReadFile(disk["a"]); err != nil {
		t.Fatal(err)
	} else {
		first = 0
		for _, l := range kernelLayouts {
			lo, hi := first*memberSectors*512, (first+l.n)*memberSectors*512
			if !bytes.Equal(aBefore[lo:hi], aAfter[lo:hi]) {
				t.Errorf("A %s: the kernel changed vhostdm's members (parity differs from md's)", l.name)
			}
			first += l.n
		}
	}
	// D: the kernel reconstructs from our parity.
	for _, l := range degradedArrays {
		if got["DMD5 "+l.name] != ourMD5["d_"+l.name] {
			t.Errorf("D %s missing %v: kernel reads md5 %q, vhostdm wrote %s", l.name, l.missing, got["DMD5 "+l.name], ourMD5["d_"+l.name])
		}
		d := create(t, m, "rd_"+l.name, kernelTable(l.name, l.n, "d", dFirst[l.name], l.missing))
		if h := md5Of(t, d); h != ourMD5["d_"+l.name] {
			t.Errorf("D %s missing %v: vhostdm reads md5 %s degraded, wrote %s", l.name, l.missing, h, ourMD5["d_"+l.name])
		}
		// The kernel printed its status once its own initial resync was
		// over; compare ours at the same point.
		waitIdleDev(t, d)
		want := fmt.Sprintf("0 %d raid %s", arrayLength(l.name, l.n), d.Status(mapper.StatusInfo, false)[0].Params)
		if k := got["DSTATUS "+l.name]; k+" -" != want && k != want {
			t.Errorf("D %s: kernel status %q, vhostdm's %q", l.name, k, want)
		}
	}
	// B: we read the kernel's arrays; its parity is where the model says.
	first = 0
	for _, l := range kernelLayouts {
		d := create(t, m, "rb_"+l.name, kernelTable(l.name, l.n, "b", first, nil))
		if h := md5Of(t, d); h != got["BMD5 "+l.name] {
			t.Errorf("B %s: vhostdm reads md5 %s, kernel wrote %q", l.name, h, got["BMD5 "+l.name])
		}
		checkParityModel(t, "B "+l.name, l.name, l.n, memberBytes(t, disk["b"], first, l.n))
		if _, err := d.Message(0, []string{"check"}); err != nil {
			t.Fatal(err)
		}
		st := waitIdle(t, d)
		if f := strings.Fields(st); f[5] != "0" {
			t.Errorf("B %s: vhostdm's check of the kernel's parity: %q", l.name, st)
		}
		if err := m.Remove(d.Name(), false); err != nil {
			t.Fatal(err)
		}
		miss := kernelMissing(l.name)
		d = create(t, m, "rb_"+l.name, kernelTable(l.name, l.n, "b", first, miss))
		if h := md5Of(t, d); h != got["BMD5 "+l.name] {
			t.Errorf("B %s missing %v: vhostdm reads md5 %s degraded, kernel wrote %q", l.name, miss, h, got["BMD5 "+l.name])
		}
		first += l.n
	}
}

// tableParams drops the device names of a raid table line.
func tableParams(line string) string {
	f := strings.Fields(line)
	if len(f) < 5 {
		return line
	}
	np := 0
	fmt.Sscan(f[4], &np)
	if len(f) < 6+np {
		return line
	}
	return strings.Join(f[2:6+np], " ")
}

// fillArray writes random data over the whole array in pieces of random
// size, then overwrites small random ranges, and returns the md5 of what
// it reads back (which must equal what was written).
func fillArray(t *testing.T, rng *rand.Rand, d *mapper.Device) string {
	t.Helper()
	size := d.Size()
	model := make([]byte, size*512)
	for i := 0; i < len(model); i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8; j++ {
			model[i+j] = byte(v >> (8 * j))
		}
	}
	for s := uint64(0); s < size; {
		n := min(size-s, 1+rng.Uint64N(200))
		submit(t, d, mapper.OpWrite, s, model[s*512:(s+n)*512])
		s += n
	}
	for i := 0; i < 40; i++ {
		s := rng.Uint64N(size)
		n := min(size-s, 1+rng.Uint64N(12))
		buf := model[s*512 : (s+n)*512]
		for j := range buf {
			buf[j] = byte(rng.Uint32())
		}
		submit(t, d, mapper.OpWrite, s, buf)
	}
	back := make([]byte, len(model))
	submit(t, d, mapper.OpRead, 0, back)
	if !bytes.Equal(back, model) {
		t.Fatalf("%s: array does not read back what was written", d.Name())
	}
	h := md5.Sum(model)
	return hex.EncodeToString(h[:])
}

func memberBytes(t *testing.T, path string, first, n int) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for i := first; i < first+n; i++ {
		out = append(out, b[i*memberSectors*512:(i+1)*memberSectors*512])
	}
	return out
}

func create(t *testing.T, m *mapper.Manager, name, table string) *mapper.Device {
	t.Helper()
	d, err := m.CreateTable(name, "", false, table)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func submit(t *testing.T, d *mapper.Device, op mapper.Op, sector uint64, data []byte) {
	t.Helper()
	if err := d.Submit(&mapper.Request{Op: op, Sector: sector, Sectors: uint64(len(data)) / 512, Data: [][]byte{data}}); err != nil {
		t.Fatalf("%s %s at %d: %v", d.Name(), op, sector, err)
	}
}

func md5Of(t *testing.T, d *mapper.Device) string {
	t.Helper()
	buf := make([]byte, d.Size()*512)
	submit(t, d, mapper.OpRead, 0, buf)
	h := md5.Sum(buf)
	return hex.EncodeToString(h[:])
}

// waitIdleDev waits until the array's sync action is idle and returns INFO.
func waitIdleDev(t *testing.T, d *mapper.Device) string {
	t.Helper()
	var st string
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); {
		st = d.Status(mapper.StatusInfo, false)[0].Params
		if strings.Fields(st)[4] == "idle" {
			return st
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("%s: status %q not idle after 60 s", d.Name(), st)
	return ""
}
