package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// nbdTool runs a backup tool and returns its output, failing loudly when
// it is missing or fails.
func nbdTool(t *testing.T, pkg, name string, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s not found: install the Debian package %s (scripts/setup.sh)", name, pkg)
	}
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestNBDIncrementalAfterGuest: a real guest writes the verify pattern
// through vhost-user-blk while a dirty bitmap records; nbdinfo
// --map=qemu:dirty-bitmap:b0 over vhostdm's NBD export then names exactly
// the 64 KiB chunks the guest changed, and an empty full backup plus the
// chunks read with qemu-img dd equals the disk (qemu-img compare agrees).
func TestNBDIncrementalAfterGuest(t *testing.T) {
	e := needEnv(t)
	const size, gran, seed = 32 << 20, 65536, 9009
	cfg, img := linearConfig(t, size, true, "nbd-e2e")
	startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	q := dialQMP(t, cfg.QMP.Socket, "vhostdm")
	qmpDo(t, q, "block-dirty-bitmap-add", map[string]any{"node": "d0", "name": "b0", "granularity": gran})
	runGuest(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepVerify},
		Params: seedParams(seed, 25, 64),
	})
	qmpDo(t, q, "block-dirty-bitmap-disable", map[string]any{"node": "d0", "name": "b0"})
	sock := filepath.Join(filepath.Dir(cfg.Exports[0].Socket), "nbd.sock")
	qmpDo(t, q, "block-export-add", map[string]any{"type": "nbd", "id": "inc", "node-name": "d0", "bitmaps": []string{"b0"},
		"addr": map[string]any{"type": "unix", "path": sock}})
	uri := "nbd+unix:///d0?socket=" + sock

	disk := mustRead(t, img)
	want := map[int64]bool{}
	for c := int64(0); c < size/gran; c++ {
		if !bytes.Equal(disk[c*gran:(c+1)*gran], make([]byte, gran)) {
			want[c] = true
		}
	}
	if len(want) == 0 {
		t.Fatal("the guest wrote nothing")
	}
	got := map[int64]bool{}
	sc := bufio.NewScanner(strings.NewReader(nbdTool(t, "libnbd-bin", "nbdinfo", "--map=qemu:dirty-bitmap:b0", uri)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 || f[2] != "1" {
			continue
		}
		off, _ := strconv.ParseInt(f[0], 10, 64)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		if off%gran != 0 || n%gran != 0 {
			t.Errorf("dirty extent %d+%d not at 64 KiB granularity", off, n)
		}
		for c := off / gran; c < (off+n)/gran; c++ {
			got[c] = true
		}
	}
	for c := range want {
		if !got[c] {
			t.Errorf("chunk %d changed by the guest but not dirty in b0", c)
		}
	}
	for c := range got {
		if !want[c] {
			t.Errorf("chunk %d dirty in b0 but the guest left it zero", c)
		}
	}
	t.Logf("guest changed %d chunks of 64 KiB; bitmap lists %d", len(want), len(got))

	rebuilt := make([]byte, size) // the full backup of the empty disk
	dir := t.TempDir()
	for c := range got {
		part := filepath.Join(dir, fmt.Sprint(c))
		nbdTool(t, "qemu-utils", "qemu-img", "dd", "-f", "raw", "-O", "raw", fmt.Sprintf("bs=%d", gran),
			fmt.Sprintf("skip=%d", c), fmt.Sprintf("count=%d", c+1), "if="+uri, "of="+part)
		copy(rebuilt[c*gran:], mustRead(t, part))
	}
	if !bytes.Equal(rebuilt, disk) {
		t.Fatal("empty full backup + increment differs from the disk")
	}
	out := filepath.Join(dir, "rebuilt.img")
	os.WriteFile(out, rebuilt, 0o644)
	nbdTool(t, "qemu-utils", "qemu-img", "compare", "-f", "raw", "-F", "raw", out, uri)
}
