package hub_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
)

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
