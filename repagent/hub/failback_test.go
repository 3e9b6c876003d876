package hub_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
)

// TestFailbackByChecksums: site A replicates to hub B; A is lost with
// writes B never got; B promotes and the recovery side is written. For
// the failback a hub at A is seeded with A's old disk and the promoted
// volume protects to it: the checksum resync reads exactly the regions
// that differ (far less than the volume), both sides end byte-identical,
// and an online verify then finds 0 mismatches, also after more writes.
func TestFailbackByChecksums(t *testing.T) {
	const size, rb = 16 << 20, 64 << 10
	r := reptest.New(t)
	r.StartHub()
	v := r.AddVolume("root", size)
	r.StartAgent(reptest.ProtectAll(v))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, v)
	time.Sleep(time.Second)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, v)
	r.CheckIdentical(v)

	// Site A dies; its disk holds writes the hub never got.
	r.Agent.Abort()
	patch := func(path string, off int64, seed uint64, n int) {
		t.Helper()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(reptest.Pattern(seed, n), off); err != nil {
			t.Fatal(err)
		}
	}
	patch(v.Backing, 16*rb, 101, 3*rb) // regions 16-18
	// Site B promotes; the recovery VM runs unprotected and writes.
	ctx := reptest.Context(t)
	promoted := filepath.Join(r.Dir, "promoted")
	rec, err := r.Hub.Promote(ctx, "vm1", journal.Newest(), promoted)
	if err != nil {
		t.Fatal(err)
	}
	img := rec.Volumes[0].Path
	patch(img, 40*rb, 102, 2*rb)       // regions 40-41
	patch(img, 100*rb+4096, 103, 4096) // region 100
	patch(img, 17*rb+512, 104, 512)    // region 17, which A changed too
	patch(img, size-512, 105, 512)     // region 255
	old, _ := os.ReadFile(v.Backing)
	cur, _ := os.ReadFile(img)
	differ := 0
	for i := 0; i < size; i += rb {
		if !bytes.Equal(old[i:i+rb], cur[i:i+rb]) {
			differ++
		}
	}
	if differ != 7 {
		t.Fatalf("%d regions differ, want 7", differ)
	}

	// Failback: a hub at site A seeded with A's old disk; the promoted
	// volume protects to it.
	storeA := filepath.Join(r.Dir, "storeA")
	if err := hub.Seed(storeA, "vm1", r.AgentCfg.UUID, 0, []hub.SeedVolume{{Name: "root", Path: v.Backing}}); err != nil {
		t.Fatal(err)
	}
	if err := hub.Seed(storeA, "vm1", "", 0, []hub.SeedVolume{{Name: "root", Path: v.Backing}}); err == nil {
		t.Error("seeding a VM the store holds: no error")
	}
	r2 := reptest.New(t)
	r2.HubCfg.Store = storeA
	r2.StartHub()
	b := r2.AddVolume("root", size)
	if err := os.WriteFile(b.Backing, cur, 0o600); err != nil {
		t.Fatal(err)
	}
	copy(b.Model, cur)
	r2.StartAgent(reptest.ProtectAll(b))
	r2.WaitProtected(30*time.Second, b)
	st := r2.HubVolumes()["root"]
	t.Logf("failback moved %d bytes of a %d-byte volume; %d bytes compared equal", st.RemoteReadBytes, size, st.CsumMatchedBytes)
	if st.RemoteReadBytes != uint64(differ*rb) || st.CsumDifferBytes != uint64(differ*rb) || st.CsumMatchedBytes != uint64(size-differ*rb) {
		t.Errorf("failback read %d bytes (differ %d, matched %d), want exactly the %d differing regions (%d bytes)",
			st.RemoteReadBytes, st.CsumDifferBytes, st.CsumMatchedBytes, differ, differ*rb)
	}
	r2.CheckIdentical(b)
	// The old source now replicates the new one: writes keep flowing and
	// an online verify finds nothing different.
	stop = make(chan struct{})
	wait = r2.RunWriters(stop, b)
	time.Sleep(time.Second)
	close(stop)
	wait()
	r2.WaitProtected(20*time.Second, b)
	r2.CheckIdentical(b)
	vr, err := r2.Hub.Verify(ctx, hub.VerifyOptions{VM: "vm1"})
	if err != nil || vr.Volumes[0].Mismatches != 0 || vr.Volumes[0].VerifiedBytes != size {
		t.Errorf("verify after failback: %+v, %v", vr, err)
	}
}

// TestCsumResyncAfterAgentCrash: with Config.CsumResync (serve
// --csum-resync), the full resync that an agent restarted without an
// activity log would need reads only the regions whose checksums differ.
func TestCsumResyncAfterAgentCrash(t *testing.T) {
	const rb = 64 << 10
	r := reptest.New(t)
	r.HubCfg.CsumResync = true
	r.StartHub()
	v := r.AddVolume("root", 16<<20)
	r.StartAgent(reptest.ProtectAll(v))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, v)
	time.Sleep(time.Second)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, v)
	r.CheckIdentical(v)
	before := r.RemoteBytes(v)
	r.Agent.Abort() // a crash: a new session next, nothing tells what changed
	writeBehind(t, v, 500, 3*rb, 77*rb+1024, 200*rb)
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(30*time.Second, v)
	st := r.HubVolumes()["root"]
	if moved := st.RemoteReadBytes - before; moved != 3*rb {
		t.Errorf("the resync after the agent's crash read %d bytes, want the 3 changed regions (%d bytes)", moved, 3*rb)
	}
	r.CheckIdentical(v)
}

// TestCsumResyncSurvivesHubCrash: a hub killed while a checksum resync
// has compared nothing yet (before any checkpoint) must compare every
// region after its restart: the plan is saved with the regions still to
// compare, not only the mark that the replica holds data.
func TestCsumResyncSurvivesHubCrash(t *testing.T) {
	const rb = 64 << 10
	r := reptest.New(t)
	r.HubCfg.CsumResync = true
	r.StartHub()
	v := r.AddVolume("root", 64<<20)
	r.StartAgent(reptest.ProtectAll(v))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, v)
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, v)
	r.CheckIdentical(v)
	r.Agent.Abort() // a new session next: a full resync, by checksums
	writeBehind(t, v, 700, 3*rb, 500*rb+512, 1000*rb)
	r.StartAgent(reptest.ProtectAll(v))
	// Kill the hub as soon as the checksum resync is planned.
	for deadline := time.Now().Add(20 * time.Second); ; {
		if st := r.HubVolumes()["root"]; st.CsumPendingBytes > 0 || st.CsumMatchedBytes > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no checksum resync started")
		}
		time.Sleep(100 * time.Microsecond)
	}
	r.KillHub()
	r.StartHub()
	r.WaitProtected(30*time.Second, v)
	r.CheckIdentical(v)
}

// writeBehind writes 4 KiB of pattern at each of offs into v's backing
// file (and its model), as something other than the agent would.
func writeBehind(t *testing.T, v *reptest.Vol, seed uint64, offs ...int64) {
	t.Helper()
	f, err := os.OpenFile(v.Backing, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i, off := range offs {
		b := reptest.Pattern(seed+uint64(i), 4096)
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		copy(v.Model[off:], b)
	}
}
