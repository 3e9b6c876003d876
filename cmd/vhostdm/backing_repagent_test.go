package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/internal/looptest"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestBackingWrittenWhileStopped: a protected volume's image written by
// another program while `vhostdm serve` (a real child process) is
// stopped — a backup restored into it, say — would leave the hub's
// replica "protecting" and stale, since a clean stop tells the hub that
// nothing needs a resync. The agent sees the write (the record it keeps
// beside the activity log), reports the volume changed, and the hub
// compares every region by checksum and reads exactly those that differ;
// the untouched volume moves nothing, and replicas end identical. A
// restart with nothing written moves nothing.
func TestBackingWrittenWhileStopped(t *testing.T) { testBackingWrittenWhileStopped(t, false) }

// TestBackingBlockDeviceWrittenWhileStopped is TestBackingWrittenWhileStopped
// with the volumes on block devices (loop devices), whose nodes keep their
// times when written: the agent counts the device's writes as the kernel
// does. The restart with nothing written shows that the daemon's own
// buffered writes, written back after it closed the devices, are not taken
// for another program's.
func TestBackingBlockDeviceWrittenWhileStopped(t *testing.T) { testBackingWrittenWhileStopped(t, true) }

func testBackingWrittenWhileStopped(t *testing.T, block bool) {
	const (
		volBytes = 16 << 20
		region   = 64 << 10 // the default dirty-map region
	)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	// files: the images, in dir; images: where the volumes are written
	// and read (the files, or the loop devices over them).
	files, images := map[string]string{}, map[string]string{}
	text := fmt.Sprintf(crashRepConfig, addr, 6, volBytes/512, volBytes/512)
	for vol, n := range map[string]string{"a0": "a.img", "b0": "b.img"} {
		path := filepath.Join(dir, n)
		sparse(t, path, volBytes)
		files[vol], images[vol] = path, path
		if block {
			// The tables name the loop devices; the images are read
			// back through them (their page cache is the device's).
			images[vol] = looptest.Attach(t, path, 512)
			text = strings.Replace(text, "linear "+n, "linear "+images[vol], 1)
			// Another program holds the device open: the daemon's
			// close is not the last one, which would write the
			// device's page cache back by itself.
			f, err := os.Open(images[vol])
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
		}
	}
	// flusher writes back what a stopped daemon left in the page cache,
	// as the kernel's flusher threads would before the next start.
	flusher := func() {
		if block {
			unix.Sync()
		}
	}
	cfg := writeConfig(t, dir, text)
	qmpSock := filepath.Join(dir, "qmp.sock")

	child := startChild(t, cfg)
	waitHubProtecting(t, h, files, child)
	stop, count := startCrashWriters(t, dir, volBytes, 7)
	for deadline := time.Now().Add(15 * time.Second); count() < 100 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	quiesceMirrored(t, qmpSock)
	waitHubProtecting(t, h, files, child)
	checkReplicas(t, h, store, images, volBytes)
	child.stop(t)

	// What a clean stop left beside the activity log.
	var rec struct {
		Volumes map[string]struct {
			Stopped bool   `json:"stopped"`
			Changed string `json:"changed"`
		} `json:"volumes"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "vm1.actlog.backing"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatalf("the backing record: %v\n%s", err, b)
	}
	for _, vol := range []string{"a0", "b0"} {
		if v, ok := rec.Volumes[vol]; !ok || !v.Stopped || v.Changed != "" {
			t.Fatalf("after a clean stop the backing record holds %s as %+v (present %v), want stopped and unchanged:\n%s", vol, v, ok, b)
		}
	}

	// Another program writes three regions of a0's image or device.
	f, err := os.OpenFile(images["a0"], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	offs := []int64{1 << 20, 5<<20 + region, 9 << 20}
	for i, off := range offs {
		if _, err := f.WriteAt(reptest.Pattern(uint64(1000+i), region), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	flusher()
	child = startChild(t, cfg)
	waitHubProtecting(t, h, files, child)
	wantWrittenResync(t, h, qmpSock, images["a0"], uint64(len(offs)*region), volBytes)
	checkReplicas(t, h, store, images, volBytes)
	// The daemon's own writes, the last of them still in the page cache
	// when it stops, are not another program's.
	stop, count = startCrashWriters(t, dir, volBytes, 8)
	for deadline := time.Now().Add(15 * time.Second); count() < 100 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	quiesceMirrored(t, qmpSock)
	waitHubProtecting(t, h, files, child)
	child.stop(t)

	// Nothing written while stopped: nothing moves.
	flusher()
	child = startChild(t, cfg)
	waitHubProtecting(t, h, files, child)
	wantNoResync(t, qmpSock, "with nothing written while stopped")
	checkReplicas(t, h, store, images, volBytes)
}

// wantWrittenResync checks, after a restart of the daemon whose agent
// answers on qmpSock, that volume a0, whose image was written by another
// program while the daemon was stopped, was resynchronised by checksums
// for that reason, the hub reading exactly written bytes of its volBytes,
// and that b0 moved nothing.
func wantWrittenResync(t *testing.T, h *hub.Hub, qmpSock, image string, written uint64, volBytes int64) {
	t.Helper()
	st, err := queryAgent(qmpSock)
	if err != nil {
		t.Fatal(err)
	}
	var a, bv agentVolumeStatus
	for _, v := range st.Volumes {
		switch v.Volume {
		case "a0":
			a = v
		case "b0":
			bv = v
		}
	}
	t.Logf("a0: resync %q, %d bytes planned, hub read %d bytes; b0: %q, %d, %d", a.ResyncReason, a.ResyncBytes, a.RemoteBytes, bv.ResyncReason, bv.ResyncBytes, bv.RemoteBytes)
	if !strings.Contains(a.ResyncReason, "backing changed") || !strings.Contains(a.ResyncReason, image+" was written while vhostdm did not serve it") {
		t.Errorf("a0's resync reason %q does not say that %s was written while stopped", a.ResyncReason, image)
	}
	if a.RemoteBytes != written {
		t.Errorf("the hub read %d bytes of a0, want exactly the %d written behind the agent's back", a.RemoteBytes, written)
	}
	if bv.ResyncBytes != 0 || bv.RemoteBytes != 0 {
		t.Errorf("b0, untouched, was resynchronised: %q, %d bytes planned, %d read", bv.ResyncReason, bv.ResyncBytes, bv.RemoteBytes)
	}
	var hv hub.VolumeStatus
	for _, vm := range h.Status() {
		for _, v := range vm.Volumes {
			if v.Volume == "a0" {
				hv = v
			}
		}
	}
	if hv.CsumDifferBytes != written || hv.CsumMatchedBytes != uint64(volBytes)-written {
		t.Errorf("the hub's checksum resync of a0: %d bytes differ, %d match; want %d and %d", hv.CsumDifferBytes, hv.CsumMatchedBytes, written, uint64(volBytes)-written)
	}
}
