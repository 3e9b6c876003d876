package failover_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/vhost/frontend"

	"github.com/vhostdm/vhostdm/cmd/repagent-hub/internal/failover"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
)

// TestFailoverTest: the hub serves the replica to a test VM (a vhost
// client) from a consistent point; after the test, what it wrote and what
// was mirrored meanwhile are resynced.
func TestFailoverTest(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	a := r.AddVolume("root", 8<<20)
	r.StartAgent(reptest.ProtectAll(a))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, a)
	dir := t.TempDir()
	if err := r.Hub.ApplyNow("vm1"); err != nil {
		t.Fatal(err)
	}
	live := filepath.Join(r.HubCfg.Store, "vm1", "root.img")
	exps, err := failover.Start(r.Hub, "vm1", dir, journal.Newest(), reptest.Logger())
	if err != nil {
		t.Fatal(err)
	}
	if len(exps) != 1 || exps[0].Volume != "root" || exps[0].Sectors != uint64(a.Size/512) {
		t.Fatalf("exports %+v", exps)
	}
	// The test runs on a materialised copy: protection goes on.
	if st := r.HubVolumes()["root"]; st.State != hub.StateProtecting {
		t.Errorf("state %s during the test", st.State)
	}
	if _, err := failover.Start(r.Hub, "vm1", dir, journal.Newest(), reptest.Logger()); err == nil {
		t.Errorf("a second failover test started")
	}
	// The source moves on; the test VM sees the replica as it was.
	a.Mu.Lock()
	snapshot := append([]byte(nil), a.Model...)
	a.Mu.Unlock()
	stop = make(chan struct{})
	wait = r.RunWriters(stop, a)
	ctx := reptest.Context(t)
	c, err := frontend.Dial(ctx, frontend.Config{Socket: exps[0].Socket, MemSize: 16 << 20})
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
	if err := c.WriteAt(ctx, 0, reptest.Pattern(99, 64<<10), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// The test VM's write reached its copy, never the live replica.
	if now, err := os.ReadFile(live); err != nil || bytes.Equal(now[:64<<10], reptest.Pattern(99, 64<<10)) {
		t.Errorf("the test VM's write reached the live replica (%v)", err)
	}
	close(stop)
	wait()
	if err := failover.Stop(r.Hub, "vm1"); err != nil {
		t.Fatal(err)
	}
	if err := failover.Stop(r.Hub, "vm1"); err == nil {
		t.Errorf("stopping twice succeeded")
	}
	r.WaitProtected(20*time.Second, a)
	r.CheckIdentical(a)
}

// TestFailoverTestKeep: a failover test stopped with keep leaves its
// materialised copies (and says which); stopped without, they are
// removed.
func TestFailoverTestKeep(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	a := r.AddVolume("root", 4<<20)
	r.StartAgent(reptest.ProtectAll(a))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a)
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, a)
	for _, keep := range []bool{false, true} {
		dir := t.TempDir()
		exps, err := failover.Start(r.Hub, "vm1", dir, journal.Newest(), reptest.Logger())
		if err != nil {
			t.Fatal(err)
		}
		img := exps[0].Image
		if img != filepath.Join(dir, "point", "root.img") {
			t.Fatalf("export image %q", img)
		}
		kept, err := failover.End(r.Hub, "vm1", keep)
		if err != nil {
			t.Fatal(err)
		}
		_, serr := os.Stat(img)
		switch {
		case keep && (len(kept) != 1 || kept[0] != img || serr != nil):
			t.Errorf("keep: kept %v, %s: %v", kept, img, serr)
		case !keep && (len(kept) != 0 || serr == nil):
			t.Errorf("without keep: kept %v, %s still there", kept, img)
		}
	}
}
