package hub_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// heldBy returns whether h's status says it holds vm.
func heldBy(h *hub.Hub, vm string) bool {
	for _, s := range h.Status() {
		if s.VM == vm {
			return s.Held
		}
	}
	return false
}

// TestSharedStoreTwoHubs: two hubs on one store (Config.Shared; the
// directory store's lock stands in for the Ceph lease, which the Ceph
// build's TestCephTwoHubsKill exercises with hub processes). The agent,
// given both addresses, attaches to the first, which then holds the VM:
// a HELLO for the VM at the other hub is refused naming
// wire.ReasonHeldElsewhere. The first hub crashes under writes: the agent
// moves to the second, which takes the VM, reads its state from the store
// and resyncs only what the crash left unacknowledged; the replica ends
// identical.
func TestSharedStoreTwoHubs(t *testing.T) {
	r := reptest.New(t)
	r.HubCfg.Shared = true
	r.StartHub()
	cfgB := r.HubCfg
	cfgB.Name = "hub-b"
	hb, addrB := reptest.ServeHub(t, cfgB)
	a := r.AddVolume("root", 64<<20)
	r.AgentCfg.Hubs = []string{r.Addr, addrB}
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(30*time.Second, a)
	if !heldBy(r.Hub, "vm1") || heldBy(hb, "vm1") {
		t.Fatalf("vm1 held by the first hub %v, by the second %v: want the first only", heldBy(r.Hub, "vm1"), heldBy(hb, "vm1"))
	}
	if got := r.Agent.Status().Hub; got != r.Addr {
		t.Fatalf("agent's hub %q, want the first %q", got, r.Addr)
	}

	// Another agent of vm1 that knows only the second hub is refused.
	other, err := agent.New(agent.Config{Hub: addrB, VM: "vm1", UUID: r.AgentCfg.UUID, Logger: reptest.Logger(),
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- other.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(other.Status().Refused, wire.ReasonHeldElsewhere) {
		if time.Now().After(deadline) {
			t.Fatalf("the second hub did not refuse vm1 as held elsewhere: %+v", other.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
	other.Abort()
	if !heldBy(r.Hub, "vm1") || !r.Agent.Status().Connected {
		t.Fatal("the refused agent disturbed the holder")
	}

	stop := make(chan struct{})
	wait := r.RunWritersPaced(stop, 5*time.Millisecond, a)
	time.Sleep(500 * time.Millisecond)
	r.KillHub()
	killed := time.Now()
	for st := r.Agent.Status(); !st.Connected || st.Hub != addrB; st = r.Agent.Status() {
		if time.Since(killed) > 20*time.Second {
			t.Fatalf("the agent did not move to the second hub: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("agent attached to the second hub %v after the first crashed", time.Since(killed).Round(time.Millisecond))
	r.Hub = hb
	time.Sleep(300 * time.Millisecond)
	close(stop)
	n := wait()
	r.WaitProtected(30*time.Second, a)
	if !heldBy(hb, "vm1") {
		t.Fatal("the second hub does not say it holds vm1")
	}
	r.CheckIdentical(a)
	got := r.RemoteBytes(a)
	t.Logf("%d writes; the second hub read %d bytes by remote IO (%.1f%% of the volume)", n, got, 100*float64(got)/float64(a.Size))
	if got >= uint64(a.Size)/4 {
		t.Errorf("the second hub read %d bytes of %d: a full resync", got, a.Size)
	}
}

// leasedBackend is a directory backend whose journal stores can lose
// their hold (hub.LeaseHolder), as the Ceph store's lease can.
type leasedBackend struct {
	hub.Backend
	mu     sync.Mutex
	latest map[string]*leasedStore
}

type leasedStore struct {
	journal.Store
	lost atomic.Bool
}

func (s *leasedStore) LeaseErr() error {
	if s.lost.Load() {
		return errors.New("lease lost (test)")
	}
	return nil
}

func (b *leasedBackend) Journal(vm string) journal.Store {
	s := &leasedStore{Store: b.Backend.Journal(vm)}
	b.mu.Lock()
	b.latest[vm] = s
	b.mu.Unlock()
	return s
}

// lose makes the store of vm's journal opened last lose its hold.
func (b *leasedBackend) lose(vm string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.latest[vm].lost.Store(true)
}

// TestSharedLeaseLost: a hub on a shared store whose hold on a VM is lost
// drops the VM's agent connection, says it no longer holds the VM and
// closes its journal; when the agent comes back and the hold can be taken
// again, the hub reads the VM's state from the store and protection
// resumes without a full resync, the replica identical.
func TestSharedLeaseLost(t *testing.T) {
	r := reptest.New(t)
	b := &leasedBackend{Backend: hub.DirBackend(r.HubCfg.Store), latest: map[string]*leasedStore{}}
	r.HubCfg.Shared, r.HubCfg.Backend = true, b
	r.StartHub()
	a := r.AddVolume("root", 32<<20)
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(30*time.Second, a)
	connects := r.Agent.Status().Connects
	stop := make(chan struct{})
	wait := r.RunWritersPaced(stop, 5*time.Millisecond, a)
	time.Sleep(300 * time.Millisecond)
	b.lose("vm1")
	lost := time.Now()
	// Dropped: the agent reconnects (a new connection) and the hub takes
	// the VM again with a new hold.
	for r.Agent.Status().Connects == connects || !heldBy(r.Hub, "vm1") {
		if time.Since(lost) > 20*time.Second {
			t.Fatalf("the hub did not drop and retake vm1 after its lease was lost: %+v", r.Hub.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("vm1 dropped and taken again %v after the lease was lost", time.Since(lost).Round(time.Millisecond))
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(30*time.Second, a)
	r.CheckIdentical(a)
	if got := r.RemoteBytes(a); got >= uint64(a.Size)/4 {
		t.Errorf("read %d bytes of %d after the lease was lost: a full resync", got, a.Size)
	}
}

// statusWithin returns the hub's volumes, or ends the test binary with
// every goroutine's stack when the hub does not answer within d: a
// deadlocked hub also hangs the rig's cleanup (Hub.Close), which runs
// before a failure or a panic is reported, so the test could only time
// out.
func statusWithin(t *testing.T, r *reptest.Rig, d time.Duration) map[string]hub.VolumeStatus {
	t.Helper()
	got := make(chan map[string]hub.VolumeStatus, 1)
	go func() { got <- r.HubVolumes() }()
	select {
	case vols := <-got:
		return vols
	case <-time.After(d):
		buf := make([]byte, 4<<20)
		buf = buf[:runtime.Stack(buf, true)]
		fmt.Fprintf(os.Stderr, "%s\n--- FAIL: %s: the hub did not answer a status request within %s: deadlocked\n",
			buf, t.Name(), d)
		os.Exit(1)
		return nil
	}
}

// TestJournalErrorUnderLock: a journal Submit that fails while the hub
// holds its lock (a protected volume reported while the VM's journal is
// broken by a store fault: protect journals the new volume's size) puts
// the VM's volumes in store-error and the hub keeps answering (it used to
// take its lock again there and hang for good); once the store heals the
// volumes are protected again and the replicas end identical.
func TestJournalErrorUnderLock(t *testing.T) {
	var store hub.FaultyStore
	r := reptest.New(t)
	store.Install(&r.HubCfg)
	r.HubCfg.StoreRetry = 300 * time.Millisecond
	r.StartHub()
	a := r.AddVolume("root", 8<<20)
	b := r.AddVolume("data", 4<<20)
	b.Model = reptest.Pattern(5, 4<<20)
	if err := os.WriteFile(b.Backing, b.Model, 0o600); err != nil {
		t.Fatal(err)
	}
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(20*time.Second, a)

	// Break the VM's journal with a store fault, past the connection so
	// that nothing ends it: the next Submit fails at once.
	hub.Fail(&store.WriteErr, syscall.EIO)
	j := r.Hub.Journal("vm1")
	if j == nil {
		t.Fatal("vm1 has no journal")
	}
	p, err := j.Submit(journal.Record{Kind: journal.KindCheckpoint, Checkpoint: "break"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := p.Wait(ctx); err == nil {
		t.Fatal("the journal write did not fail with the store fault armed")
	}

	// A new protected volume: the hub journals its size holding its lock.
	r.Attach(b, agent.VolumeOptions{Protect: true})
	deadline := time.Now().Add(10 * time.Second)
	for {
		vols := statusWithin(t, r, 5*time.Second)
		if st := vols["data"]; st.State == hub.StateStoreError {
			if !strings.Contains(st.StoreError, "input/output error") {
				t.Errorf("data: store error %q", st.StoreError)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("data never store-error: %+v", vols["data"])
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Still answering while the store fails and the hub retries.
	time.Sleep(500 * time.Millisecond)
	statusWithin(t, r, 5*time.Second)

	// The store heals: both volumes are protected again, identical.
	hub.Fail(&store.WriteErr, nil)
	stop := make(chan struct{})
	wait := r.RunWritersPaced(stop, 2*time.Millisecond, a, b)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(30*time.Second, a, b)
	r.CheckIdentical(a, b)
}
