package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
func TestBackingWrittenWhileStopped(t *testing.T) {
	const (
		volBytes = 16 << 20
		region   = 64 << 10 // the default dirty-map region
	)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	for _, n := range []string{"a.img", "b.img"} {
		sparse(t, filepath.Join(dir, n), volBytes)
	}
	cfg := writeConfig(t, dir, fmt.Sprintf(crashRepConfig, addr, 6, volBytes/512, volBytes/512))
	qmpSock := filepath.Join(dir, "qmp.sock")
	images := map[string]string{"a0": filepath.Join(dir, "a.img"), "b0": filepath.Join(dir, "b.img")}
	volume := func(st agentStatus, name string) agentVolumeStatus {
		for _, v := range st.Volumes {
			if v.Volume == name {
				return v
			}
		}
		t.Fatalf("no volume %s in %+v", name, st)
		return agentVolumeStatus{}
	}

	child := startChild(t, cfg)
	waitHubProtecting(t, h, images, child)
	stop, count := startCrashWriters(t, dir, volBytes, 7)
	for deadline := time.Now().Add(15 * time.Second); count() < 100 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	quiesceMirrored(t, qmpSock)
	waitHubProtecting(t, h, images, child)
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

	// Another program writes three regions of a.img.
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
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	child = startChild(t, cfg)
	waitHubProtecting(t, h, images, child)
	st, err := queryAgent(qmpSock)
	if err != nil {
		t.Fatal(err)
	}
	a, bv := volume(st, "a0"), volume(st, "b0")
	t.Logf("a0: resync %q, %d bytes planned, hub read %d bytes; b0: %q, %d, %d", a.ResyncReason, a.ResyncBytes, a.RemoteBytes, bv.ResyncReason, bv.ResyncBytes, bv.RemoteBytes)
	if !strings.Contains(a.ResyncReason, "backing changed") || !strings.Contains(a.ResyncReason, "a.img was written while vhostdm did not serve it") {
		t.Errorf("a0's resync reason %q does not say that a.img was written while stopped", a.ResyncReason)
	}
	if want := uint64(len(offs) * region); a.RemoteBytes != want {
		t.Errorf("the hub read %d bytes of a0, want exactly the %d written behind the agent's back", a.RemoteBytes, want)
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
	if want := uint64(len(offs) * region); hv.CsumDifferBytes != want || hv.CsumMatchedBytes != volBytes-want {
		t.Errorf("the hub's checksum resync of a0: %d bytes differ, %d match; want %d and %d", hv.CsumDifferBytes, hv.CsumMatchedBytes, want, volBytes-want)
	}
	checkReplicas(t, h, store, images, volBytes)
	child.stop(t)

	// Nothing written while stopped: nothing moves.
	child = startChild(t, cfg)
	waitHubProtecting(t, h, images, child)
	wantNoResync(t, qmpSock, "with nothing written while stopped")
	checkReplicas(t, h, store, images, volBytes)
}
