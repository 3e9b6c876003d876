package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// TestDiscardCapability boots a guest on a linear export and a raid5
// export: the guest's kernel sees discard on the linear disk and none on
// the raid5 one (VIRTIO_BLK_F_DISCARD is offered only when every target
// serves discards). Then the host reloads the linear device onto raid5
// while the guest runs, without a reboot: the guest's next discards are
// answered VIRTIO_BLK_S_UNSUPP, which its kernel logs as "operation not
// supported error, dev vda" (and BLKDISCARD, a hint, returns 0), never an
// I/O error.
func TestDiscardCapability(t *testing.T) {
	e := needEnv(t)
	const size = 32 << 20
	dir, sd := t.TempDir(), sockDir(t)
	lin := sparse(t, filepath.Join(dir, "lin.img"), size)
	raid5 := func(prefix string) string {
		var m []string
		for i := range 3 {
			m = append(m, "-", sparse(t, filepath.Join(dir, fmt.Sprintf("%s%d.img", prefix, i)), size/2))
		}
		return fmt.Sprintf("0 %d raid raid5_ls 2 64 nosync 3 %s", size/512, strings.Join(m, " "))
	}
	cfg := &harness.Config{
		QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{
			{Name: "d0", Table: fmt.Sprintf("0 %d linear %s 0", size/512, lin)},
			{Name: "d1", Table: raid5("a")},
		},
		Exports: []harness.ExportConfig{
			{ID: "x0", Device: "d0", Socket: filepath.Join(sd, "x0.sock"), NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "lin"},
			{ID: "x1", Device: "d1", Socket: filepath.Join(sd, "x1.sock"), NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "r5"},
		},
	}
	writeConfig(t, dir, cfg)
	d := startVhostdm(t, e, filepath.Join(dir, "vm.toml"))
	bin, err := e.Vhostdm()
	if err != nil {
		t.Fatal(err)
	}
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepInfo, proto.StepDiscardWatch + "@vda"},
		Params: map[string]string{proto.ParamDisks: "2", proto.ParamResizeTimeout: "120"},
	})
	// The info results come before the watch is ready.
	infos := map[string]*proto.DiskInfo{}
	if _, err := vm.WaitFor(guestTimeout, "the discard watch to be ready", func(ev harness.Event) bool {
		if ev.Kind == harness.EventResult && ev.Result.Step == proto.StepInfo && ev.Result.Info != nil {
			infos[ev.Result.Info.Serial] = ev.Result.Info
		}
		return ev.Kind == harness.EventResult && ev.Result.Event == "ready"
	}); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "ctl", "--qmp", cfg.QMP.Socket, "reload", "d0", "--table", raid5("b")).CombinedOutput()
	if err != nil {
		t.Fatalf("reload: %v: %s", err, out)
	}
	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatal(err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("guest: %s", f)
	}
	for _, c := range []struct {
		serial  string
		discard bool
	}{{"lin", true}, {"r5", false}} {
		info := infos[c.serial]
		if info == nil {
			t.Fatalf("no info result for the disk with serial %s", c.serial)
		}
		if got := info.DiscardMaxBytes > 0; got != c.discard {
			t.Errorf("disk %s (%s): discard_max_bytes %d, want discard %v", info.Name, c.serial, info.DiscardMaxBytes, c.discard)
		}
		if info.WriteZeroesMax == 0 {
			t.Errorf("disk %s (%s): no write-zeroes; every target here serves them", info.Name, c.serial)
		}
	}
	r := run.Result(proto.StepDiscardWatch, "vda")
	if r == nil || !r.OK {
		t.Fatalf("discard watch: %+v", r)
	}
	t.Logf("the guest's kernel logged a discard refused as not supported %d ms after the watch started (%d tries)", r.Values["wait_ms"], r.Values["tries"])
	if !strings.Contains(d.Log(), "discard support changed") {
		t.Errorf("vhostdm did not log the change of discard support")
	}
}
