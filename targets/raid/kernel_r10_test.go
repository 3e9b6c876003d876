package raid

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// stripedArray is a raid0 or raid10 array of the striped kernel test; its
// members are metadata and data devices of metaSectors and dataSectors
// side by side (raid0 uses the data devices only).
type stripedArray struct {
	key     string // short name: array names are z<side>_<key>
	typ     string // raid type of the table
	n       int
	params  string // optional parameters after the chunk size
	missing int    // the leg missing in the degraded runs; -1: no degraded run
	corrupt bool   // V only: a copy is corrupted before the kernel's check
}

// stripedArrays cover raid0, and raid10 in every format with device
// counts that are and are not multiples of the copies (near wrapping
// to the next row; far and offset with a larger last far set).
var stripedArrays = []stripedArray{
	{"r0", "raid0", 3, "", 0, false},
	{"m0", "raid0", 3, "", -1, false}, // with metadata devices (LVM's raid0_meta)
	{"n4", "raid10", 4, "", 1, false},
	{"n3", "raid10", 3, "raid10_copies 2 raid10_format near", 2, false},
	{"f4", "raid10", 4, "raid10_copies 2 raid10_format far", 0, false},
	{"f5", "raid10_far", 5, "raid10_format far", 4, false},
	{"o4", "raid10_offset", 4, "raid10_format offset", 3, false},
	{"o3", "raid10", 3, "raid10_copies 2 raid10_format offset", 1, false},
	{"c4", "raid10", 4, "", -1, true},
	{"cf", "raid10", 4, "raid10_format far", -1, true},
	{"c1", "raid1", 2, "", -1, true},
}

// hasMeta reports whether the array has metadata devices: all but the
// raid0 without ("r0").
func (a stripedArray) hasMeta() bool { return a.key != "r0" }

func (a stripedArray) copies() int {
	if a.typ == "raid0" {
		return 1
	}
	return 2
}

func (a stripedArray) length() int { return a.n * dataSectors / a.copies() }

// table is the array's table over members first.. of side prefix, with
// leg missing left out ("- -"; -1 for none).
func (a stripedArray) table(prefix string, first, missing int) string {
	var b strings.Builder
	np := 1 + len(strings.Fields(a.params))
	chunk := kchunk * 2
	if a.typ == "raid1" {
		chunk = 0
	}
	fmt.Fprintf(&b, "0 %d raid %s %d %d", a.length(), a.typ, np, chunk)
	if a.params != "" {
		b.WriteString(" " + a.params)
	}
	fmt.Fprintf(&b, " %d", a.n)
	for j := 0; j < a.n; j++ {
		switch {
		case j == missing:
			b.WriteString(" - -")
		case !a.hasMeta():
			fmt.Fprintf(&b, " - /dev/mapper/%sd%d", prefix, first+j)
		default:
			fmt.Fprintf(&b, " /dev/mapper/%sm%d /dev/mapper/%sd%d", prefix, first+j, prefix, first+j)
		}
	}
	return b.String()
}

// TestKernelStriped proves raid0 and raid10 (near, far and offset, with
// metadata devices: the kernel's raid10 needs them) compatible with Linux
// 6.1's dm-raid both ways, in one boot of the kernel oracle:
//
//   - V: vhostdm creates each array (raid10: resyncs it, writing
//     dm-raid superblocks and md bitmaps), writes it and removes it. The
//     kernel loads it in sync at once, reads the same bytes and its check
//     finds no mismatch between the copies; its table and status lines
//     equal vhostdm's. Three more arrays (raid10 near and far, raid1) have
//     a copy corrupted on the host first: the kernel's check and
//     vhostdm's count the same mismatched sectors.
//   - D: vhostdm writes a second set of the raid10 arrays; the kernel
//     reads them with one leg missing (the copies come from the other
//     legs, where md's layout puts them) and so does vhostdm.
//   - K: the kernel creates the arrays and writes them; vhostdm takes
//     over the kernel's superblocks (same level, layout word, chunk and
//     sizes) and bitmaps, reads the same bytes, finds no mismatch, and
//     reads the same again with one leg missing.
//   - raid0 runs twice, without and with metadata devices ("m0", LVM's
//     raid0_meta): with them, each side loads the other's array, and the
//     superblocks the kernel writes (on its array and on vhostdm's) equal
//     vhostdm's field for field but the event count, with no bitmap.
func TestKernelStriped(t *testing.T) {
	oracle.Modules = append(oracle.Modules, "dm-raid", "raid0", "raid1", "raid10")
	dir := t.TempDir()
	members := 0
	firsts := map[string]int{}
	for _, a := range stripedArrays {
		firsts[a.key] = members
		members += a.n
	}
	sides := []string{"v", "d", "k"}
	disk := map[string]string{}
	for _, p := range sides {
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
	for _, p := range sides {
		for j := range members {
			create(t, m, fmt.Sprintf("%sm%d", p, j), fmt.Sprintf("0 %d linear %s %d", metaSectors, disk[p], j*memberStride))
			create(t, m, fmt.Sprintf("%sd%d", p, j), fmt.Sprintf("0 %d linear %s %d", dataSectors, disk[p], j*memberStride+metaSectors))
		}
	}

	// V and D: vhostdm creates, resyncs, writes and removes its arrays.
	rng := rand.New(rand.NewPCG(41, 7))
	ourMD5, ourStatus, ourTable := map[string]string{}, map[string]string{}, map[string]string{}
	for _, side := range []string{"v", "d"} {
		for _, a := range stripedArrays {
			if side == "d" && a.missing < 0 || side == "d" && a.typ == "raid0" {
				continue
			}
			d := create(t, m, "z"+side+"_"+a.key, a.table(side, firsts[a.key], -1))
			waitIdle(t, d)
			ourMD5[side+a.key] = fillArray(t, rng, d)
			ourStatus[side+a.key] = waitIdle(t, d)
			ourTable[side+a.key] = d.Status(mapper.StatusTable, false)[0].Params
			if err := m.Remove(d.Name(), false); err != nil {
				t.Fatal(err)
			}
			if side == "v" && a.corrupt {
				// Two 10-byte runs of member 1, 40 KiB apart, go bad.
				for _, off := range []int64{0, 40 << 10} {
					writeAt(t, disk["v"], int64(firsts[a.key]+1)*memberStride*512+metaSectors*512+off, bytes.Repeat([]byte{0xA5}, 10))
				}
			}
		}
	}
	// vhostdm's superblocks carry md's level and layout word; the
	// kernel's must be the same (K below).
	ourLevel, ourLayout, ourSyncSize := map[string]uint32{}, map[string]uint32{}, map[string]uint64{}
	ourSB := map[string]superblock{}
	for _, a := range stripedArrays {
		if !a.hasMeta() {
			continue
		}
		sb, bs, _ := readMeta(t, disk["v"], firsts[a.key])
		if a.typ == "raid0" { // dm-raid's superblock, no bitmap
			if sb == nil || bs != nil {
				t.Fatalf("V %s: superblock %+v, bitmap %+v: want a superblock and no bitmap", a.key, sb, bs)
			}
			ourSB[a.key] = *sb
			continue
		}
		if sb == nil || bs == nil {
			t.Fatalf("V %s: no superblock or bitmap written", a.key)
		}
		t.Logf("V %s: vhostdm's superblock level %d layout %#x sectors %d array %d; bitmap sync size %d", a.key, sb.level, sb.layout, sb.sectors, sb.arraySectors, bs.syncSz)
		ourLevel[a.key], ourLayout[a.key], ourSyncSize[a.key] = sb.level, sb.layout, bs.syncSz
	}

	// The guest.
	var sc strings.Builder
	sc.WriteString("set +e\n")
	for i, p := range sides {
		var specs []string
		for j := range members {
			specs = append(specs, fmt.Sprintf("%sm%d,,,rw,0 %d linear /dev/vd%c %d", p, j, metaSectors, 'b'+i, j*memberStride))
			specs = append(specs, fmt.Sprintf("%sd%d,,,rw,0 %d linear /dev/vd%c %d", p, j, dataSectors, 'b'+i, j*memberStride+metaSectors))
		}
		fmt.Fprintf(&sc, "dmsetup create --concise %q || echo CONCISE FAILED\n", strings.Join(specs, ";"))
	}
	sc.WriteString("dmsetup mknodes\n")
	sc.WriteString(`waitidle() { for i in $(seq 1 600); do busy=0; for d in $(dmsetup ls | grep -o '^z[vkd]_[a-z0-9_]*'); do case "$(dmsetup status $d)" in *" idle "*) ;; *) busy=1;; esac; done; [ $busy = 0 ] && return; sleep 0.2; done; echo WAITIDLE TIMEOUT; }
`)
	for _, a := range stripedArrays {
		fmt.Fprintf(&sc, "dmsetup create zv_%s --table %q || echo CREATE zv_%s FAILED\n", a.key, a.table("v", firsts[a.key], -1), a.key)
		fmt.Fprintf(&sc, "echo \"VSTATUS %s $(dmsetup status zv_%s)\"\n", a.key, a.key)
		fmt.Fprintf(&sc, "dmsetup create zk_%s --table %q || echo CREATE zk_%s FAILED\n", a.key, a.table("k", firsts[a.key], -1), a.key)
		if a.typ != "raid0" && a.missing >= 0 {
			fmt.Fprintf(&sc, "dmsetup create zd_%s --table %q || echo CREATE zd_%s FAILED\n", a.key, a.table("d", firsts[a.key], a.missing), a.key)
		}
	}
	sc.WriteString("dmsetup mknodes\n")
	for _, a := range stripedArrays {
		fmt.Fprintf(&sc, "echo \"VMD5 %s $(md5sum < /dev/mapper/zv_%s)\"\n", a.key, a.key)
		fmt.Fprintf(&sc, "echo \"VTABLE %s $(dmsetup table zv_%s)\"\n", a.key, a.key)
		if a.typ != "raid0" && a.missing >= 0 {
			fmt.Fprintf(&sc, "echo \"DMD5 %s $(md5sum < /dev/mapper/zd_%s)\"\n", a.key, a.key)
			fmt.Fprintf(&sc, "echo \"DSTATUS %s $(dmsetup status zd_%s)\"\n", a.key, a.key)
		}
		if a.typ != "raid0" {
			fmt.Fprintf(&sc, "dmsetup message zv_%s 0 check\n", a.key)
		}
	}
	sc.WriteString("waitidle\n")
	for _, a := range stripedArrays {
		fmt.Fprintf(&sc, "echo \"VCHECK %s $(dmsetup status zv_%s)\"\n", a.key, a.key)
		fmt.Fprintf(&sc, "dd if=/dev/urandom of=/dev/mapper/zk_%s bs=65536 count=%d conv=fsync 2>/dev/null\n", a.key, a.length()/128)
	}
	sc.WriteString("sync\n")
	for _, a := range stripedArrays {
		fmt.Fprintf(&sc, "echo \"KMD5 %s $(md5sum < /dev/mapper/zk_%s)\"\n", a.key, a.key)
		fmt.Fprintf(&sc, "echo \"KSTATUS %s $(dmsetup status zk_%s)\"\n", a.key, a.key)
		fmt.Fprintf(&sc, "echo \"KTABLE %s $(dmsetup table zk_%s)\"\n", a.key, a.key)
	}
	// raid0 has no md thread: the kernel writes its superblocks when the
	// array stops (md_stop_writes), so stop them as a user would.
	sc.WriteString("dmsetup remove zv_m0 zk_m0 || echo REMOVE m0 FAILED\n")
	sc.WriteString("sync\ndmesg | grep -i 'raid\\|md/\\|bitmap' | grep -iv 'raid6: \\|xor\\|avx\\|sse' | tail -30 | sed 's/^/DMESG /'\n")
	got := parseGuest(t, runGuest(t, sc.String(), []string{disk["v"], disk["d"], disk["k"]}))

	for _, a := range stripedArrays {
		// V: the kernel takes vhostdm's arrays as they are.
		want := fmt.Sprintf("0 %d raid %s", a.length(), ourStatus["v"+a.key])
		if k := got["VSTATUS "+a.key]; k != want && k+" -" != want {
			t.Errorf("V %s: kernel status at load %q, vhostdm's %q", a.key, k, want)
		}
		if got["VMD5 "+a.key] != ourMD5["v"+a.key] && !a.corrupt {
			t.Errorf("V %s: kernel reads md5 %q, vhostdm wrote %s", a.key, got["VMD5 "+a.key], ourMD5["v"+a.key])
		}
		if k, ours := tableParams(got["VTABLE "+a.key]), tableParams("0 0 raid "+ourTable["v"+a.key]); k != ours {
			t.Errorf("V %s: kernel table parameters %q, vhostdm's %q", a.key, k, ours)
		}
		if a.corrupt {
			// Both count the mismatches the same way.
			d := create(t, m, "zv_"+a.key, a.table("v", firsts[a.key], -1))
			waitSettled(t, d)
			if _, err := d.Message(0, []string{"check"}); err != nil {
				t.Fatal(err)
			}
			ours := strings.Fields(waitSettled(t, d))
			t.Logf("V %s: a corrupted copy: kernel's check %q, vhostdm's %q", a.key, got["VCHECK "+a.key], strings.Join(ours, " "))
			if f := strings.Fields(got["VCHECK "+a.key]); len(f) < 9 || f[7] != "idle" || f[8] == "0" || f[8] != ours[5] {
				t.Errorf("V %s: kernel check of a corrupted copy: %q; vhostdm's: %v", a.key, got["VCHECK "+a.key], ours)
			}
			if err := m.Remove(d.Name(), false); err != nil {
				t.Fatal(err)
			}
		} else if a.typ != "raid0" {
			if f := strings.Fields(got["VCHECK "+a.key]); len(f) < 9 || f[5] != strings.Repeat("A", a.n) || f[7] != "idle" || f[8] != "0" {
				t.Errorf("V %s: kernel check of vhostdm's copies: %q, want idle with 0 mismatches", a.key, got["VCHECK "+a.key])
			}
		}
		if a.typ != "raid0" && a.missing >= 0 {
			// D: the kernel reads vhostdm's copies degraded.
			if got["DMD5 "+a.key] != ourMD5["d"+a.key] {
				t.Errorf("D %s leg %d missing: kernel reads md5 %q, vhostdm wrote %s", a.key, a.missing, got["DMD5 "+a.key], ourMD5["d"+a.key])
			}
			d := create(t, m, "zd_"+a.key, a.table("d", firsts[a.key], a.missing))
			if h := md5Of(t, d); h != ourMD5["d"+a.key] {
				t.Errorf("D %s leg %d missing: vhostdm reads md5 %s degraded, wrote %s", a.key, a.missing, h, ourMD5["d"+a.key])
			}
			want := fmt.Sprintf("0 %d raid %s", a.length(), waitIdle(t, d))
			if k := got["DSTATUS "+a.key]; k != want && k+" -" != want {
				t.Errorf("D %s: kernel status %q, vhostdm's %q", a.key, k, want)
			}
			if err := m.Remove(d.Name(), false); err != nil {
				t.Fatal(err)
			}
		}

		// K: vhostdm takes over the kernel's arrays.
		if a.typ == "raid0" && a.hasMeta() {
			// The kernel writes raid0's superblock as vhostdm does, field
			// for field but the event count, and no bitmap: on its own
			// array and on vhostdm's, which it loaded.
			for _, side := range []string{"k", "v"} {
				sb, bs, _ := readMeta(t, disk[side], firsts[a.key])
				if sb == nil || bs != nil {
					t.Fatalf("%s %s: kernel's superblock %+v, bitmap %+v: want a superblock and no bitmap", strings.ToUpper(side), a.key, sb, bs)
				}
				ours := ourSB[a.key]
				t.Logf("%s %s: kernel's raid0 superblock events %d (vhostdm wrote %d): %+v", strings.ToUpper(side), a.key, sb.events, ours.events, *sb)
				ours.events = sb.events
				if *sb != ours {
					t.Errorf("%s %s: kernel's raid0 superblock %+v, vhostdm's %+v", strings.ToUpper(side), a.key, *sb, ours)
				}
			}
		}
		if a.hasMeta() && a.typ != "raid0" {
			sb, bs, _ := readMeta(t, disk["k"], firsts[a.key])
			if sb == nil || bs == nil {
				t.Fatalf("K %s: no kernel superblock or bitmap", a.key)
			}
			t.Logf("K %s: kernel's superblock level %d layout %#x sectors %d array %d resync %#x; bitmap sync size %d", a.key, sb.level, sb.layout, sb.sectors, sb.arraySectors, sb.arrayResync, bs.syncSz)
			if sb.level != ourLevel[a.key] || sb.layout != ourLayout[a.key] || bs.syncSz != ourSyncSize[a.key] {
				t.Errorf("K %s: kernel's level %d layout %#x bitmap sync size %d; vhostdm writes %d, %#x, %d", a.key, sb.level, sb.layout, bs.syncSz, ourLevel[a.key], ourLayout[a.key], ourSyncSize[a.key])
			}
		}
		d := create(t, m, "zk_"+a.key, a.table("k", firsts[a.key], -1))
		if st := d.Status(mapper.StatusInfo, false)[0].Params; "0 "+fmt.Sprint(a.length())+" raid "+st != got["KSTATUS "+a.key] && "0 "+fmt.Sprint(a.length())+" raid "+st != got["KSTATUS "+a.key]+" -" {
			t.Logf("K %s: vhostdm status at load %q, the kernel's before power-off %q", a.key, st, got["KSTATUS "+a.key])
		}
		if k, ours := tableParams(got["KTABLE "+a.key]), tableParams("0 0 raid "+d.Status(mapper.StatusTable, false)[0].Params); k != ours {
			t.Errorf("K %s: kernel table parameters %q, vhostdm's %q", a.key, k, ours)
		}
		if h := md5Of(t, d); h != got["KMD5 "+a.key] {
			t.Errorf("K %s: vhostdm reads md5 %s, the kernel wrote %q", a.key, h, got["KMD5 "+a.key])
		}
		if a.typ != "raid0" {
			waitSettled(t, d)
			if _, err := d.Message(0, []string{"check"}); err != nil {
				t.Fatal(err)
			}
			if f := strings.Fields(waitSettled(t, d)); f[5] != "0" {
				t.Errorf("K %s: vhostdm's check of the kernel's copies: %v", a.key, f)
			}
		}
		if err := m.Remove(d.Name(), false); err != nil {
			t.Fatal(err)
		}
		if a.typ != "raid0" && a.missing >= 0 {
			d = create(t, m, "zk_"+a.key, a.table("k", firsts[a.key], a.missing))
			if h := md5Of(t, d); h != got["KMD5 "+a.key] {
				t.Errorf("K %s leg %d missing: vhostdm reads md5 %s degraded, the kernel wrote %q", a.key, a.missing, h, got["KMD5 "+a.key])
			}
			if err := m.Remove(d.Name(), false); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// writeAt writes data at byte off of the file at path.
func writeAt(t *testing.T, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
}
