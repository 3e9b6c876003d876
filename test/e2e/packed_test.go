package e2e

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestPackedRingCrashRestart boots a guest whose disk uses packed
// virtqueues (QEMU packed=on, 2 queues), runs the verified writer, kills
// vhostdm with SIGKILL twice under it with writes in flight and restarts it
// on the same socket: QEMU reconnects and hands back the inflight region,
// vhostdm takes both ring positions from it and resubmits what was in
// flight, and the guest sees no I/O error; its read-back and the host's
// check of the image find exactly the last write in every block.
func TestPackedRingCrashRestart(t *testing.T) {
	e := needEnv(t)
	cfg, img := linearConfig(t, 32<<20, true, "e2e-packed")
	cfg.Exports[0].NumQueues = 2
	writeConfig(t, cfg.Dir, cfg)
	be := startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	disks := disksOf(cfg)
	disks[0].Packed = true
	backendCrash(t, e, be, disks, readFile(t, img))
	log := be.Log()
	if !strings.Contains(log, "packed virtqueue started") {
		t.Fatalf("vhostdm never started a packed virtqueue: QEMU did not negotiate VIRTIO_F_RING_PACKED\n%s", tail(log, 40))
	}
	if strings.Contains(log, "virtqueue stopped") || strings.Contains(log, "inflight region unusable") {
		t.Fatalf("vhostdm reported a broken ring or region:\n%s", tail(log, 60))
	}
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "inflight region recovered") {
			t.Log(l)
		}
	}
}
