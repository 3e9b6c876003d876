package hub_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// groupVol is a consistency group's volume as the agent wraps it: its
// writes come through MirrorWrite.
type groupVol struct{ sectors uint64 }

func (v groupVol) Submit(r *mapper.Request) error                         { return mapper.ErrUnsupported }
func (v groupVol) Size() uint64                                           { return v.sectors }
func (v groupVol) ReadOnly() bool                                         { return false }
func (v groupVol) OnResize(func(oldSize, newSize uint64)) (cancel func()) { return func() {} }

// TestGroupAgent drives a group agent against a hub on loopback:
// new volumes are not consistent until the source says so, the hub then
// grants a failover test on copies, and unacknowledged writes lost with a
// connection are reported once by Sync and make the group inconsistent
// again.
func TestGroupAgent(t *testing.T) {
	h, err := hub.New(hub.Config{Store: t.TempDir(), Name: "hub", Logger: reptest.Logger(),
		Heartbeat: 100 * time.Millisecond, CheckpointInterval: 5 * time.Millisecond,
		ApplyDelay: 100 * time.Millisecond}) // a slow hub: writes can die unacknowledged
	if err != nil {
		t.Fatal(err)
	}
	ln, err := h.Listen("127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { defer close(served); h.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); h.Close(); <-served })

	var mu sync.Mutex
	var conns []net.Conn
	a, err := agent.New(agent.Config{Hub: ln.Addr().String(), VM: "g", Group: true, Logger: reptest.Logger(),
		Heartbeat: 100 * time.Millisecond, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		Dial: func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
			return c, err
		}})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b"} {
		if _, err := a.Attach(n, groupVol{64}, agent.VolumeOptions{Protect: true}); err != nil {
			t.Fatal(err)
		}
	}
	runDone := make(chan struct{})
	go func() { defer close(runDone); a.Run(ctx) }()
	t.Cleanup(func() { a.Close(); cancel(); <-runDone })

	data := func(b byte) []byte { return bytes.Repeat([]byte{b}, 8*wire.SectorSize) }
	mirror := func(vol string, b byte) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := a.MirrorWrite(vol, mapper.OpWrite, 8, 8, data(b))
			if err == nil {
				return
			}
			if !errors.Is(err, agent.ErrNotMirrored) || time.Now().After(deadline) {
				t.Fatalf("mirror to %s: %v", vol, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	status := func() hub.VMStatus {
		for _, s := range h.Status() {
			if s.VM == "g" {
				return s
			}
		}
		return hub.VMStatus{}
	}
	waitState := func(consistent bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			s := status()
			if s.Group && s.GroupConsistent == consistent && s.Connected {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("hub status %+v: want a connected group, consistent %v", s, consistent)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	mirror("a", 1)
	mirror("b", 2)
	if err := a.Sync(); err != nil {
		t.Fatal(err)
	}
	waitState(false) // new volumes: not yet copied by the source
	// While the source resynchronises the group, the journal's newest
	// consistent point stays the one before: a failover test runs there
	// (on zero-filled volumes here, nothing was consistent yet).
	if s := status(); s.Journal == nil || !s.Journal.Resyncing {
		t.Fatalf("an inconsistent group is not a resync set in the journal: %+v", s.Journal)
	}
	a.SetConsistent(true)
	if err := a.Sync(); err != nil {
		t.Fatal(err)
	}
	waitState(true)
	if a.MirrorWrite("a", mapper.OpWrite, 0, 1, data(0)) == nil {
		t.Error("MirrorWrite took 4096 bytes for 1 sector")
	}
	if err := a.MirrorWrite("b", mapper.OpWriteZeroes, 60, 8, nil); err == nil {
		t.Error("MirrorWrite beyond the volume's end")
	}

	dir := t.TempDir()
	if err := h.FailoverTest("g", dir, reptest.Runner(new([]hub.TestVolume))); err != nil {
		t.Fatal(err)
	}
	mirror("a", 3) // mirroring goes on during the test
	for i, n := range []string{"a", "b"} {
		img, err := os.ReadFile(filepath.Join(dir, "point", n+".img"))
		if err != nil {
			t.Fatal(err)
		}
		if want := data(byte(i + 1)); len(img) != 64*wire.SectorSize || !bytes.Equal(img[8*wire.SectorSize:16*wire.SectorSize], want) {
			t.Errorf("failover copy of %s does not hold the write before the test point", n)
		}
	}
	if err := h.FailoverTestStop("g"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "point", "a.img")); !os.IsNotExist(err) {
		t.Errorf("the failover copy is left after the test: %v", err)
	}
	if err := a.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := h.ApplyNow("g"); err != nil { // the replicas are the journal's base images
		t.Fatal(err)
	}
	for _, v := range status().Volumes {
		img, _ := os.ReadFile(v.Replica)
		want := map[string]byte{"a": 3, "b": 2}[v.Volume]
		if !bytes.Equal(img[8*wire.SectorSize:16*wire.SectorSize], data(want)) {
			t.Errorf("replica of %s does not hold its last write", v.Volume)
		}
	}

	// A write the hub never acknowledges dies with the connection.
	mirror("b", 4)
	time.Sleep(20 * time.Millisecond)
	mu.Lock()
	for _, c := range conns {
		c.Close()
	}
	mu.Unlock()
	if err := a.Sync(); !errors.Is(err, agent.ErrNotMirrored) {
		t.Fatalf("Sync after losing a write: %v, want ErrNotMirrored", err)
	}
	waitState(false)
	mirror("b", 4)
	if err := a.Sync(); err != nil {
		t.Fatalf("Sync after the loss was reported: %v", err)
	}
	a.SetConsistent(true)
	if err := a.Sync(); err != nil {
		t.Fatal(err)
	}
	waitState(true)
}
