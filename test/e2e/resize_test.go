package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// TestHarnessResizeOnQSD proves the guest's resize watch with
// qemu-storage-daemon: block_resize over QMP grows the export, the back end
// sends a config-change message, the guest sees the new capacity and writes
// the new space, which the host then finds in the image. vhostdm's QMP
// tests (dm-load + dm-resume growing a device) use the same guest step.
func TestHarnessResizeOnQSD(t *testing.T) {
	e := needEnv(t)
	const oldSize, newSize, seed = 32 << 20, 48 << 20, 6006
	dir, sd := t.TempDir(), sockDir(t)
	img := sparse(t, filepath.Join(dir, "disk.img"), oldSize)
	sock, qmpSock := filepath.Join(sd, "q.sock"), filepath.Join(sd, "qmp.sock")
	startQSD(t, e, []harness.QSDExport{{ID: "e0", Image: img, Socket: sock, NumQueues: 1, Writable: true}}, qmpSock)
	vm := startVM(t, e, harness.VMConfig{
		Disks:  []harness.Disk{{Socket: sock, NumQueues: 1}},
		Steps:  []string{proto.StepResize},
		Params: map[string]string{proto.ParamSeed: strconv.Itoa(seed), proto.ParamResizeTimeout: "120"},
	})
	if _, err := vm.WaitFor(guestTimeout, "the resize step to be ready", func(ev harness.Event) bool {
		return ev.Kind == harness.EventResult && ev.Result.Event == "ready"
	}); err != nil {
		t.Fatal(err)
	}
	q, err := harness.DialQMP(qmpSock, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if _, err := q.Execute("block_resize", map[string]any{"node-name": "f0", "size": newSize}, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatal(err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("guest: %s", f)
	}
	r := run.Result(proto.StepResize, "vda")
	if r == nil || r.Values["new_sectors"] != newSize/512 {
		t.Fatalf("guest resize result %+v, want new_sectors %d", r, newSize/512)
	}
	checkNewSpace(t, img, oldSize, newSize, seed)
}

// TestResizeViaQMP grows a vhostdm device live over QMP (dm-load a longer
// table, dm-suspend, dm-resume): the export announces the new capacity
// with a config-change message, the guest's resize watch sees it and
// writes the new space, and the host finds that data in the image.
func TestResizeViaQMP(t *testing.T) {
	e := needEnv(t)
	const oldSize, newSize, seed = 32 << 20, 48 << 20, 7007
	cfg, img := linearConfig(t, oldSize, true, "e2e-resize")
	if err := os.Truncate(img, newSize); err != nil {
		t.Fatal(err)
	}
	startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepResize},
		Params: map[string]string{proto.ParamSeed: strconv.Itoa(seed), proto.ParamResizeTimeout: "120"},
	})
	if _, err := vm.WaitFor(guestTimeout, "the resize step to be ready", func(ev harness.Event) bool {
		return ev.Kind == harness.EventResult && ev.Result.Event == "ready"
	}); err != nil {
		t.Fatal(err)
	}
	q, err := harness.DialQMP(cfg.QMP.Socket, 10*time.Second)
	if err != nil {
		t.Fatalf("vhostdm's QMP socket: %v", err)
	}
	defer q.Close()
	table := "0 " + strconv.Itoa(newSize/512) + " linear " + img + " 0"
	for _, c := range []struct {
		cmd  string
		args map[string]any
	}{
		{"dm-load", map[string]any{"name": "d0", "table": table}},
		{"dm-suspend", map[string]any{"name": "d0"}},
		{"dm-resume", map[string]any{"name": "d0"}},
	} {
		if _, err := q.Execute(c.cmd, c.args, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatal(err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("guest: %s", f)
	}
	r := run.Result(proto.StepResize, "vda")
	if r == nil || r.Values["new_sectors"] != newSize/512 {
		t.Fatalf("guest resize result %+v, want new_sectors %d", r, newSize/512)
	}
	checkNewSpace(t, img, oldSize, newSize, seed)
}

// checkNewSpace checks, in the image, the blocks the guest's resize step
// wrote in the new space: its first, middle and last block.
func checkNewSpace(t *testing.T, img string, oldSize, newSize int64, seed uint64) {
	t.Helper()
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	lo, hi := oldSize/pattern.BlockSize, newSize/pattern.BlockSize
	for _, b := range []int64{lo, (lo + hi) / 2, hi - 1} {
		x := pattern.Extent{Off: b * pattern.BlockSize, Len: pattern.BlockSize}
		if err := harness.CheckExtentPattern(data, x, seed); err != nil {
			t.Errorf("new space on the host: %v", err)
		}
	}
}
