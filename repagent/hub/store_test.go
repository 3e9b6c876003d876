package hub_test

import (
	"bytes"
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
	r := reptest.New(t)
	store.Install(&r.HubCfg)
	r.HubCfg.OnEvent = events.add
	r.HubCfg.StoreRetry = 300 * time.Millisecond
	r.StartHub()
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
