package hub_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// eventLog collects a hub's state events.
type eventLog struct {
	mu  sync.Mutex
	evs []hub.Event
}

func (l *eventLog) add(e hub.Event) {
	l.mu.Lock()
	l.evs = append(l.evs, e)
	l.mu.Unlock()
}

// find returns the first event of volume into state, waiting up to 5 s
// for it: events are delivered by their own goroutine, after the state
// change is visible in the hub's status.
func (l *eventLog) find(volume, state string) (hub.Event, bool) {
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		l.mu.Lock()
		for _, e := range l.evs {
			if e.Volume == volume && e.State == state {
				l.mu.Unlock()
				return e, true
			}
		}
		l.mu.Unlock()
		if time.Now().After(deadline) {
			return hub.Event{}, false
		}
	}
}

// waitState waits until the hub reports volume in state.
func waitState(t *testing.T, r *reptest.Rig, volume, state string) hub.VolumeStatus {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if s, ok := r.HubVolumes()[volume]; ok && s.State == state {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume %s never %s: %+v", volume, state, r.HubVolumes()[volume])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStoreFsyncError: once an fsync of a recovery volume fails, the
// volume is store-error (state, event, counter), its durable state does
// not move while guest writes go on and the agent reconnects, and when
// the store heals protection resumes from that state and the replica ends
// identical.
func TestStoreFsyncError(t *testing.T) {
	var store hub.FaultyStore
	var events eventLog
	r := faultyRig(t, &store, &events)
	a := r.AddVolume("root", 8<<20)
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(20*time.Second, a)
	statePath := filepath.Join(r.HubCfg.Store, "vm1", "root.state.json")
	hub.Fail(&store.SyncErr, syscall.EIO)
	time.Sleep(100 * time.Millisecond) // no writes: nothing to checkpoint
	before, err := os.ReadFile(statePath)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	wait := r.RunWritersPaced(stop, 2*time.Millisecond, a)
	st := waitState(t, r, "root", hub.StateStoreError)
	if !strings.Contains(st.StoreError, "sync") || st.StoreErrors == 0 {
		t.Errorf("store error %q, %d errors", st.StoreError, st.StoreErrors)
	}
	if e, ok := events.find("root", hub.StateStoreError); !ok || !strings.Contains(e.Reason, "input/output error") {
		t.Errorf("no store-error event with the fsync error: %+v", e)
	}
	// Writes go on, the agent reconnects, the hub retries: the store
	// still fails, and nothing is marked synced.
	time.Sleep(1500 * time.Millisecond)
	after, err := os.ReadFile(statePath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("the durable state moved after the fsync error:\nbefore %s\nafter  %s", before, after)
	}
	if got := r.HubVolumes()["root"]; got.State != hub.StateStoreError {
		t.Errorf("state %s while the store still fails", got.State)
	}
	if n := store.FailedSyncs(); n < 2 {
		t.Errorf("%d failed fsyncs: the hub did not try again", n)
	}
	t.Logf("%d failed fsyncs, %d store errors counted", store.FailedSyncs(), r.HubVolumes()["root"].StoreErrors)
	// The store heals: protection resumes and the replica ends identical.
	hub.Fail(&store.SyncErr, nil)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(30*time.Second, a)
	r.CheckIdentical(a)
}

// TestStoreNoSpace: the replica images are preallocated; a journal
// write that fails with ENOSPC puts the VM's volumes (one journal holds
// them all) in store-error with the reason, nothing more is acknowledged,
// and once there is room again protection resumes and the replicas end
// identical. (Before the journal, only the volume whose image could not
// be allocated was affected; the journal is per VM, so now all of the
// VM's volumes stop, and resume on the same connection.)
func TestStoreNoSpace(t *testing.T) {
	var store hub.FaultyStore
	r := reptest.New(t)
	store.Install(&r.HubCfg)
	r.StartHub()
	a := r.AddVolume("root", 8<<20)
	b := r.AddVolume("data", 4<<20)
	b.Model = reptest.Pattern(9, 4<<20)
	os.WriteFile(b.Backing, b.Model, 0o600)
	r.StartAgent(reptest.ProtectAll(a, b))
	r.WaitProtected(20*time.Second, a, b)
	if err := r.Hub.ApplyNow("vm1"); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(r.HubCfg.Store, "vm1", "root.img"))
	if err != nil {
		t.Fatal(err)
	}
	if alloc := fi.Sys().(*syscall.Stat_t).Blocks * 512; alloc < a.Size {
		t.Errorf("replica of %d bytes has %d bytes allocated, want it preallocated", a.Size, alloc)
	}
	hub.Fail(&store.AllocateErr, syscall.ENOSPC)
	stop := make(chan struct{})
	wait := r.RunWritersPaced(stop, 2*time.Millisecond, a, b)
	for _, v := range []string{"root", "data"} {
		st := waitState(t, r, v, hub.StateStoreError)
		if !strings.Contains(st.StoreError, "no space left on device") {
			t.Errorf("%s: store error %q", v, st.StoreError)
		}
	}
	acked := r.Agent.Status()
	time.Sleep(300 * time.Millisecond)
	if got := r.HubVolumes()["root"]; got.State != hub.StateStoreError {
		t.Errorf("root: %s while the store is full", got.State)
	}
	// Nothing is acknowledged while the journal cannot write.
	if now := r.Agent.Status().Acked; now != acked.Acked {
		t.Errorf("the hub acknowledged up to %d after the store error (was %d)", now, acked.Acked)
	}
	hub.Fail(&store.AllocateErr, nil)
	close(stop)
	wait()
	r.WaitProtected(30*time.Second, a, b)
	r.CheckIdentical(a, b)
	t.Logf("agent before healing: %+v", acked.Volumes)
}

// stateSampler records a hub's volume states every 10 ms.
type stateSampler struct {
	mu      sync.Mutex
	samples []stateSample
	stop    chan struct{}
	done    chan struct{}
}

type stateSample struct {
	at    time.Time
	state map[string]string
}

func sampleStates(r *reptest.Rig) *stateSampler {
	s := &stateSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			st := map[string]string{}
			for name, v := range r.HubVolumes() {
				st[name] = v.State
			}
			s.mu.Lock()
			s.samples = append(s.samples, stateSample{at: time.Now(), state: st})
			s.mu.Unlock()
			select {
			case <-s.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	return s
}

func (s *stateSampler) end() []stateSample {
	close(s.stop)
	<-s.done
	return s.samples
}

// secondVM starts another agent (vm2) with one protected volume on r's
// hub.
func secondVM(t *testing.T, r *reptest.Rig, name string) (*reptest.Rig, *reptest.Vol) {
	r2 := reptest.New(t)
	r2.AgentCfg.VM = "vm2"
	r2.AgentCfg.UUID = "0b5e1c52-7f0d-4a55-8e0e-5f1b7f3c9d21"
	r2.HubCfg = r.HubCfg
	r2.Hub, r2.Addr = r.Hub, r.Addr
	v := r2.AddVolume(name, 4<<20)
	r2.StartAgent(reptest.ProtectAll(v))
	r2.WaitProtected(20*time.Second, v)
	return r2, v
}

// checkVM2 compares vm2's volume with its replica.
func checkVM2(t *testing.T, r2 *reptest.Rig, v *reptest.Vol) {
	t.Helper()
	if err := r2.Hub.ApplyNow("vm2"); err != nil {
		t.Fatalf("apply vm2's journal: %v", err)
	}
	if err := reptest.SameFiles(v.Backing, filepath.Join(r2.HubCfg.Store, "vm2", v.Name+".img"), v.Size); err != nil {
		t.Errorf("vm2 %s: replica differs from source: %v", v.Name, err)
	}
}

// TestStoreFaultHealsLive: a journal write of vm1 fails with ENOSPC (a
// full file system) under guest writes while the agent stays connected.
// The hub stops vm1's mirroring, retries its store with backoff (counted,
// last error shown) and, once the store has room again, resyncs what
// changed meanwhile and protects vm1 again — without a reconnect, never
// reporting protecting during the outage nor leaving store-error for
// protecting without a resync; the replicas end identical. vm2, on the
// same hub and a store that works, keeps protecting throughout.
func TestStoreFaultHealsLive(t *testing.T) {
	var store hub.FaultyStore
	var events eventLog
	store.Match = string(filepath.Separator) + "vm1" + string(filepath.Separator)
	r := faultyRig(t, &store, &events)
	a := r.AddVolume("root", 8<<20)
	b := r.AddVolume("data", 4<<20)
	r.StartAgent(reptest.ProtectAll(a, b))
	r.WaitProtected(20*time.Second, a, b)
	r2, c := secondVM(t, r, "other")
	connects := r.Agent.Status().Connects

	samples := sampleStates(r)
	stop := make(chan struct{})
	wait := r.RunWritersPaced(stop, 2*time.Millisecond, a, b)
	stop2 := make(chan struct{})
	wait2 := r2.RunWritersPaced(stop2, 2*time.Millisecond, c)
	time.Sleep(200 * time.Millisecond)
	hub.Fail(&store.WriteErr, syscall.ENOSPC)
	armed := time.Now()
	for _, v := range []string{"root", "data"} {
		st := waitState(t, r, v, hub.StateStoreError)
		t.Logf("%s store-error %v after the fault: %s", v, time.Since(armed).Round(time.Millisecond), st.StoreError)
	}
	// The store stays full: the hub keeps retrying, neither busily nor
	// at the expense of vm2.
	const outage = 2500 * time.Millisecond
	time.Sleep(outage)
	st := r.HubVolumes()["root"]
	if st.State != hub.StateStoreError || st.StoreRetries < 3 || st.StoreRetries > 15 {
		t.Errorf("root after %v of a full store: state %s, %d failed retries (want store-error, 3 to 15 at 300 ms)",
			outage, st.State, st.StoreRetries)
	}
	if st.StoreError == "" {
		t.Errorf("root: no last store error shown")
	}
	t.Logf("during the outage: %d failed retries, last error %q, %d store errors", st.StoreRetries, st.StoreError, st.StoreErrors)

	// Room again: protection resumes on the same connection.
	hub.Fail(&store.WriteErr, nil)
	healed := time.Now()
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(30*time.Second, a, b)
	t.Logf("protecting %v after the store healed", time.Since(healed).Round(time.Millisecond))
	close(stop2)
	wait2()
	r2.WaitProtected(20*time.Second, c)
	all := samples.end()
	if n := r.Agent.Status().Connects; n != connects {
		t.Errorf("the agent connected %d times during the outage: the hub should recover on the live connection", n-connects)
	}

	// From the first store-error until the heal, never protecting; vm2
	// protecting all along.
	for _, s := range all {
		if got := s.state["other"]; got != hub.StateProtecting {
			t.Errorf("vm2's volume %s at %v, while vm1's store was failing", got, s.at.Sub(armed))
			break
		}
	}
	for _, vol := range []string{"root", "data"} {
		failed := false
		for _, s := range all {
			if s.state[vol] == hub.StateStoreError {
				failed = true
			}
			if failed && s.at.Before(healed) && s.state[vol] == hub.StateProtecting {
				t.Errorf("%s reported protecting at %v, during the outage", vol, s.at.Sub(armed))
				break
			}
		}
		if !failed {
			t.Errorf("%s: no store-error sample", vol)
		}
	}
	// Out of store-error only into syncing: the resync of what changed
	// comes before protecting.
	events.mu.Lock()
	var seq []string
	for _, e := range events.evs {
		if e.Volume == "root" || e.Volume == "data" {
			seq = append(seq, fmt.Sprintf("%s:%s->%s", e.Volume, e.Previous, e.State))
			if e.Previous == hub.StateStoreError && e.State != hub.StateSyncing {
				t.Errorf("%s went from store-error to %s", e.Volume, e.State)
			}
		}
	}
	events.mu.Unlock()
	t.Logf("vm1 events: %v", seq)
	r.CheckIdentical(a, b)
	checkVM2(t, r2, c)
}

// faultyRig starts a rig's hub on store, its events into events,
// retrying a failed store every 300 ms.
func faultyRig(t *testing.T, store *hub.FaultyStore, events *eventLog) *reptest.Rig {
	r := reptest.New(t)
	store.Install(&r.HubCfg)
	r.HubCfg.OnEvent = events.add
	r.HubCfg.StoreRetry = 300 * time.Millisecond
	r.StartHub()
	return r
}
