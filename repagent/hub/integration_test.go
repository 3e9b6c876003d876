package hub_test

import (
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestReplicateTwoVolumes: two protected exports under a continuous
// verified writer end byte-identical on the hub.
func TestReplicateTwoVolumes(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	a := r.AddVolume("root", 16<<20)
	b := r.AddVolume("data", 8<<20)
	// Some data before protection starts: the initial sync copies it.
	r.StartAgent(reptest.ProtectAll(a, b))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a, b)
	time.Sleep(1500 * time.Millisecond)
	close(stop)
	n := wait()
	r.WaitProtected(20*time.Second, a, b)
	r.CheckIdentical(a, b)
	t.Logf("%d guest writes", n)
}

// TestHubRestart: the hub is killed during writes and restarted; it
// converges without a full resync and the replicas are identical.
func TestHubRestart(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	a := r.AddVolume("root", 64<<20)
	b := r.AddVolume("data", 64<<20)
	r.StartAgent(reptest.ProtectAll(a, b))
	r.WaitProtected(20*time.Second, a, b)
	stop := make(chan struct{})
	wait := r.RunWritersPaced(stop, 20*time.Millisecond, a, b)
	time.Sleep(500 * time.Millisecond)
	r.KillHub()
	time.Sleep(100 * time.Millisecond)
	r.StartHub()
	time.Sleep(500 * time.Millisecond)
	close(stop)
	t0 := time.Now()
	wait()
	t.Logf("writers stopped in %v", time.Since(t0))
	r.WaitProtected(20*time.Second, a, b)
	t.Logf("protected in %v", time.Since(t0))
	r.CheckIdentical(a, b)
	t.Logf("compared in %v", time.Since(t0))
	for _, v := range []*reptest.Vol{a, b} {
		got := r.RemoteBytes(v)
		t.Logf("%s: %d bytes read by remote IO after the restart (%.1f%% of the volume)", v.Name, got, 100*float64(got)/float64(v.Size))
		if got >= uint64(v.Size)/10 {
			t.Errorf("%s: %d bytes read after the restart, not under 10%% of %d", v.Name, got, v.Size)
		}
	}
}

// TestLinkCut: the link is cut for 10 s during writes; the guest sees no error, the
// agent records a dirty map, only changed regions are read again.
func TestLinkCut(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	a := r.AddVolume("root", 64<<20)
	b := r.AddVolume("data", 32<<20)
	r.StartAgent(reptest.ProtectAll(a, b))
	r.WaitProtected(20*time.Second, a, b)
	before := r.RemoteBytes(a) + r.RemoteBytes(b)
	stop := make(chan struct{})
	// Paced so that the 10 s cut dirties a small part of the volumes (about
	// 200 writes in all), or "no full resync" could not be told apart.
	wait := r.RunWritersPaced(stop, 200*time.Millisecond, a, b)
	time.Sleep(300 * time.Millisecond)
	r.CutLink(10 * time.Second)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	n := wait()
	r.WaitProtected(20*time.Second, a, b)
	r.CheckIdentical(a, b)
	st := r.Agent.Status()
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
	resync := r.RemoteBytes(a) + r.RemoteBytes(b) - before
	var mapped uint64
	for _, v := range st.Volumes {
		mapped += v.Stats.DirtyMapRegions * wire.DefaultRegionSectors * wire.SectorSize
	}
	t.Logf("%d guest writes, %d into the dirty map (%d bytes of regions), %d bytes resynced", n, dirtied, mapped, resync)
	if mapped == 0 {
		t.Errorf("no DIRTY_MAP was sent")
	}
	// Only what changed is read: the dirty map's regions, a few of them
	// twice when written during their read.
	if total := uint64(a.Size + b.Size); resync > 2*mapped || resync >= total/4 {
		t.Errorf("resync read %d of %d bytes for %d bytes of dirty regions", resync, total, mapped)
	}
}

// TestCleanShutdownNoResync: after AGENT_SHUTDOWN, a new agent resumes
// protection with no remote reads.
func TestCleanShutdownNoResync(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	a := r.AddVolume("root", 16<<20)
	r.StartAgent(reptest.ProtectAll(a))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, a)
	if err := r.Agent.Close(); err != nil {
		t.Fatalf("clean shutdown: %v", err)
	}
	before := r.RemoteBytes(a)
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(20*time.Second, a)
	if got := r.RemoteBytes(a) - before; got != 0 {
		t.Errorf("%d bytes resynced after a clean shutdown, want 0", got)
	}
	// And it still protects.
	stop = make(chan struct{})
	wait = r.RunWriters(stop, a)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, a)
	r.CheckIdentical(a)
}

// TestAgentKilled: vhostdm dies without AGENT_SHUTDOWN during writes; a new
// agent session cannot tell what changed, so the hub resyncs fully and
// ends identical.
func TestAgentKilled(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	a := r.AddVolume("root", 16<<20)
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(20*time.Second, a)
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a)
	time.Sleep(300 * time.Millisecond)
	r.Agent.Abort() // as kill -9: queued writes are lost with it
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wait()
	before := r.RemoteBytes(a)
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(20*time.Second, a)
	r.CheckIdentical(a)
	if got := r.RemoteBytes(a) - before; got != uint64(a.Size) {
		t.Errorf("resynced %d bytes after an unclean agent restart, want the whole %d", got, a.Size)
	}
}

// TestFallBehindSync: a slow hub pushes a volume past "ios N"; its writes
// become synchronous, then asynchronous again; nothing is lost.
func TestFallBehindSync(t *testing.T) {
	r := reptest.New(t)
	r.HubCfg.ApplyDelay = 3 * time.Millisecond
	r.StartHub()
	a := r.AddVolume("root", 16<<20)
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{a: {Protect: true, FallBehind: agent.FallBehind{IOs: 8}}})
	r.WaitProtected(20*time.Second, a)
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a)
	sawSync := false
	deadline := time.Now().Add(1500 * time.Millisecond)
	for time.Now().Before(deadline) {
		if r.Agent.Status().Volumes[0].Sync {
			sawSync = true
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, a)
	st := r.Agent.Status().Volumes[0]
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
	r.CheckIdentical(a)
}

// TestAgentRestartNumbering: an agent process that restarts numbers its
// writes from 1 again, below what the hub's journal already holds; the
// hub keeps accepting and acknowledging them (it used to close every
// connection of the new agent: "sequence number not above").
func TestAgentRestartNumbering(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	a := r.AddVolume("root", 8<<20)
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(20*time.Second, a)
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, a)
	if s := r.Agent.Status(); s.Acked < 10 {
		t.Fatalf("the first agent's writes were not acknowledged: acked %d", s.Acked)
	}
	r.Agent.Abort()
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(20*time.Second, a)
	stop = make(chan struct{})
	wait = r.RunWriters(stop, a)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	n := wait()
	r.WaitProtected(20*time.Second, a)
	s := r.Agent.Status()
	if s.Connects != 1 || s.Volumes[0].Stats.Mirrored == 0 {
		t.Errorf("restarted agent: %d connections, %d mirrored writes (want 1 connection, mirrored writes)", s.Connects, s.Volumes[0].Stats.Mirrored)
	}
	r.CheckIdentical(a)
	t.Logf("%d guest writes after the restart, acked %d", n, s.Acked)
}
