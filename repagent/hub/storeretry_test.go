package hub_test

import (
	"fmt"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

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
	r := reptest.New(t)
	store.Install(&r.HubCfg)
	r.HubCfg.OnEvent = events.add
	r.HubCfg.StoreRetry = 300 * time.Millisecond
	r.StartHub()
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
