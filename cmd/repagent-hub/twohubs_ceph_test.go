//go:build ceph

package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// vmOf returns vm's entry in a hub's status.
func vmOf(st []hub.VMStatus, vm string) (hub.VMStatus, bool) {
	for _, s := range st {
		if s.VM == vm {
			return s, true
		}
	}
	return hub.VMStatus{}, false
}

// TestCephTwoHubsKill: two repagent-hub processes serve one Ceph pool;
// two protected VMs (agents in the test process, each given both hubs'
// addresses, in opposite orders) write verified data, one VM held by
// each hub. The hub that holds vm1 is killed with SIGKILL: vm1's agent
// moves to the other hub, which takes vm1's lease once the dead hub's
// ends (measured), while vm2 replicates on undisturbed. The newest
// consistent point of vm1 stays recoverable through the surviving hub
// (RBD clones holding a prefix of the write history), the resync moves
// only dirty regions (no full resync), and both VMs' RBD replicas end
// byte-identical to their sources.
func TestCephTwoHubsKill(t *testing.T) {
	c := cephCluster(t)
	pool := c.CreatePool(t, "rbd")
	dir := t.TempDir()
	const lease = 3 * time.Second
	extra := []string{"--store", "ceph:" + pool, "--ceph-conf", c.Conf, "--ceph-lease", lease.String()}
	addrA, addrB := freeAddr(t), freeAddr(t)
	ha := startHubProc(t, dir, addrA, 0, extra...)
	defer func() { ha.kill() }()
	hb := startHubProc(t, dir, addrB, 1, extra...)
	defer func() { hb.kill() }()

	r1, r2 := reptest.New(t), reptest.New(t)
	r1.AgentCfg.Hubs = []string{addrA, addrB}
	r2.AgentCfg.VM, r2.AgentCfg.UUID = "vm2", "0f2d0e7a-3b1f-4d2a-9a51-6c1d7d0e1a10"
	r2.AgentCfg.Hubs = []string{addrB, addrA}
	v1 := []*reptest.Vol{r1.AddVolume("root", 32<<20)}
	v2 := []*reptest.Vol{r2.AddVolume("root", 16<<20)}
	r1.StartAgent(reptest.ProtectAll(v1...))
	r2.StartAgent(reptest.ProtectAll(v2...))

	// protected: the hub holds vm, its agent is attached to it, every
	// volume protecting and nothing dirty.
	protected := func(hp *hubProc, r *reptest.Rig, vm string, n int) (bool, string) {
		st, err := hp.status()
		if err != nil {
			return false, err.Error()
		}
		s, ok := vmOf(st, vm)
		if !ok || !s.Connected || !s.Held || len(s.Volumes) != n || s.Journal == nil || s.Journal.Resyncing {
			return false, fmt.Sprintf("hub: %+v", s)
		}
		for _, v := range s.Volumes {
			if v.State != hub.StateProtecting {
				return false, fmt.Sprintf("hub volume %s: %s", v.Volume, v.State)
			}
		}
		as := r.Agent.Status()
		if as.Hub != hp.addr {
			return false, fmt.Sprintf("agent at %s, not %s", as.Hub, hp.addr)
		}
		for _, v := range as.Volumes {
			if !v.Mirroring || v.DirtyRegions != 0 {
				return false, fmt.Sprintf("agent volume %s: mirroring %v dirty %d", v.Name, v.Mirroring, v.DirtyRegions)
			}
		}
		return true, ""
	}
	waitProtected := func(hp *hubProc, r *reptest.Rig, vm string, n int, why string) {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second)
		for {
			ok, reason := protected(hp, r, vm, n)
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s not protected by %s: %s", why, vm, hp.addr, reason)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	start := time.Now()
	waitProtected(ha, r1, "vm1", 1, "initial sync")
	waitProtected(hb, r2, "vm2", 1, "initial sync")
	t.Logf("both VMs synced in %v", time.Since(start).Round(time.Millisecond))
	if st, _ := hb.status(); func() bool { s, ok := vmOf(st, "vm1"); return ok && s.Held }() {
		t.Fatal("the second hub says it holds vm1 too")
	}
	if st, _ := ha.status(); func() bool { s, ok := vmOf(st, "vm2"); return ok && s.Held }() {
		t.Fatal("the first hub says it holds vm2 too")
	}

	var h1, h2 history
	stop1 := startWriter(t, &h1, v1, 2*time.Millisecond)
	stop2 := startWriter(t, &h2, v2, 2*time.Millisecond)
	stop := func() { stop1(); stop2() }
	defer stop()
	time.Sleep(1500 * time.Millisecond)

	// agentBytes: what the hub read from vm1's agent, and the bytes of
	// the regions its dirty maps named.
	agentBytes := func() (remote, dirty uint64) {
		for _, v := range r1.Agent.Status().Volumes {
			remote += v.Stats.RemoteBytes
			dirty += v.Stats.DirtyMapRegions * wire.DefaultRegionSectors * wire.SectorSize
		}
		return remote, dirty
	}
	remoteBefore, dirtyBefore := agentBytes()
	st, err := ha.status()
	if err != nil {
		t.Fatal(err)
	}
	s1, _ := vmOf(st, "vm1")
	c0 := s1.Journal.ConsistentSeq
	writes2 := h2.len()
	ha.kill()
	killed := time.Now()
	// vm1's writer pauses while its agent has no hub (vm2's goes on):
	// the resync is then what the kill left unacknowledged, not a
	// growing outage.
	resume := h1.pause()
	defer resume()
	for {
		st, err := hb.status()
		s, _ := vmOf(st, "vm1")
		as := r1.Agent.Status()
		if err == nil && s.Held && s.Connected && as.Connected && as.Hub == addrB {
			break
		}
		if time.Since(killed) > 60*time.Second {
			t.Fatalf("vm1's agent did not move to the second hub: hub %+v %v, agent hub %s connected %v refused %q", s, err, as.Hub, as.Connected, as.Refused)
		}
		time.Sleep(20 * time.Millisecond)
	}
	moved := time.Since(killed)
	t.Logf("hub kill -9: vm1's agent attached to the second hub %v after the kill (lease %v); vm2 wrote %d times meanwhile", moved.Round(time.Millisecond), lease, h2.len()-writes2)
	if h2.len() <= writes2 {
		t.Errorf("vm2 wrote nothing while vm1 moved")
	}
	if moved > lease+15*time.Second {
		t.Errorf("the move took %v: more than the lease %v and 15 s", moved, lease)
	}

	// The consistent point of before the kill is there at once, and
	// the newest point recovers as RBD clones holding a prefix of vm1's
	// writes, while the resync may still run.
	st, err = hb.status()
	if err != nil {
		t.Fatal(err)
	}
	s1, _ = vmOf(st, "vm1")
	if s1.Journal == nil || s1.Journal.ConsistentSeq < c0 {
		t.Fatalf("vm1's consistent point on the second hub %+v, before the kill %d", s1.Journal, c0)
	}
	o := ceph.NewOpener(ceph.Config{Conf: c.Conf}, slog.New(slog.DiscardHandler))
	defer o.Close()
	rec := recoverCLI(t, "--qmp", hb.qmp, "--vm", "vm1", "--out", filepath.Join(dir, "rec-takeover"), "--ceph-conf", c.Conf)
	if k, err := h1.prefixOf([][]byte{readRBD(t, o, rec.Volumes[0].Path)}); err != nil {
		t.Fatalf("vm1 recovered at seq %d right after the takeover: %v", rec.Seq, err)
	} else {
		t.Logf("vm1 recovered at seq %d (before the kill %d) right after the takeover: the first %d writes", rec.Seq, c0, k)
	}

	waitProtected(hb, r1, "vm1", 1, "after the move")
	resume()
	remote, dirty := agentBytes()
	remote, dirty = remote-remoteBefore, dirty-dirtyBefore
	t.Logf("vm1's resync on the second hub moved %d bytes for %d bytes of dirty regions (volume %d bytes)", remote, dirty, v1[0].Size)
	if remote > dirty || remote >= uint64(v1[0].Size)/2 {
		t.Errorf("the takeover resync moved %d bytes (dirty regions %d, volume %d): a full resync", remote, dirty, v1[0].Size)
	}
	time.Sleep(1 * time.Second)
	stop()
	waitProtected(hb, r1, "vm1", 1, "after the move")
	waitProtected(hb, r2, "vm2", 1, "after the move")
	t.Logf("vm1 %d writes, vm2 %d", h1.len(), h2.len())

	// The applier (retain 0) brings both VMs' RBD replicas to the
	// sources.
	st, err = hb.status()
	if err != nil {
		t.Fatal(err)
	}
	for _, pair := range []struct {
		vm   string
		vols []*reptest.Vol
	}{{"vm1", v1}, {"vm2", v2}} {
		s, _ := vmOf(st, pair.vm)
		deadline := time.Now().Add(60 * time.Second)
		for i, v := range pair.vols {
			src, err := os.ReadFile(v.Backing)
			if err != nil {
				t.Fatal(err)
			}
			for {
				got := readRBD(t, o, s.Volumes[i].Replica)
				if bytes.Equal(got[:len(src)], src) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s's RBD replica %s differs from its source after quiesce", pair.vm, s.Volumes[i].Replica)
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
	}
	rec = recoverCLI(t, "--qmp", hb.qmp, "--vm", "vm1", "--out", filepath.Join(dir, "rec-end"), "--ceph-conf", c.Conf)
	if k, err := h1.prefixOf([][]byte{readRBD(t, o, rec.Volumes[0].Path)}); err != nil || k != h1.len() {
		t.Fatalf("vm1 recovered at the end holds %d of %d writes: %v", k, h1.len(), err)
	}
}
