package repagent

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/vhost"
)

func protectAll(vols ...*rigVol) map[*rigVol]VolumeOptions {
	m := map[*rigVol]VolumeOptions{}
	for _, v := range vols {
		m[v] = VolumeOptions{Protect: true}
	}
	return m
}

// TestReplicateTwoVolumes: two protected exports under a continuous
// verified writer end byte-identical on the hub.
func TestReplicateTwoVolumes(t *testing.T) {
	r := newRig(t)
	r.startHub()
	a := r.addVolume("root", 16<<20)
	b := r.addVolume("data", 8<<20)
	// Some data before protection starts: the initial sync copies it.
	r.startAgent(protectAll(a, b))
	stop := make(chan struct{})
	wait := r.runWriters(stop, a, b)
	time.Sleep(1500 * time.Millisecond)
	close(stop)
	n := wait()
	r.waitProtected(20*time.Second, a, b)
	r.checkIdentical(a, b)
	t.Logf("%d guest writes", n)
}

// remoteBytes returns what the hub read with remote IO from v since it
// started.
func (r *rig) remoteBytes(v *rigVol) uint64 { return r.hubVolumes()[v.name].RemoteReadBytes }

// TestHubRestart: the hub is killed during writes and restarted; it
// converges without a full resync and the replicas are identical.
func TestHubRestart(t *testing.T) {
	r := newRig(t)
	r.startHub()
	a := r.addVolume("root", 64<<20)
	b := r.addVolume("data", 64<<20)
	r.startAgent(protectAll(a, b))
	r.waitProtected(20*time.Second, a, b)
	stop := make(chan struct{})
	wait := r.runWritersPaced(stop, 20*time.Millisecond, a, b)
	time.Sleep(500 * time.Millisecond)
	r.killHub()
	time.Sleep(100 * time.Millisecond)
	r.startHub()
	time.Sleep(500 * time.Millisecond)
	close(stop)
	t0 := time.Now()
	wait()
	t.Logf("writers stopped in %v", time.Since(t0))
	r.waitProtected(20*time.Second, a, b)
	t.Logf("protected in %v", time.Since(t0))
	r.checkIdentical(a, b)
	t.Logf("compared in %v", time.Since(t0))
	for _, v := range []*rigVol{a, b} {
		got := r.remoteBytes(v)
		t.Logf("%s: %d bytes read by remote IO after the restart (%.1f%% of the volume)", v.name, got, 100*float64(got)/float64(v.size))
		if got >= uint64(v.size)/10 {
			t.Errorf("%s: %d bytes read after the restart, not under 10%% of %d", v.name, got, v.size)
		}
	}
}

// TestLinkCut: the link is cut for 10 s during writes; the guest sees no error, the
// agent records a dirty map, only changed regions are read again.
func TestLinkCut(t *testing.T) {
	r := newRig(t)
	r.startHub()
	a := r.addVolume("root", 64<<20)
	b := r.addVolume("data", 32<<20)
	r.startAgent(protectAll(a, b))
	r.waitProtected(20*time.Second, a, b)
	before := r.remoteBytes(a) + r.remoteBytes(b)
	stop := make(chan struct{})
	// Paced so that the 10 s cut dirties a small part of the volumes (about
	// 200 writes in all), or "no full resync" could not be told apart.
	wait := r.runWritersPaced(stop, 200*time.Millisecond, a, b)
	time.Sleep(300 * time.Millisecond)
	r.cutLink(10 * time.Second)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	n := wait()
	r.waitProtected(20*time.Second, a, b)
	r.checkIdentical(a, b)
	st := r.agent.Status()
	dirtied := uint64(0)
	for _, v := range st.Volumes {
		dirtied += v.Stats.Dirtied
	}
	if dirtied == 0 {
		t.Errorf("no write went to the dirty map while the link was down")
	}
	if st.Connects < 2 {
		t.Errorf("agent connected %d times, want a reconnect", st.Connects)
	}
	resync := r.remoteBytes(a) + r.remoteBytes(b) - before
	var mapped uint64
	for _, v := range st.Volumes {
		mapped += v.Stats.DirtyMapRegions * DefaultRegionSectors * SectorSize
	}
	t.Logf("%d guest writes, %d into the dirty map (%d bytes of regions), %d bytes resynced", n, dirtied, mapped, resync)
	if mapped == 0 {
		t.Errorf("no DIRTY_MAP was sent")
	}
	// Only what changed is read: the dirty map's regions, a few of them
	// twice when written during their read.
	if total := uint64(a.size + b.size); resync > 2*mapped || resync >= total/4 {
		t.Errorf("resync read %d of %d bytes for %d bytes of dirty regions", resync, total, mapped)
	}
}

// TestCleanShutdownNoResync: after AGENT_SHUTDOWN, a new agent resumes
// protection with no remote reads.
func TestCleanShutdownNoResync(t *testing.T) {
	r := newRig(t)
	r.startHub()
	a := r.addVolume("root", 16<<20)
	r.startAgent(protectAll(a))
	stop := make(chan struct{})
	wait := r.runWriters(stop, a)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wait()
	r.waitProtected(20*time.Second, a)
	if err := r.agent.Close(); err != nil {
		t.Fatalf("clean shutdown: %v", err)
	}
	before := r.remoteBytes(a)
	r.startAgent(protectAll(a))
	r.waitProtected(20*time.Second, a)
	if got := r.remoteBytes(a) - before; got != 0 {
		t.Errorf("%d bytes resynced after a clean shutdown, want 0", got)
	}
	// And it still protects.
	stop = make(chan struct{})
	wait = r.runWriters(stop, a)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	r.waitProtected(20*time.Second, a)
	r.checkIdentical(a)
}

// TestAgentKilled: vhostdm dies without AGENT_SHUTDOWN during writes; a new
// agent session cannot tell what changed, so the hub resyncs fully and
// ends identical.
func TestAgentKilled(t *testing.T) {
	r := newRig(t)
	r.startHub()
	a := r.addVolume("root", 16<<20)
	r.startAgent(protectAll(a))
	r.waitProtected(20*time.Second, a)
	stop := make(chan struct{})
	wait := r.runWriters(stop, a)
	time.Sleep(300 * time.Millisecond)
	r.agent.abort() // as kill -9: queued writes are lost with it
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wait()
	before := r.remoteBytes(a)
	r.startAgent(protectAll(a))
	r.waitProtected(20*time.Second, a)
	r.checkIdentical(a)
	if got := r.remoteBytes(a) - before; got != uint64(a.size) {
		t.Errorf("resynced %d bytes after an unclean agent restart, want the whole %d", got, a.size)
	}
}

// TestFallBehindSync: a slow hub pushes a volume past "ios N"; its writes
// become synchronous, then asynchronous again; nothing is lost.
func TestFallBehindSync(t *testing.T) {
	r := newRig(t)
	r.hubCfg.applyDelay = 3 * time.Millisecond
	r.startHub()
	a := r.addVolume("root", 16<<20)
	r.startAgent(map[*rigVol]VolumeOptions{a: {Protect: true, FallBehind: FallBehind{IOs: 8}}})
	r.waitProtected(20*time.Second, a)
	stop := make(chan struct{})
	wait := r.runWriters(stop, a)
	sawSync := false
	deadline := time.Now().Add(1500 * time.Millisecond)
	for time.Now().Before(deadline) {
		if r.agent.Status().Volumes[0].Sync {
			sawSync = true
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wait()
	r.waitProtected(20*time.Second, a)
	st := r.agent.Status().Volumes[0]
	t.Logf("stats: %+v", st.Stats)
	if !sawSync || st.Stats.SyncEntered == 0 || st.Stats.SyncWrites == 0 {
		t.Errorf("never mirrored synchronously: saw %v, %+v", sawSync, st.Stats)
	}
	if st.Sync {
		t.Errorf("still synchronous with an empty backlog")
	}
	if st.Stats.Dirtied != 0 {
		t.Errorf("%d writes went to the dirty map; the queue should not overflow", st.Stats.Dirtied)
	}
	r.checkIdentical(a)
}

// TestFailoverTest: the hub serves the replica to a test VM (a vhost
// client) from a consistent point; after the test, what it wrote and what
// was mirrored meanwhile are resynced.
func TestFailoverTest(t *testing.T) {
	r := newRig(t)
	r.startHub()
	a := r.addVolume("root", 8<<20)
	r.startAgent(protectAll(a))
	stop := make(chan struct{})
	wait := r.runWriters(stop, a)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	r.waitProtected(20*time.Second, a)
	dir := t.TempDir()
	exps, err := r.hub.FailoverTest("vm1", dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(exps) != 1 || exps[0].Volume != "root" || exps[0].Sectors != uint64(a.size/512) {
		t.Fatalf("exports %+v", exps)
	}
	if st := r.hubVolumes()["root"]; st.State != StateFailoverTest {
		t.Errorf("state %s during the test", st.State)
	}
	if _, err := r.hub.FailoverTest("vm1", dir); err == nil {
		t.Errorf("a second failover test started")
	}
	// The source moves on; the test VM sees the replica as it was.
	a.mu.Lock()
	snapshot := append([]byte(nil), a.model...)
	a.mu.Unlock()
	stop = make(chan struct{})
	wait = r.runWriters(stop, a)
	ctx := testContext(t)
	c, err := vhost.Dial(ctx, vhost.ClientConfig{Socket: exps[0].Socket, MemSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	for off := 0; off < len(snapshot); off += len(got) {
		if err := c.ReadAt(ctx, 0, got, uint64(off/512)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, snapshot[off:off+len(got)]) {
			t.Fatalf("test VM reads a replica that differs from the source at the test's start, near byte %d", off)
		}
	}
	if err := c.WriteAt(ctx, 0, pattern(99, 64<<10), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	close(stop)
	wait()
	if err := r.hub.FailoverTestStop("vm1"); err != nil {
		t.Fatal(err)
	}
	if err := r.hub.FailoverTestStop("vm1"); err == nil {
		t.Errorf("stopping twice succeeded")
	}
	r.waitProtected(20*time.Second, a)
	r.checkIdentical(a)
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}
