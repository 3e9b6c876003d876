package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

func TestMain(m *testing.M) {
	code := m.Run()
	stopCeph()
	harness.Cleanup()
	os.Exit(code)
}

// guestTimeout bounds one guest run; TCG boots take about 10 s here.
const guestTimeout = 3 * time.Minute

// needEnv returns the environment or fails the test with how to fix it.
func needEnv(t *testing.T) *harness.Env {
	t.Helper()
	e, err := harness.FindEnv()
	if err != nil {
		t.Fatalf("the e2e suite needs QEMU, qemu-storage-daemon and a kernel: %v", err)
	}
	return e
}

// sockDir returns a short temporary directory for unix sockets (their
// paths must stay under 108 bytes, which t.TempDir's may not).
func sockDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vdm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// sparse creates a sparse file of size bytes.
func sparse(t *testing.T, path string, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// startQSD starts qemu-storage-daemon and stops it at the end of the test.
func startQSD(t *testing.T, e *harness.Env, exports []harness.QSDExport, qmp string) *harness.Process {
	t.Helper()
	p, err := e.StartQSD(exports, qmp)
	if err != nil {
		t.Fatalf("qemu-storage-daemon: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() && p.Alive() {
			t.Logf("qemu-storage-daemon threads:\n%s", harness.ThreadStacks(p.Pid()))
		}
		p.Stop()
		if t.Failed() {
			t.Logf("qemu-storage-daemon log:\n%s", tail(p.Log(), 40))
		}
	})
	return p
}

// writeConfig writes cfg into dir/vm.toml.
func writeConfig(t *testing.T, dir string, cfg *harness.Config) string {
	t.Helper()
	path := filepath.Join(dir, "vm.toml")
	if err := cfg.Write(path); err != nil {
		t.Fatal(err)
	}
	return path
}

// startVhostdm starts `vhostdm serve -c config` and stops it at the end.
func startVhostdm(t *testing.T, e *harness.Env, config string) *harness.Process {
	t.Helper()
	p, err := e.StartVhostdm(config)
	if err != nil {
		t.Fatalf("%v\n(the daemon comes from cmd/vhostdm and package vhost; this test needs `vhostdm serve -c FILE` to serve the config's exports)", err)
	}
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("vhostdm log:\n%s", tail(p.Log(), 60))
		}
	})
	return p
}

// startVM boots a guest and kills it at the end of the test.
func startVM(t *testing.T, e *harness.Env, cfg harness.VMConfig) *harness.VM {
	t.Helper()
	vm, err := e.StartVM(cfg)
	if err != nil {
		t.Fatalf("start QEMU: %v", err)
	}
	t.Cleanup(func() {
		vm.Kill()
		if t.Failed() {
			saveConsole(t, vm)
		}
	})
	return vm
}

// saveConsole writes the guest console next to the test's temp files and
// logs where.
func saveConsole(t *testing.T, vm *harness.VM) {
	dir := os.Getenv("VHOSTDM_E2E_LOGDIR")
	if dir == "" {
		dir = os.TempDir()
	}
	name := filepath.Join(dir, "vhostdm-e2e-"+strings.ReplaceAll(t.Name(), "/", "_")+".console")
	if err := os.WriteFile(name, []byte(vm.CommandLine()+"\n\n"+vm.Console()), 0o644); err == nil {
		t.Logf("guest console saved in %s", name)
	}
}

// runGuest boots a guest, waits for it to power off and fails the test on
// any failed step. It logs boot time and per-step wall times.
func runGuest(t *testing.T, e *harness.Env, cfg harness.VMConfig) *harness.Run {
	t.Helper()
	vm := startVM(t, e, cfg)
	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatalf("guest run: %v", err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("guest steps failed:\n%s", f)
	}
	return run
}

// logRun logs the timings of a run.
func logRun(t *testing.T, run *harness.Run) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "boot (QEMU start to first result line) %v; QEMU wall %v", run.BootTime.Round(time.Millisecond), run.Wall.Round(time.Millisecond))
	if run.Begin != nil {
		fmt.Fprintf(&b, "; guest kernel %s, uptime at begin %d ms", run.Begin.Kernel, run.Begin.UptimeMS)
	}
	for _, r := range run.Results {
		fmt.Fprintf(&b, "\n  step %-11s %-4s %6d ms ok=%v", r.Step, r.Disk, r.MS, r.OK)
		if len(r.Values) > 0 {
			fmt.Fprintf(&b, " %v", r.Values)
		}
	}
	t.Log(b.String())
}

// info returns the info result of a disk.
func info(t *testing.T, run *harness.Run, disk string) *proto.DiskInfo {
	t.Helper()
	r := run.Result(proto.StepInfo, disk)
	if r == nil || r.Info == nil {
		t.Fatalf("the guest reported no info for %s", disk)
	}
	return r.Info
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
