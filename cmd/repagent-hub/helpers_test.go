package main

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// Scaffolding shared by the tests that run a repagent-hub child process,
// on a directory store or (build tag ceph) a Ceph store.

// freeAddr returns a loopback address with a free port for a hub child
// process to listen on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// dirtyMappedBytes is the size of the regions r's agent has sent in
// DIRTY_MAPs so far (what it asked the hub to resync).
func dirtyMappedBytes(r *reptest.Rig) uint64 {
	var n uint64
	for _, v := range r.Agent.Status().Volumes {
		n += v.Stats.DirtyMapRegions
	}
	return n * wire.DefaultRegionSectors * wire.SectorSize
}

// remoteReadBytes is what the hub has read from r's agent with remote
// reads so far.
func remoteReadBytes(r *reptest.Rig) uint64 {
	var n uint64
	for _, v := range r.Agent.Status().Volumes {
		n += v.Stats.RemoteBytes
	}
	return n
}

// waitHubProtected waits up to timeout until hp serves one VM, connected,
// with its nvols volumes protecting and no resync set open, and r's agent
// mirrors every volume with nothing dirty; why names the moment in the
// failure.
func waitHubProtected(t *testing.T, hp *hubProc, r *reptest.Rig, nvols int, timeout time.Duration, why string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := hp.status()
		ok := err == nil && len(st) == 1 && st[0].Connected && len(st[0].Volumes) == nvols &&
			st[0].Journal != nil && !st[0].Journal.Resyncing
		if ok {
			for _, v := range st[0].Volumes {
				ok = ok && v.State == hub.StateProtecting
			}
			for _, v := range r.Agent.Status().Volumes {
				ok = ok && v.Mirroring && v.DirtyRegions == 0
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not protected: %+v %v", why, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// writeAroundCheckpoint runs a writer on vols for about a second with the
// agent's named checkpoint taken in the middle (the writer held while it
// is taken), and returns the writer's history and how many of its writes
// came before the checkpoint, which must lie strictly inside it.
func writeAroundCheckpoint(t *testing.T, r *reptest.Rig, vols []*reptest.Vol, name string) (h *history, kCkpt int) {
	t.Helper()
	h = new(history)
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); h.writer(ctx, t, vols, 2*time.Millisecond) }()
	time.Sleep(600 * time.Millisecond)
	h.gate.Lock()
	cctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	err := r.Agent.Checkpoint(cctx, name)
	cancel()
	kCkpt = h.len()
	h.gate.Unlock()
	if err != nil {
		stop()
		wg.Wait()
		t.Fatalf("checkpoint: %v", err)
	}
	time.Sleep(400 * time.Millisecond)
	stop()
	wg.Wait()
	if kCkpt == 0 || kCkpt == h.len() {
		t.Fatalf("the checkpoint is not inside the history: after %d of %d writes", kCkpt, h.len())
	}
	return h, kCkpt
}

// startWriter runs h's writer on vols, one write every pause, until the
// returned stop is called; stop waits for the writer to end and may be
// called again.
func startWriter(t *testing.T, h *history, vols []*reptest.Vol, pause time.Duration) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); h.writer(ctx, t, vols, pause) }()
	return func() { cancel(); wg.Wait() }
}
