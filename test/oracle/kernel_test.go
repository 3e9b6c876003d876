package oracle

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

var record = flag.Bool("oracle.record", false, "write the kernel's answers into the golden and vector files instead of checking them")

// goldenFiles are the files whose kernel answers this test records and
// re-verifies; vectorsFile holds the crypt known-answer vectors.
var goldenFiles = []string{
	"../../targets/testdata/delay",
	"../../targets/testdata/flakey",
	"../../targets/testdata/crypt",
	"../../targets/multipath/testdata/multipath",
}

const vectorsFile = "../../targets/testdata/crypt_vectors"

// kernelKeys are the answer keys the kernel owns.
var kernelKeys = []string{"status", "table", "showkeys", "error"}

// TestKernel boots the real kernel once and runs every golden case and
// crypt vector against its device-mapper: the answers must be what the
// files say (with -oracle.record, they are written into the files).
func TestKernel(t *testing.T) {
	dir := t.TempDir()
	start := time.Now()
	g, err := NewGuest(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := make([]*Golden, len(goldenFiles))
	for i, p := range goldenFiles {
		if files[i], err = ParseGolden(p); err != nil {
			t.Fatal(err)
		}
	}
	vheader, vectors, err := ParseVectors(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}

	var disks []string
	mk := func(name string, data []byte, size int64) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		disks = append(disks, p)
		return p
	}
	for i := 0; i < GoldenDisks; i++ {
		mk(fmt.Sprintf("golden%d.img", i), nil, GoldenDiskBytes)
	}
	mk("cipher.img", nil, int64(len(vectors)+1)*VectorArea*512)
	mk("plain.img", Plaintext(VectorArea*512), VectorArea*512)
	cipherDev := DiskName(GoldenDisks)
	plainDev := DiskName(GoldenDisks + 1)

	var sc strings.Builder
	sc.WriteString(guestHelpers)
	for fi, f := range files {
		for ci, c := range f.Cases {
			tag := fmt.Sprintf("@@ %d %d", fi, ci)
			switch c.Cmd {
			case "load":
				fmt.Fprintf(&sc, "load '%s' '%s'\n", tag, strings.Join(c.Input, "\n"))
			case "message":
				fmt.Fprintf(&sc, "msg '%s' %s\n", tag, strings.Join(c.Args, " "))
			case "read":
				fmt.Fprintf(&sc, "rd '%s'\n", tag)
			}
		}
		sc.WriteString("dmsetup remove t 2>/dev/null\n")
	}
	for i, v := range vectors {
		fmt.Fprintf(&sc, "vec %d '%s' %d %d %s %s\n", i, fixOffset(v, i, cipherDev), i*VectorArea, v.Sectors, devNode(cipherDev), devNode(plainDev))
	}
	t.Logf("guest script: %d golden files, %d vectors; initramfs built in %v", len(files), len(vectors), time.Since(start))

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start = time.Now()
	out, err := g.Run(ctx, sc.String(), disks)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest ran in %v", time.Since(start))

	// Collect the answers.
	answers := map[[2]int][]KV{}
	digests := map[int]string{}
	for _, line := range strings.Split(out, "\n") {
		if m := answerLine.FindStringSubmatch(line); m != nil {
			fi, _ := strconv.Atoi(m[1])
			ci, _ := strconv.Atoi(m[2])
			answers[[2]int{fi, ci}] = append(answers[[2]int{fi, ci}], KV{m[3], strings.TrimRight(m[4], " ")})
		} else if m := vectorLine.FindStringSubmatch(line); m != nil {
			i, _ := strconv.Atoi(m[1])
			digests[i] = m[2]
		}
	}
	kernel := "# kernel: Linux " + g.Release + " in a QEMU TCG guest, recorded by go test ./test/oracle -oracle.record"
	for fi, f := range files {
		for ci, c := range f.Cases {
			got := answers[[2]int{fi, ci}]
			if len(got) == 0 {
				t.Errorf("%s:%d: the guest gave no answer (output:\n%s)", goldenFiles[fi], c.Line, out)
				continue
			}
			// showkeys is only kept where it differs from table.
			if slices.Equal(valuesOf(got, "showkeys"), valuesOf(got, "table")) {
				got = slices.DeleteFunc(got, func(kv KV) bool { return kv.Key == "showkeys" })
			}
			if *record {
				keep := slices.DeleteFunc(slices.Clone(c.Want), func(kv KV) bool { return slices.Contains(kernelKeys, kv.Key) })
				c.Want = append(got, keep...)
				continue
			}
			for _, k := range kernelKeys {
				if w, g := c.Get(k), valuesOf(got, k); !slices.Equal(w, g) {
					t.Errorf("%s:%d: kernel %s:\n got  %q\n file %q", goldenFiles[fi], c.Line, k, g, w)
				}
			}
		}
		if *record {
			f.Header = setKernelHeader(f.Header, kernel)
			if err := os.WriteFile(goldenFiles[fi], []byte(f.Format()), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := range vectors {
		d, ok := digests[i]
		switch {
		case !ok:
			t.Errorf("%s:%d: the guest gave no digest", vectorsFile, vectors[i].Line)
		case *record:
			vectors[i].Digest = d
		case d != vectors[i].Digest:
			t.Errorf("%s:%d: kernel ciphertext sha256 %s, file says %s", vectorsFile, vectors[i].Line, d, vectors[i].Digest)
		}
	}
	if *record {
		if err := os.WriteFile(vectorsFile, []byte(FormatVectors(setKernelHeader(vheader, kernel), vectors)), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("recorded %d golden files and %s", len(files), vectorsFile)
	}
}

func valuesOf(kvs []KV, key string) []string {
	var out []string
	for _, kv := range kvs {
		if kv.Key == key {
			out = append(out, kv.Val)
		}
	}
	return out
}

func setKernelHeader(h []string, line string) []string {
	h = slices.DeleteFunc(slices.Clone(h), func(s string) bool { return strings.HasPrefix(s, "# kernel:") })
	return append(h, line)
}

// devNode returns the guest's node name for a golden disk name.
func devNode(name string) string {
	n, _ := strconv.Atoi(strings.TrimPrefix(name, "254:"))
	return "vd" + string(rune('a'+n/16))
}

// fixOffset returns vector i's table with its ciphertext area on dev.
func fixOffset(v Vector, i int, dev string) string {
	parts := append([]string{fmt.Sprintf("0 %d crypt", v.Sectors)}, v.Args[:3]...)
	parts = append(parts, "/dev/"+devNode(dev), strconv.Itoa(i*VectorArea))
	parts = append(parts, v.Args[3:]...)
	return strings.Join(parts, " ")
}

var (
	answerLine = regexp.MustCompile(`^@@ (\d+) (\d+) (\w+): ?(.*)$`)
	vectorLine = regexp.MustCompile(`^@@V (\d+) ([0-9a-f]{64})`)
)

// guestHelpers are the shell functions the generated script calls. Each
// prints "@@ <file> <case> <key>: <value>" lines.
const guestHelpers = `
answer() { # tag: print status, table and showkeys lines of t
	dmsetup status t | sed "s/^/$1 status: /"
	dmsetup table t | sed "s/^/$1 table: /"
	dmsetup table --showkeys t | sed "s/^/$1 showkeys: /"
}
kerr() { # tag: print the kernel's reason for the last failure
	e=$(dmesg -c | sed -n 's/.*device-mapper: table: [0-9]*:[0-9]*: //p' | head -1)
	[ -z "$e" ] && e=$(dmesg | sed -n 's/.*device-mapper: //p' | tail -1)
	[ -z "$e" ] && e=$(head -1 /tmp/o)
	echo "$1 error: $e"
}
load() {
	dmsetup remove t 2>/dev/null; dmesg -c >/dev/null
	if dmsetup create t --table "$2" >/tmp/o 2>&1; then dmsetup mknodes t; answer "$1"; else kerr "$1"; fi
}
msg() {
	tag=$1; shift; dmesg -c >/dev/null
	if dmsetup message t "$@" >/tmp/o 2>&1; then answer "$tag"; else kerr "$tag"; fi
}
rd() {
	dd if=/dev/mapper/t of=/dev/null bs=4096 count=1 2>/dev/null; answer "$1"
}
vec() { # index table offset sectors cipherdev plaindev
	dmsetup remove cv 2>/dev/null
	if ! dmsetup create cv --table "$2" >/tmp/o 2>&1; then echo "@@V $1 failed: $(cat /tmp/o) $(dmesg -c | tail -2)"; return; fi
	dmsetup mknodes cv
	dd if=/dev/$6 of=/dev/mapper/cv bs=512 count=$4 2>/dev/null; sync
	dmsetup remove cv; echo 3 > /proc/sys/vm/drop_caches
	echo "@@V $1 $(dd if=/dev/$5 bs=512 skip=$3 count=$4 2>/dev/null | sha256sum | cut -d' ' -f1)"
}
`
