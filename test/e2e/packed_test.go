package e2e

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// TestPackedRingCrashRestart boots a guest whose disk uses packed
// virtqueues (QEMU packed=on, 2 queues, every request delayed 100 ms in
// the back end), runs the verified writer, kills vhostdm with SIGKILL
// twice under it while the writer's writes are in the back end, and
// restarts it on the same socket: QEMU reconnects and hands back the
// inflight region, vhostdm takes both ring positions from it (QEMU's vring
// base is the one it had when the killed process started) and resubmits
// what was in flight, and the guest sees no I/O error; its read-back and
// the host's check of the image find exactly the last write in every block.
func TestPackedRingCrashRestart(t *testing.T) {
	e := needEnv(t)
	cfg, img := linearConfig(t, 32<<20, true, "e2e-packed")
	cfg.Exports[0].NumQueues = 2
	// Every request waits 100 ms in the back end (dm-delay), so that the
	// kills find the writer's requests in flight.
	cfg.Devices[0].Table = fmt.Sprintf("0 %d delay %s 0 100", (32<<20)/512, img)
	writeConfig(t, cfg.Dir, cfg)
	be := startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	disks := disksOf(cfg)
	disks[0].Packed = true
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disks,
		CPUs:   2, // writes from both CPUs go to both queues
		Steps:  []string{proto.StepWriter},
		Params: writerParams(20),
	})
	acked := waitFlushes(t, vm, 3, guestTimeout, "the writer's first flushes")
	for round := 1; round <= 2; round++ {
		// The writer reported a flush and goes on writing: its next
		// writes reach the back end, where they wait 100 ms.
		time.Sleep(40 * time.Millisecond)
		t.Logf("crash %d: writer at %d acknowledged writes: kill -9 vhostdm", round, acked)
		killed := time.Now()
		be.Kill()
		time.Sleep(300 * time.Millisecond)
		if err := be.Start(15 * time.Second); err != nil {
			t.Fatalf("restart vhostdm on the same socket: %v", err)
		}
		acked = waitFlushes(t, vm, 3, 90*time.Second, "flushes after vhostdm restarted (QEMU reconnect + in-flight resubmission)")
		t.Logf("crash %d: writer progressed to %d acknowledged writes %v after the kill", round, acked, time.Since(killed).Round(time.Millisecond))
	}
	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("the guest saw the back-end crash:\n%s", f)
	}
	res := run.Result(proto.StepWriter, "")
	if res == nil {
		t.Fatal("no final writer result")
	}
	t.Logf("writer: %v", res.Values)
	for _, err := range harness.CheckWriterExact(readFile(t, img)(), writerSeed, res.Values["writes"]) {
		t.Errorf("host check after the run: %v", err)
	}
	log := be.Log()
	if !strings.Contains(log, "packed virtqueue started") {
		t.Fatalf("vhostdm never started a packed virtqueue: QEMU did not negotiate VIRTIO_F_RING_PACKED\n%s", tail(log, 40))
	}
	if strings.Contains(log, "virtqueue stopped") || strings.Contains(log, "inflight region unusable") {
		t.Fatalf("vhostdm reported a broken ring or region:\n%s", tail(log, 60))
	}
	resubmitted := 0
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "inflight region recovered") {
			t.Log(l)
			if _, after, ok := strings.Cut(l, " resubmit="); ok {
				n, _ := strconv.Atoi(strings.Fields(after)[0])
				resubmitted += n
			}
		}
	}
	if resubmitted == 0 {
		t.Fatal("no request was in flight at either kill: the test did not exercise resubmission on a packed ring")
	}
}
