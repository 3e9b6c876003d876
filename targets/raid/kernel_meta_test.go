package raid

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// Geometry of the metadata interop test: each member is a metadata device
// of metaSectors and a data device of dataSectors, side by side on one
// disk; region_size 256 gives 8 bitmap regions per device.
const (
	metaSectors  = 128
	dataSectors  = 2048
	memberStride = metaSectors + dataSectors
	metaRegion   = 256
	failedLeg    = 1
	untouchedRgn = 7
)

// metaArrays are the arrays of the interop test; the raid1 has a
// write-mostly leg with write-behind (the leg that fails).
var metaArrays = []struct {
	name string
	n    int
}{{"raid1", 2}, {"raid5_ls", 3}, {"raid6_zr", 5}, {"raid10", 4}}

// vDegraded is the array vhostdm runs degraded before the kernel loads it:
// leg failedLeg fails and region vDirty is written without it.
const (
	vDegraded = "raid5_ls"
	vDirty    = 3
)

// degradedRegions are the device regions the kernel writes while leg
// failedLeg is failed.
var degradedRegions = []int{2, 5}

func metaData(name string, n int) int {
	switch {
	case name == "raid1":
		return 1
	case name == "raid10":
		return n / 2 // two copies
	case strings.HasPrefix(name, "raid6"):
		return n - 2
	}
	return n - 1
}

// metaSync is the extent of the array's sync actions and bitmap: the
// device size, or for raid10 the array's length (md's raid10 syncs and
// marks its bitmap by array sector).
func metaSync(name string, n int) int {
	if name == "raid10" {
		return metaData(name, n) * dataSectors
	}
	return dataSectors
}

// regionMask selects the bits of the array's regions (md sets the bits
// past the last region of a bitmap page).
func regionMask(name string, n int) uint64 {
	return 1<<(metaSync(name, n)/metaRegion) - 1
}

// metaTable is the dm-raid table with metadata devices over members
// first.. of disk prefix (names prefix+"m"+j and prefix+"d"+j, under dir).
func metaTable(name string, n int, dir, prefix string, first int) string {
	var b strings.Builder
	chunk := kchunk * 2
	if name == "raid1" {
		chunk = 0
	}
	extra := ""
	if name == "raid1" { // write-mostly with write-behind moves too
		extra = fmt.Sprintf(" write_mostly %d max_write_behind 256", failedLeg)
	}
	fmt.Fprintf(&b, "0 %d raid %s %d %d region_size %d%s %d", metaData(name, n)*dataSectors, name, 3+len(strings.Fields(extra)), chunk, metaRegion, extra, n)
	for j := first; j < first+n; j++ {
		fmt.Fprintf(&b, " %s%sm%d %s%sd%d", dir, prefix, j, dir, prefix, j)
	}
	return b.String()
}

// TestKernelMetadata proves that arrays with metadata devices move
// between vhostdm and Linux 6.1's dm-raid both ways, judged by the kernel:
//
//   - V (vhostdm to kernel): vhostdm creates raid1, raid5_ls, raid6_zr and
//     raid10 (near, whose bitmap counts array sectors) arrays with
//     metadata devices, resyncs and writes them, and removes
//     them. The kernel accepts the superblocks and bitmaps and reports the
//     arrays in sync at once (every device 'A', the sync ratio complete,
//     idle: no resync), reads the same bytes, and its check finds no
//     mismatch. One of them (raid5_ls) ran degraded first: a leg failed
//     and a region was written without it; vhostdm's superblocks record
//     the failed leg and its bitmap the region, and the kernel recovers
//     the leg (its check then finds no mismatch though the leg was stale).
//   - K (kernel to vhostdm): the kernel creates the same array types with
//     metadata devices, writes them, lets the bitmap clean, then one leg
//     fails (its device becomes dm-error) and the kernel writes two
//     regions degraded; the leg's device comes back before power-off. The
//     kernel's superblocks record the failed leg and its bitmap the two
//     regions. A clean region of that leg is then overwritten on the
//     host. vhostdm loads the arrays with the leg present: it recovers the
//     leg in the two dirty regions only (the overwritten region is left as
//     it is), reads what the kernel read degraded, and its check finds the
//     overwritten region only; after a repair, a second kernel boot loads
//     vhostdm's metadata in sync, reads the same bytes and finds no
//     mismatch.
func TestKernelMetadata(t *testing.T) {
	oracle.Modules = append(oracle.Modules, "dm-raid", "raid456", "raid1", "raid10")
	dir := t.TempDir()
	members := 0
	for _, a := range metaArrays {
		members += a.n
	}
	disk := map[string]string{}
	for _, p := range []string{"v", "k"} {
		path := filepath.Join(dir, p+".img")
		if err := os.WriteFile(path, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, int64(members*memberStride*512)); err != nil {
			t.Fatal(err)
		}
		disk[p] = path
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	for _, p := range []string{"v", "k"} {
		for j := range members {
			create(t, m, fmt.Sprintf("%sm%d", p, j), fmt.Sprintf("0 %d linear %s %d", metaSectors, disk[p], j*memberStride))
			create(t, m, fmt.Sprintf("%sd%d", p, j), fmt.Sprintf("0 %d linear %s %d", dataSectors, disk[p], j*memberStride+metaSectors))
		}
	}

	// V: vhostdm creates, resyncs, writes and removes its arrays.
	rng := rand.New(rand.NewPCG(23, 5))
	vMD5 := map[string]string{}
	first := 0
	firsts := map[string]int{}
	for _, a := range metaArrays {
		firsts[a.name] = first
		d := create(t, m, "rv_"+a.name, metaTable(a.name, a.n, "/dev/mapper/", "v", first))
		waitIdle(t, d) // new metadata: a full resync
		vMD5[a.name] = fillArray(t, rng, d)
		degraded := a.name == vDegraded
		if degraded {
			// Leg failedLeg fails; a full stripe of region vDirty is
			// written without it; the leg comes back, stale there.
			if err := d.Suspend(false); err != nil { // the bitmap cleans
				t.Fatal(err)
			}
			if err := d.Resume(); err != nil {
				t.Fatal(err)
			}
			leg, err := m.Get(fmt.Sprintf("vd%d", first+failedLeg))
			if err != nil {
				t.Fatal(err)
			}
			if err := leg.Reload(fmt.Sprintf("0 %d error", dataSectors)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 2*kchunk*512*metaData(a.name, a.n))
			for i := range buf {
				buf[i] = byte(rng.Uint32())
			}
			submit(t, d, mapper.OpWrite, uint64(vDirty*metaRegion*metaData(a.name, a.n)), buf)
			if f := strings.Fields(d.Status(mapper.StatusInfo, false)[0].Params); f[2][failedLeg] != 'D' {
				t.Fatalf("V %s: status %v after leg %d failed", a.name, f, failedLeg)
			}
			vMD5[a.name] = md5Of(t, d)
			if err := leg.Reload(fmt.Sprintf("0 %d linear %s %d", dataSectors, disk["v"], (first+failedLeg)*memberStride+metaSectors)); err != nil {
				t.Fatal(err)
			}
		}
		if err := m.Remove(d.Name(), false); err != nil {
			t.Fatal(err)
		}
		for j := first; j < first+a.n; j++ {
			sb, bs, bits := readMeta(t, disk["v"], j)
			bits &= regionMask(a.name, a.n)
			if sb == nil || bs == nil {
				t.Fatalf("V %s member %d: no dm-raid superblock or md bitmap written", a.name, j-first)
			}
			switch {
			case degraded && j == first+failedLeg:
			case degraded:
				if !sb.isFailed(failedLeg) || bits != 1<<vDirty {
					t.Errorf("V %s member %d: after the failure: failed devices %x, bitmap %08b; want leg %d failed, region %d dirty", a.name, j-first, sb.failed, bits, failedLeg, vDirty)
				}
			case bits != 0 || sb.arrayResync != maxSector || sb.diskRecovery != maxSector:
				t.Errorf("V %s member %d: after a clean remove: bitmap %08b, resync offset %#x, recovery offset %#x", a.name, j-first, bits, sb.arrayResync, sb.diskRecovery)
			}
		}
		first += a.n
	}

	// Boot 1.
	var sc strings.Builder
	sc.WriteString("set +e\n")
	concise := func(p, dev string) {
		var specs []string
		for j := range members {
			specs = append(specs, fmt.Sprintf("%sm%d,,,rw,0 %d linear %s %d", p, j, metaSectors, dev, j*memberStride))
			specs = append(specs, fmt.Sprintf("%sd%d,,,rw,0 %d linear %s %d", p, j, dataSectors, dev, j*memberStride+metaSectors))
		}
		fmt.Fprintf(&sc, "dmsetup create --concise %q || echo CONCISE FAILED\n", strings.Join(specs, ";"))
	}
	concise("v", "/dev/vdb")
	concise("k", "/dev/vdc")
	sc.WriteString("dmsetup mknodes\n")
	sc.WriteString(metaGuestHelpers)
	for _, a := range metaArrays {
		fmt.Fprintf(&sc, "dmsetup create rv_%s --table %q || echo CREATE rv_%s FAILED\n", a.name, metaTable(a.name, a.n, "/dev/mapper/", "v", firsts[a.name]), a.name)
		fmt.Fprintf(&sc, "echo \"VSTATUS %s $(dmsetup status rv_%s)\"\n", a.name, a.name)
		fmt.Fprintf(&sc, "dmsetup create rk_%s --table %q || echo CREATE rk_%s FAILED\n", a.name, metaTable(a.name, a.n, "/dev/mapper/", "k", firsts[a.name]), a.name)
	}
	sc.WriteString("dmsetup mknodes\n")
	for _, a := range metaArrays {
		fmt.Fprintf(&sc, "echo \"VMD5 %s $(md5sum < /dev/mapper/rv_%s)\"\n", a.name, a.name)
		fmt.Fprintf(&sc, "dd if=/dev/urandom of=/dev/mapper/rk_%s bs=65536 count=%d conv=fsync 2>/dev/null\n", a.name, metaData(a.name, a.n)*dataSectors/128)
	}
	sc.WriteString("waitidle\n")
	for _, a := range metaArrays {
		fmt.Fprintf(&sc, "dmsetup message rv_%s 0 check\n", a.name)
	}
	sc.WriteString("waitidle\n")
	// Let the kernel's bitmaps clean (its daemon clears a bit in two
	// passes of daemon_sleep, 5 s) before a leg fails.
	var metas []string
	for _, a := range metaArrays {
		metas = append(metas, fmt.Sprintf("km%d:%d", firsts[a.name], (metaSync(a.name, a.n)/metaRegion+7)/8))
	}
	fmt.Fprintf(&sc, "waitclean %s\n", strings.Join(metas, " "))
	for _, a := range metaArrays {
		fmt.Fprintf(&sc, "echo \"VCHECK %s $(dmsetup status rv_%s)\"\n", a.name, a.name)
		leg := fmt.Sprintf("kd%d", firsts[a.name]+failedLeg)
		fmt.Fprintf(&sc, "dmsetup suspend %s; dmsetup reload %s --table \"0 %d error\"; dmsetup resume %s\n", leg, leg, dataSectors, leg)
		bs := 32768 * metaData(a.name, a.n) // one full stripe: every member is written
		for _, rg := range degradedRegions {
			fmt.Fprintf(&sc, "dd if=/dev/urandom of=/dev/mapper/rk_%s bs=%d seek=%d count=1 conv=fsync 2>/dev/null\n", a.name, bs, rg*metaRegion*512*metaData(a.name, a.n)/bs)
		}
	}
	sc.WriteString("sync; sleep 2\n")
	for _, a := range metaArrays {
		fmt.Fprintf(&sc, "echo \"KSTATUS %s $(dmsetup status rk_%s)\"\n", a.name, a.name)
		fmt.Fprintf(&sc, "echo \"KMD5 %s $(md5sum < /dev/mapper/rk_%s)\"\n", a.name, a.name)
		leg := fmt.Sprintf("kd%d", firsts[a.name]+failedLeg)
		fmt.Fprintf(&sc, "dmsetup suspend %s; dmsetup reload %s --table \"0 %d linear /dev/vdc %d\"; dmsetup resume %s\n", leg, leg, dataSectors, (firsts[a.name]+failedLeg)*memberStride+metaSectors, leg)
	}
	sc.WriteString("sync\ndmesg | grep -i 'raid\\|md/\\|bitmap' | grep -iv 'raid6: \\|xor\\|avx\\|sse' | tail -30 | sed 's/^/DMESG /'\n")
	out := runGuest(t, sc.String(), []string{disk["v"], disk["k"]})
	got := parseGuest(t, out)

	// V: the kernel takes vhostdm's arrays as they are.
	for _, a := range metaArrays {
		health := strings.Repeat("A", a.n)
		want := fmt.Sprintf("0 %d raid %s %d %s %d/%d idle 0 0 -", metaData(a.name, a.n)*dataSectors, a.name, a.n, health, metaSync(a.name, a.n), metaSync(a.name, a.n))
		if k := got["VSTATUS "+a.name]; a.name != vDegraded && k != want && k+" -" != want {
			t.Errorf("V %s: kernel status at load %q, want %q (in sync, no resync)", a.name, k, want)
		}
		if got["VMD5 "+a.name] != vMD5[a.name] {
			t.Errorf("V %s: kernel reads md5 %q, vhostdm wrote %s", a.name, got["VMD5 "+a.name], vMD5[a.name])
		}
		// For the degraded array, 0 mismatches with the leg in sync means
		// the kernel honoured vhostdm's record of the failed leg: the leg
		// is stale in region vDirty.
		if f := strings.Fields(got["VCHECK "+a.name]); len(f) < 9 || f[5] != health || f[7] != "idle" || f[8] != "0" {
			t.Errorf("V %s: kernel check: %q, want every device in sync, idle with 0 mismatches", a.name, got["VCHECK "+a.name])
		}
	}

	// K: the kernel recorded the failure and the degraded writes.
	saved := map[string][]byte{}
	for _, a := range metaArrays {
		// The kernel wrote device region rg, array sectors from
		// rg*metaRegion*data: for raid10 (a bitmap of array sectors)
		// region rg*data.
		wantBits := uint64(0)
		for _, rg := range degradedRegions {
			if a.name == "raid10" {
				rg *= metaData(a.name, a.n)
			}
			wantBits |= 1 << rg
		}
		f := strings.Fields(got["KSTATUS "+a.name])
		if len(f) < 6 || len(f[5]) <= failedLeg || f[5][failedLeg] != 'D' {
			t.Fatalf("K %s: kernel status after the leg failed: %q, want leg %d 'D'", a.name, got["KSTATUS "+a.name], failedLeg)
		}
		fresh := firsts[a.name]
		sb, _, bits := readMeta(t, disk["k"], fresh)
		bits &= regionMask(a.name, a.n)
		if sb == nil || !sb.isFailed(failedLeg) || bits != wantBits {
			t.Fatalf("K %s: kernel metadata on member 0: superblock %+v, bitmap %08b; want leg %d failed and regions %v dirty", a.name, sb, bits, failedLeg, degradedRegions)
		}
		// A clean region of the failed leg, overwritten: recovery from the
		// bitmap must leave it alone.
		saved[a.name] = regionBytes(t, disk["k"], fresh+failedLeg, untouchedRgn)
		writeRegion(t, disk["k"], fresh+failedLeg, untouchedRgn, bytes.Repeat([]byte{0xEE}, metaRegion*512))
	}

	// K: vhostdm loads the kernel's arrays and recovers the leg.
	for _, a := range metaArrays {
		tbl := metaTable(a.name, a.n, "/dev/mapper/", "k", firsts[a.name])
		d := create(t, m, "rk_"+a.name, tbl)
		// Recovering at load: leg 'a', or (the two regions' recovery is
		// quick on a quiet host) already done, with recover as the
		// action that ran.
		if f := strings.Fields(d.Status(mapper.StatusInfo, false)[0].Params); f[2][failedLeg] != 'a' && f[4] != "recover" {
			t.Errorf("K %s: vhostdm status at load %v: want leg %d recovering ('a', action recover)", a.name, f, failedLeg)
		}
		st := waitSettled(t, d)
		if f := strings.Fields(st); f[2] != strings.Repeat("A", a.n) || f[3] != fmt.Sprintf("%d/%d", metaSync(a.name, a.n), metaSync(a.name, a.n)) {
			t.Errorf("K %s: vhostdm status after recovery %q", a.name, st)
		}
		if !bytes.Equal(regionBytes(t, disk["k"], firsts[a.name]+failedLeg, untouchedRgn), bytes.Repeat([]byte{0xEE}, metaRegion*512)) {
			t.Errorf("K %s: vhostdm rewrote a region the kernel's bitmap had clean (a full recovery, not the bitmap's)", a.name)
		}
		if _, err := d.Message(0, []string{"check"}); err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(waitSettled(t, d)); f[5] != fmt.Sprint(metaRegion) {
			t.Errorf("K %s: vhostdm check after recovery: %s mismatched sectors, want %d (the overwritten region only)", a.name, f[5], metaRegion)
		}
		if err := m.Remove(d.Name(), false); err != nil {
			t.Fatal(err)
		}
		// Undo the overwrite; the array loads clean from vhostdm's
		// metadata and reads what the kernel read degraded.
		writeRegion(t, disk["k"], firsts[a.name]+failedLeg, untouchedRgn, saved[a.name])
		d = create(t, m, "rk_"+a.name, tbl)
		if st := d.Status(mapper.StatusInfo, false)[0].Params; st != fmt.Sprintf("%s %d %s %d/%d idle 0 0 -", a.name, a.n, strings.Repeat("A", a.n), metaSync(a.name, a.n), metaSync(a.name, a.n)) {
			t.Errorf("K %s: vhostdm status at reload %q, want in sync and idle", a.name, st)
		}
		if h := md5Of(t, d); h != got["KMD5 "+a.name] {
			t.Errorf("K %s: vhostdm reads md5 %s, kernel read %q degraded", a.name, h, got["KMD5 "+a.name])
		}
		if _, err := d.Message(0, []string{"check"}); err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(waitSettled(t, d)); f[5] != "0" {
			t.Errorf("K %s: vhostdm check after reload: %s mismatched sectors", a.name, f[5])
		}
		if err := m.Remove(d.Name(), false); err != nil {
			t.Fatal(err)
		}
	}

	// Boot 2: the kernel loads the arrays vhostdm recovered.
	sc.Reset()
	sc.WriteString("set +e\n")
	concise("k", "/dev/vdb")
	sc.WriteString("dmsetup mknodes\n")
	sc.WriteString(metaGuestHelpers)
	for _, a := range metaArrays {
		fmt.Fprintf(&sc, "dmsetup create rk_%s --table %q || echo CREATE rk_%s FAILED\n", a.name, metaTable(a.name, a.n, "/dev/mapper/", "k", firsts[a.name]), a.name)
		fmt.Fprintf(&sc, "echo \"KSTATUS2 %s $(dmsetup status rk_%s)\"\n", a.name, a.name)
	}
	sc.WriteString("dmsetup mknodes\n")
	for _, a := range metaArrays {
		fmt.Fprintf(&sc, "echo \"KMD52 %s $(md5sum < /dev/mapper/rk_%s)\"\n", a.name, a.name)
		fmt.Fprintf(&sc, "dmsetup message rk_%s 0 check\n", a.name)
	}
	sc.WriteString("waitidle\n")
	for _, a := range metaArrays {
		fmt.Fprintf(&sc, "echo \"KCHECK2 %s $(dmsetup status rk_%s)\"\n", a.name, a.name)
	}
	sc.WriteString("dmesg | grep -i 'raid\\|md/\\|bitmap' | grep -iv 'raid6: \\|xor\\|avx\\|sse' | tail -20 | sed 's/^/DMESG /'\n")
	got2 := parseGuest(t, runGuest(t, sc.String(), []string{disk["k"]}))
	for _, a := range metaArrays {
		health := strings.Repeat("A", a.n)
		want := fmt.Sprintf("0 %d raid %s %d %s %d/%d idle 0 0 -", metaData(a.name, a.n)*dataSectors, a.name, a.n, health, metaSync(a.name, a.n), metaSync(a.name, a.n))
		if k := got2["KSTATUS2 "+a.name]; k != want && k+" -" != want {
			t.Errorf("K %s: kernel status at load after vhostdm's recovery %q, want %q", a.name, k, want)
		}
		if got2["KMD52 "+a.name] != got["KMD5 "+a.name] {
			t.Errorf("K %s: kernel reads md5 %q after vhostdm's recovery, %q before", a.name, got2["KMD52 "+a.name], got["KMD5 "+a.name])
		}
		if f := strings.Fields(got2["KCHECK2 "+a.name]); len(f) < 9 || f[7] != "idle" || f[8] != "0" {
			t.Errorf("K %s: kernel check after vhostdm's recovery: %q, want idle with 0 mismatches", a.name, got2["KCHECK2 "+a.name])
		}
	}
}

// metaGuestHelpers are shell functions of the guest script: waitidle
// waits until no array resyncs or checks; waitclean waits until the
// bitmaps of the given metadata devices (name:bytes of bits) have no bit
// set.
const metaGuestHelpers = `waitidle() { for i in $(seq 1 600); do busy=0; for d in $(dmsetup ls | grep -o '^r[kv]_[a-z0-9_]*'); do case "$(dmsetup status $d)" in *" idle "*) ;; *) busy=1;; esac; done; [ $busy = 0 ] && return; sleep 0.2; done; echo WAITIDLE TIMEOUT; }
waitclean() { for i in $(seq 1 200); do echo 3 > /proc/sys/vm/drop_caches; dirty=0; for m in "$@"; do b=$(dd if=/dev/mapper/${m%:*} bs=1 skip=4352 count=${m#*:} 2>/dev/null | od -An -tu1); case "$b" in *[1-9]*) dirty=1;; esac; done; [ $dirty = 0 ] && return; sleep 0.5; done; echo WAITCLEAN TIMEOUT; }
`

// waitSettled waits until the array is idle twice 50 ms apart (a recovery
// is followed by the bitmap's resync) and returns INFO.
func waitSettled(t *testing.T, d *mapper.Device) string {
	t.Helper()
	for {
		st := waitIdleDev(t, d)
		time.Sleep(50 * time.Millisecond)
		if st2 := waitIdleDev(t, d); st2 == st {
			return st
		}
	}
}

func runGuest(t *testing.T, script string, disks []string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 420*time.Second)
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
	t.Logf("kernel %s ran in %v", g.Release, time.Since(t0))
	return out
}

// parseGuest maps "KEY NAME rest" lines to rest, logging failures and
// kernel messages.
func parseGuest(t *testing.T, out string) map[string]string {
	got := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.SplitN(line, " ", 3)
		if len(f) == 3 {
			got[f[0]+" "+f[1]] = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(f[2]), "-"))
		}
		if strings.Contains(line, "FAILED") || strings.Contains(line, "TIMEOUT") || strings.HasPrefix(line, "DMESG") || strings.Contains(line, "STATUS") {
			t.Log(line)
		}
	}
	return got
}

// readMeta decodes the metadata device of member j of the image at path:
// its superblock, bitmap superblock and first 64 bits.
func readMeta(t *testing.T, path string, j int) (*superblock, *bitmapSuper, uint64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, bitsOffset+8)
	if _, err := f.ReadAt(buf, int64(j*memberStride*512)); err != nil {
		t.Fatal(err)
	}
	var sbp *superblock
	var bsp *bitmapSuper
	if sb, ok := decodeSuperblock(buf); ok {
		sbp = &sb
	}
	if bs, ok := decodeBitmapSuper(buf[bitmapSBOffset:]); ok {
		bsp = &bs
	}
	return sbp, bsp, binary.LittleEndian.Uint64(buf[bitsOffset:])
}

func regionOffset(j, region int) int64 {
	return int64(j*memberStride+metaSectors+region*metaRegion) * 512
}

func writeRegion(t *testing.T, path string, j, region int, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, regionOffset(j, region)); err != nil {
		t.Fatal(err)
	}
}

func regionBytes(t *testing.T, path string, j, region int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, metaRegion*512)
	if _, err := f.ReadAt(buf, regionOffset(j, region)); err != nil {
		t.Fatal(err)
	}
	return buf
}
