package agent_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/agent/actlog"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestOverflowHonesty: a slow hub, a small queue, and writes that wait for
// room only 1 ms (RoomWait: the hub counts as making no room), so that the
// queue overflows into the dirty map. Sampled every 10 ms,
// the hub never says protecting while the agent has held a region unsent
// (in its dirty bitmap) for longer than unsentBound: an overflow's
// DIRTY_MAP goes out with the sender's next batch (before the fix it waited
// for the next heartbeat, 2 s). The bound is the sender goroutine's
// scheduling delay on a loaded 2-core CI machine under -race, where 15 ms
// was seen; the hub's and the agent's status are two samples, not one. The agent's RPO is never below
// the age of what it holds (its backlog's oldest write, its dirty map's
// oldest region), and is non-zero whenever it holds anything.
func TestOverflowHonesty(t *testing.T) {
	const unsentBound = 100 * time.Millisecond
	r := reptest.New(t)
	r.HubCfg.ApplyDelay = 2 * time.Millisecond
	r.AgentCfg.QueueBytes = 96 << 10 // two writers of up to 64 KiB overflow it, pacing or not
	r.AgentCfg.RoomWait = time.Millisecond
	r.StartHub()
	v := r.AddVolume("d0", 16<<20)
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(30*time.Second, v)

	stop := make(chan struct{})
	wait := r.RunWriters(stop, v)
	var lies, samples, overflowSamples int
	var maxRPO time.Duration
	end := time.Now().Add(3 * time.Second)
	for time.Now().Before(end) {
		hv := r.HubVolumes()["d0"]
		as := r.Agent.Status()
		av := as.Volumes[0]
		samples++
		if av.DirtyRegions > 0 {
			overflowSamples++
		}
		if hv.State == hub.StateProtecting && av.DirtyRegions > 0 && av.DirtyAge > unsentBound {
			lies++
			t.Logf("hub protecting while the agent holds %d regions unsent for %v", av.DirtyRegions, av.DirtyAge)
		}
		if av.RPO < av.BacklogAge || av.RPO < av.DirtyAge {
			t.Errorf("RPO %v below the backlog's age %v or the dirty map's %v", av.RPO, av.BacklogAge, av.DirtyAge)
		}
		if (av.BacklogIOs > 0 || av.DirtyRegions > 0) && av.RPO == 0 {
			t.Errorf("RPO 0 with %d writes and %d regions outstanding", av.BacklogIOs, av.DirtyRegions)
		}
		maxRPO = max(maxRPO, av.RPO)
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	n := wait()
	st := r.Agent.Status().Volumes[0].Stats
	t.Logf("%d writes, %d overflows, %d resync requests (%d bytes); %d samples, %d with unsent regions; max RPO %v",
		n, st.Overflows, st.ResyncRequests, st.ResyncBytes, samples, overflowSamples, maxRPO)
	if st.Overflows == 0 {
		t.Errorf("the queue never overflowed: the test did not test anything")
	}
	if lies > 0 {
		t.Errorf("%d of %d samples: the hub said protecting while the agent held unsent regions", lies, samples)
	}
	r.WaitProtected(60*time.Second, v)
	r.CheckIdentical(v)
	if rpo := r.Agent.Status().RPO; rpo != 0 {
		t.Errorf("RPO %v once everything is acknowledged", rpo)
	}
}

// TestFullQueueWaits: the same slow hub and small queue as
// TestOverflowHonesty, with the default RoomWait. While the hub is
// connected a write that finds the queue full waits for room (the guest
// runs at the hub's pace): nothing goes to the dirty map, so nothing is
// re-read, the hub never says protecting while the agent holds anything
// it lacks beyond its backlog, the RPO stays under a second, and the replica
// ends identical.
func TestFullQueueWaits(t *testing.T) {
	r := reptest.New(t)
	r.HubCfg.ApplyDelay = 2 * time.Millisecond
	r.AgentCfg.QueueBytes = 96 << 10
	r.StartHub()
	v := r.AddVolume("d0", 16<<20)
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(30*time.Second, v)
	remote0 := r.RemoteBytes(v)

	stop := make(chan struct{})
	wait := r.RunWriters(stop, v)
	var maxRPO time.Duration
	var maxB int64
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		av := r.Agent.Status().Volumes[0]
		if av.DirtyRegions > 0 {
			t.Errorf("%d regions in the dirty map with the hub connected", av.DirtyRegions)
		}
		maxRPO = max(maxRPO, av.RPO)
		maxB = max(maxB, av.BacklogBytes)
	}
	close(stop)
	n := wait()
	st := r.Agent.Status().Volumes[0].Stats
	t.Logf("%d writes, %d paced, max backlog %d bytes, max RPO %v", n, st.Paced, maxB, maxRPO)
	if st.Paced == 0 {
		t.Errorf("no write waited: the hub kept up, the test did not test anything")
	}
	if st.Overflows != 0 || st.Dirtied != 0 || st.ResyncRequests != 0 {
		t.Errorf("%d overflows, %d writes dirtied, %d resync requests: a full queue should hold the guest while the hub is connected",
			st.Overflows, st.Dirtied, st.ResyncRequests)
	}
	if maxB > r.AgentCfg.QueueBytes {
		t.Errorf("backlog %d bytes beyond the queue's %d", maxB, r.AgentCfg.QueueBytes)
	}
	if maxRPO > time.Second {
		t.Errorf("RPO reached %v", maxRPO)
	}
	r.WaitProtected(60*time.Second, v)
	if b := r.RemoteBytes(v) - remote0; b != 0 {
		t.Errorf("the hub re-read %d bytes", b)
	}
	r.CheckIdentical(v)
}

// TestFallBehindBounds: with a slow hub, a size and a timeout threshold
// bound the backlog (the largest seen), and the volumes end identical.
func TestFallBehindBounds(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fb    agent.FallBehind
		delay time.Duration // the hub's time per write
	}{
		{"size", agent.FallBehind{Bytes: 256 << 10}, time.Millisecond},
		// Slow enough that the backlog ages past the threshold however
		// the sender batches (at 1 ms per write it peaked at 296 ms on
		// a quiet host).
		{"timeout", agent.FallBehind{Timeout: 300 * time.Millisecond}, 2 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := reptest.New(t)
			r.HubCfg.ApplyDelay = tc.delay
			// The threshold, not pacing, bounds the backlog here.
			r.AgentCfg.QueueBytes = 64 << 20
			r.AgentCfg.PaceAge = time.Minute
			r.StartHub()
			v := r.AddVolume("d0", 16<<20)
			r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{v: {Protect: true, FallBehind: tc.fb}})
			r.WaitProtected(30*time.Second, v)
			stop := make(chan struct{})
			wait := r.RunWriters(stop, v)
			var maxB int64
			var maxAge time.Duration
			end := time.Now().Add(2 * time.Second)
			for time.Now().Before(end) {
				av := r.Agent.Status().Volumes[0]
				maxB = max(maxB, av.BacklogBytes)
				maxAge = max(maxAge, av.BacklogAge)
				time.Sleep(5 * time.Millisecond)
			}
			close(stop)
			n := wait()
			st := r.Agent.Status().Volumes[0].Stats
			t.Logf("%d writes, %d synchronous, max backlog %d bytes, max age %v, overflows %d", n, st.SyncWrites, maxB, maxAge, st.Overflows)
			if st.SyncEntered == 0 {
				t.Errorf("the threshold never triggered")
			}
			if st.Overflows != 0 || st.Dirtied != 0 {
				// The size threshold holds the backlog under the
				// queue; past an age threshold a full queue holds
				// the guest while the hub is connected.
				t.Errorf("%d overflows, %d writes dirtied with the hub connected", st.Overflows, st.Dirtied)
			}
			// Two writers of at most 64 KiB each may be queued past
			// the threshold before they wait.
			if b := tc.fb.Bytes; b > 0 && maxB > int64(b)+2*(64<<10) {
				t.Errorf("backlog reached %d bytes, threshold %d", maxB, b)
			}
			// The threshold counts the backlog's drain at the hub's
			// measured rate (and, before a rate is measured, a
			// pessimistic one), so the age stays near it: 296–363 ms
			// in six runs without -race, 1.9 s before the first burst
			// was counted. Twice the threshold leaves room for a
			// loaded CI machine.
			if to := tc.fb.Timeout; to > 0 && maxAge > 2*to {
				t.Errorf("backlog age reached %v, threshold %v", maxAge, to)
			}
			r.WaitProtected(60*time.Second, v)
			r.CheckIdentical(v)
		})
	}
}

// TestOnHubLossSuspend: with on-hub-loss = suspend, once the hub is gone
// and the volume is past its threshold, guest writes are held; none fails,
// and all complete once the hub is back; the replica ends identical.
func TestOnHubLossSuspend(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	v := r.AddVolume("d0", 4<<20)
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{v: {Protect: true, FallBehind: agent.FallBehind{IOs: 4}, OnHubLoss: agent.OnHubLossSuspend}})
	r.WaitProtected(30*time.Second, v)
	r.KillHub()
	for deadline := time.Now().Add(10 * time.Second); r.Agent.Status().Connected; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the agent did not notice the hub's death")
		}
	}
	var mu sync.Mutex
	done := 0
	errc := make(chan error, 1)
	go func() {
		buf, err := v.Client.Buf(4096)
		if err != nil {
			errc <- err
			return
		}
		for i := range 10 {
			copy(buf, reptest.Pattern(uint64(i+1), 4096))
			if err := v.Client.WriteAt(context.Background(), 0, buf, uint64(i)*8); err != nil {
				errc <- err
				return
			}
			v.Mu.Lock()
			copy(v.Model[i*4096:], buf)
			v.Mu.Unlock()
			mu.Lock()
			done++
			mu.Unlock()
		}
		errc <- nil
	}()
	time.Sleep(time.Second)
	mu.Lock()
	held := done
	mu.Unlock()
	if held >= 10 {
		t.Fatalf("all %d writes completed with the hub away (on-hub-loss = suspend)", held)
	}
	if s := r.Agent.Status().Volumes[0].Stats.Suspended; s == 0 {
		t.Errorf("no write counted as suspended")
	}
	r.StartHub()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("a held write failed: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("held writes did not complete after the hub came back")
	}
	t.Logf("%d of 10 writes completed while the hub was away; the rest were held and completed after it returned", held)
	r.WaitProtected(30*time.Second, v)
	r.CheckIdentical(v)
}

// TestPacingBoundsLag: a hub slower than the guest, no fall-behind
// threshold. Above the high-water mark, or with a backlog older than the
// pacing age, the guest's completions wait for the hub, so the backlog stays
// under the queue, nothing overflows into the dirty map (no re-reads), the
// RPO stays under a second, and the replica ends identical.
func TestPacingBoundsLag(t *testing.T) {
	r := reptest.New(t)
	r.HubCfg.ApplyDelay = time.Millisecond
	r.AgentCfg.QueueBytes = 4 << 20
	r.AgentCfg.PaceAge = 200 * time.Millisecond
	r.StartHub()
	v := r.AddVolume("d0", 16<<20)
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(30*time.Second, v)
	stop := make(chan struct{})
	wait := r.RunWriters(stop, v)
	var maxB int64
	var maxRPO time.Duration
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		av := r.Agent.Status().Volumes[0]
		maxB = max(maxB, av.BacklogBytes)
		maxRPO = max(maxRPO, av.RPO)
	}
	close(stop)
	n := wait()
	st := r.Agent.Status().Volumes[0].Stats
	t.Logf("%d writes, %d paced, max backlog %d bytes, max RPO %v", n, st.Paced, maxB, maxRPO)
	if st.Paced == 0 {
		t.Errorf("no write was paced: the hub kept up, the test did not test anything")
	}
	if st.Overflows != 0 || st.Dirtied != 0 {
		t.Errorf("%d overflows, %d writes dirtied: pacing should have kept the queue from overflowing", st.Overflows, st.Dirtied)
	}
	// The pacing age bounds the RPO: the oldest write waits at most
	// for the hub to apply what was queued before it.
	if maxRPO > time.Second {
		t.Errorf("RPO reached %v with a pacing age of %v", maxRPO, r.AgentCfg.PaceAge)
	}
	if maxB > r.AgentCfg.QueueBytes {
		t.Errorf("backlog %d bytes beyond the queue's %d", maxB, r.AgentCfg.QueueBytes)
	}
	r.WaitProtected(60*time.Second, v)
	r.CheckIdentical(v)
}

// TestCreditWindow: many small writes (512 bytes: far under the queue's
// byte limits) to a slow hub. The ring of write frames is the credit
// window: the backlog never holds more frames than the ring has slots
// (256 for a 1 MiB queue), the guest waits for the hub past it instead of
// overflowing into the dirty map, and the replica ends identical.
func TestCreditWindow(t *testing.T) {
	const slots = 256 // the ring of a 1 MiB queue: one slot per 4 KiB, at least 256
	r := reptest.New(t)
	r.HubCfg.ApplyDelay = time.Millisecond
	r.AgentCfg.QueueBytes = 1 << 20
	r.AgentCfg.PaceAge = time.Minute // the window, not the age, bounds the backlog
	r.StartHub()
	v := r.AddVolume("d0", 4<<20)
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(30*time.Second, v)
	// At least 2 s, and until the window has held the guest (on a loaded
	// machine the one writer may take longer to get ahead of the hub).
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	var writes int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := uint64(0); ctx.Err() == nil; i++ {
			s := (i * 2654435761) % uint64(v.Size/512)
			data := reptest.Pattern(i+1, 512)
			if err := v.Client.WriteAt(context.Background(), 0, data, s); err != nil {
				t.Errorf("guest write: %v", err)
				return
			}
			v.Mu.Lock()
			copy(v.Model[s*512:], data)
			v.Mu.Unlock()
			writes++
		}
	}()
	var maxIOs int
	for ctx.Err() == nil {
		av := r.Agent.Status().Volumes[0]
		maxIOs = max(maxIOs, av.BacklogIOs)
		if av.Stats.Paced > 0 && time.Since(start) > 2*time.Second {
			cancel()
		}
		time.Sleep(2 * time.Millisecond)
	}
	<-done
	st := r.Agent.Status().Volumes[0].Stats
	t.Logf("%d writes of 512 bytes, %d waited for credit or pacing, max backlog %d frames", writes, st.Paced, maxIOs)
	if st.Paced == 0 {
		t.Errorf("no write waited: the hub kept up, the test did not test anything")
	}
	if maxIOs > slots {
		t.Errorf("backlog of %d frames, beyond the credit window of %d", maxIOs, slots)
	}
	if st.Overflows != 0 || st.Dirtied != 0 {
		t.Errorf("%d overflows, %d writes dirtied: the window should have held the guest", st.Overflows, st.Dirtied)
	}
	r.WaitProtected(60*time.Second, v)
	r.CheckIdentical(v)
}

// TestActivityLogLongRequests: a discard and a write spanning more extents
// than the activity log holds are split, not a reason to abandon the log;
// the replica ends identical.
func TestActivityLogLongRequests(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	v := r.AddVolume("d0", 8<<20)
	r.AgentCfg.ActivityLog = agent.ActivityLog{Path: filepath.Join(r.Dir, "vm1.actlog"), Extents: 4, ExtentSize: 64 << 10,
		Volumes: []actlog.Volume{{Name: "d0", Size: 8 << 20}}}
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(30*time.Second, v)
	data := reptest.Pattern(9, 1<<20)
	if err := v.Wrapped.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 100, Sectors: 2048, Data: [][]byte{data[:300<<10], data[300<<10:]}}); err != nil {
		t.Fatal(err)
	}
	v.Mu.Lock()
	copy(v.Model[100*512:], data)
	v.Mu.Unlock()
	if err := v.Wrapped.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: 8192, Sectors: 4096}); err != nil {
		t.Fatal(err)
	}
	st := r.Agent.Status()
	if st.ActivityLog == nil || st.ActivityLog.Lost {
		t.Fatalf("activity log lost after long requests: %+v", st.ActivityLog)
	}
	if st.ActivityLog.Transactions == 0 {
		t.Errorf("no activity log transaction for writes into cold extents")
	}
	r.WaitProtected(30*time.Second, v)
	r.CheckIdentical(v)
}
