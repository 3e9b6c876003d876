package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// Soak knobs (environment), for the long version of TestFioSoak by hand.
const (
	soakRunsEnv    = "VHOSTDM_E2E_SOAK_RUNS"    // guest boots per back end (1)
	soakRuntimeEnv = "VHOSTDM_E2E_SOAK_RUNTIME" // seconds per fio job (3)
	soakMaxCPUsEnv = "VHOSTDM_E2E_SOAK_MAXCPUS" // QEMU -smp maxcpus (harness default: 2)
)

// renotifyLine is what vhostdm logs when a queue had to signal a driver
// again for completions it published a second earlier (vhost, renotify).
const renotifyLine = "driver has not consumed published completions"

// TestFioSoak boots guests that run random 4 KiB reads and writes at
// queue depth 16 (fio, one vCPU, one queue) on qemu-storage-daemon and on
// vhostdm, and fails if a guest does not finish: the I/O hang of issue 21,
// item 8. On a hang the harness's error carries QEMU's view of each
// virtqueue with the ring indexes read from guest memory and the verdict
// (LOST KICK or LOST INTERRUPT, harness.VM.VirtioState); the guest
// watchdog dumps the block queues and blocked tasks. On vhostdm it also
// fails if the daemon ever had to signal a queue again for an interrupt
// the guest missed (its lost-interrupt second look hides a lost interrupt
// from the guest, not from this test).
//
// The cause was QEMU's, not a back end's: a TCG guest with max_cpus 1 is
// translated without CF_PARALLEL, where the guest's "lock; addl" (Linux's
// x86 smp_mb(), hence virtio_mb()) is no barrier against the back-end
// process, so the driver and the device both read stale ring indexes
// (harness.Env.QEMUArgs has the references). The harness boots every guest
// with maxcpus >= 2. In CI this runs once per back end with 3 s jobs (about
// a minute per boot on the shared host). The long version, by hand:
//
//	VHOSTDM_E2E_SOAK_RUNS=10 VHOSTDM_E2E_SOAK_RUNTIME=20 go test ./test/e2e -run TestFioSoak -v -timeout 90m
//
// Measured on the shared 2-core host (load 16-25), qemu-storage-daemon,
// 2 jobs of 20 s a boot: with maxcpus 1 (VHOSTDM_E2E_SOAK_MAXCPUS=1, the
// harness's old command line) 1 boot of 8 stopped with
// "LOST INTERRUPT: used.idx passed used_event by 16" (16 completions
// published, the guest, alive and idle, never told); with maxcpus 2, 0 such
// hangs in 12 boots. One boot of each stopped printing altogether before
// the harness captured vCPU state; at load 30 guests time out while still
// booting (a vCPU busy unpacking the initramfs), which Wait now tells from a
// hang (VM.Busy).
func TestFioSoak(t *testing.T) {
	e := needEnv(t)
	if e.Fio == "" {
		t.Fatalf("fio not found in PATH: %s", harness.SetupHint)
	}
	runs, runtime, maxCPUs := envInt(t, soakRunsEnv, 1), envInt(t, soakRuntimeEnv, 3), envInt(t, soakMaxCPUsEnv, 0)
	const size = 64 << 20
	dir, sd := t.TempDir(), sockDir(t)
	img := filepath.Join(dir, "soak.img")
	fill := make([]byte, size)
	pattern.Fill(fill, 21, 0)
	if err := os.WriteFile(img, fill, 0o644); err != nil {
		t.Fatal(err)
	}
	vm := harness.VMConfig{
		MaxCPUs: maxCPUs,
		Steps:   []string{proto.StepFio},
		Fio:     true,
		Params: map[string]string{proto.ParamFioRuntime: strconv.Itoa(runtime),
			proto.ParamFioJobs: "randread-4k,randwrite-4k", proto.ParamWatchdog: "30"},
	}
	soak := func(t *testing.T, sock string) {
		vm.Disks = []harness.Disk{{Socket: sock, NumQueues: 1}}
		for i := range runs {
			t0 := time.Now()
			run := runGuest(t, e, vm)
			jobs := 0
			for _, r := range run.Results {
				if r.Fio != nil && r.Fio.Errors == 0 {
					jobs++
				}
			}
			if jobs != 2 {
				t.Fatalf("boot %d: %d fio jobs without error, want 2", i+1, jobs)
			}
			t.Logf("boot %d of %d passed in %v", i+1, runs, time.Since(t0).Round(time.Second))
		}
	}
	t.Run("qemu-storage-daemon", func(t *testing.T) {
		sock := filepath.Join(sd, "qsd.sock")
		p := startQSD(t, e, []harness.QSDExport{{ID: "e0", Image: img, Socket: sock, NumQueues: 1, Writable: true}}, "")
		soak(t, sock)
		p.Stop() // release the image's lock before vhostdm opens it
	})
	t.Run("vhostdm", func(t *testing.T) {
		cfg := &harness.Config{
			Devices: []harness.DeviceConfig{{Name: "soak", Table: fmt.Sprintf("0 %d linear %s 0", size/512, img)}},
			Exports: []harness.ExportConfig{{ID: "soak", Device: "soak", Socket: filepath.Join(sd, "vdm.sock"),
				NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "soak"}},
		}
		p := startVhostdm(t, e, writeConfig(t, dir, cfg))
		soak(t, cfg.Exports[0].Socket)
		checkNoRenotify(t, p)
	})
}

// envInt returns the integer value of an environment variable, or def.
func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		t.Fatalf("%s=%q: want a non-negative integer", name, v)
	}
	return n
}

// checkNoRenotify fails the test if vhostdm had to signal a queue again
// because the guest driver had not consumed completions published a
// second earlier: a lost interrupt, which the daemon recovers from but a
// healthy guest never needs.
func checkNoRenotify(t *testing.T, p *harness.Process) {
	t.Helper()
	if log := p.Log(); strings.Contains(log, renotifyLine) {
		t.Errorf("vhostdm had to signal a queue again for an interrupt the guest missed (%d times):\n%s",
			strings.Count(log, renotifyLine), tail(log, 40))
	}
}
