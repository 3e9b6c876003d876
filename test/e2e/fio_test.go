package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// fioRun is one back end's fio figures.
type fioRun struct {
	Backend string          `json:"backend"`
	Boot    string          `json:"boot"`
	Jobs    []*proto.FioJob `json:"jobs"`
}

// runFio boots a guest with fio on one disk and returns its jobs.
func runFio(t *testing.T, e *harness.Env, name string, disk harness.Disk) fioRun {
	t.Helper()
	run := runGuest(t, e, harness.VMConfig{
		Disks:  []harness.Disk{disk},
		Steps:  []string{proto.StepFio},
		Fio:    true,
		Params: map[string]string{proto.ParamFioRuntime: "5"},
	})
	fr := fioRun{Backend: name, Boot: run.BootTime.Round(time.Millisecond).String()}
	for _, r := range run.Results {
		if r.Step == proto.StepFio && r.Fio != nil {
			fr.Jobs = append(fr.Jobs, r.Fio)
		}
	}
	if len(fr.Jobs) != len(proto.FioJobs) {
		t.Fatalf("%s: %d fio jobs reported, want %d", name, len(fr.Jobs), len(proto.FioJobs))
	}
	return fr
}

// TestFioVhostdmVsQSD runs the same fio jobs in a guest through
// qemu-storage-daemon and through vhostdm, one after the other on the same
// image in the same run, and logs both sets of figures (and writes them as
// JSON to $VHOSTDM_E2E_FIO_JSON or $TMPDIR/vhostdm-e2e-fio.json). It
// asserts that every job ran without error, never a speed.
func TestFioVhostdmVsQSD(t *testing.T) {
	e := needEnv(t)
	if e.Fio == "" {
		t.Fatalf("fio not found in PATH: %s", harness.SetupHint)
	}
	const size = 128 << 20
	dir, sd := t.TempDir(), sockDir(t)
	// Fill the image first so both back ends read allocated (and, on
	// this host, cached) data, not holes; fio's writes then change nothing
	// for the second run.
	img := filepath.Join(dir, "fio.img")
	fill := make([]byte, size)
	pattern.Fill(fill, 77, 0)
	if err := os.WriteFile(img, fill, 0o644); err != nil {
		t.Fatal(err)
	}
	var runs []fioRun
	t.Run("qemu-storage-daemon", func(t *testing.T) {
		sock := filepath.Join(sd, "qsd.sock")
		p := startQSD(t, e, []harness.QSDExport{{ID: "e0", Image: img, Socket: sock, NumQueues: 1, Writable: true}}, "")
		runs = append(runs, runFio(t, e, "qemu-storage-daemon", harness.Disk{Socket: sock, NumQueues: 1}))
		p.Stop() // release the image's lock before vhostdm opens it
	})
	t.Run("vhostdm", func(t *testing.T) {
		cfg := &harness.Config{
			Devices: []harness.DeviceConfig{{Name: "fio", Table: fmt.Sprintf("0 %d linear %s 0", size/512, img)}},
			Exports: []harness.ExportConfig{{ID: "fio0", Device: "fio", Socket: filepath.Join(sd, "vdm.sock"),
				NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "fio"}},
		}
		p := startVhostdm(t, e, writeConfig(t, dir, cfg))
		runs = append(runs, runFio(t, e, "vhostdm", harness.Disk{Socket: cfg.Exports[0].Socket, NumQueues: 1}))
		checkNoRenotify(t, p)
	})
	var b strings.Builder
	fmt.Fprintf(&b, "fio in a TCG guest (1 vCPU, direct=1, 5 s per job), same pre-filled image, same run; the CPUs are shared, so compare within one run only:\n")
	fmt.Fprintf(&b, "%-20s %-13s %-7s %10s %10s %12s %12s\n", "back end", "job", "engine", "IOPS", "MiB/s", "lat mean us", "lat p99 us")
	for _, r := range runs {
		for _, j := range r.Jobs {
			fmt.Fprintf(&b, "%-20s %-13s %-7s %10.0f %10.1f %12.0f %12.0f\n", r.Backend, j.Name, j.Engine,
				j.IOPS, float64(j.BWKiBps)/1024, j.LatMeanU, j.LatP99U)
		}
	}
	t.Log(b.String())
	out := os.Getenv("VHOSTDM_E2E_FIO_JSON")
	if out == "" {
		out = filepath.Join(os.TempDir(), "vhostdm-e2e-fio.json")
	}
	js, _ := json.MarshalIndent(map[string]any{"time": time.Now().UTC().Format(time.RFC3339), "runs": runs}, "", "  ")
	if err := os.WriteFile(out, js, 0o644); err != nil {
		t.Errorf("write %s: %v", out, err)
	} else {
		t.Logf("fio figures written to %s", out)
	}
}
