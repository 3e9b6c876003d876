package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestPointInTimeRecovery: a writer on 2 volumes; a named checkpoint, a
// wall-clock time and a sequence number are taken at 3 moments of its
// history; `repagent-hub recover` (against a hub child process over QMP,
// and offline on its store after the hub is killed) materialises each
// point, and each recovered pair equals the writer's state at that
// moment exactly. The live replica images are untouched by recovery.
func TestPointInTimeRecovery(t *testing.T) {
	dir := t.TempDir()
	hubAddr := freeAddr(t)
	// The initial sync is applied at once (the replica images exist),
	// then the hub restarts with a recovery window of an hour.
	hp := startHubProc(t, dir, hubAddr, 0)
	killed := false
	defer func() {
		if !killed {
			hp.kill()
		}
	}()
	r := reptest.New(t)
	r.Addr = hubAddr
	vols := []*reptest.Vol{r.AddVolume("root", 4<<20), r.AddVolume("data", 2<<20)}
	r.StartAgent(reptest.ProtectAll(vols...))
	acked := func() {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			ok := true
			for _, v := range r.Agent.Status().Volumes {
				ok = ok && v.Mirroring && v.BacklogIOs == 0 && v.DirtyRegions == 0
			}
			if st, err := hp.status(); err != nil || len(st) != 1 || st[0].Journal == nil || st[0].Journal.Resyncing {
				ok = false
			} else {
				for _, v := range st[0].Volumes {
					ok = ok && v.State == hub.StateProtecting
				}
			}
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("not protected: %+v", r.Agent.Status())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	acked()
	for i := 0; ; i++ {
		if _, err := os.Stat(filepath.Join(hp.store, "vm1", "data.img")); err == nil {
			break
		}
		if i > 500 {
			t.Fatal("the applier never created the replica images")
		}
		time.Sleep(20 * time.Millisecond)
	}
	hp.kill()
	hp = startHubProc(t, dir, hubAddr, 1, "--retain", "1h")
	acked()

	var h history
	stop := startWriter(t, &h, vols, time.Millisecond)
	defer stop()
	count := func() int {
		h.mu.Lock()
		defer h.mu.Unlock()
		return len(h.writes)
	}

	// Point 1: a sequence number, once every write so far is acknowledged.
	time.Sleep(300 * time.Millisecond)
	h.gate.Lock()
	acked()
	kSeq, seq := count(), r.Agent.Status().Acked
	h.gate.Unlock()
	// Point 2: a time between two writes.
	time.Sleep(300 * time.Millisecond)
	h.gate.Lock()
	acked()
	time.Sleep(20 * time.Millisecond)
	at := time.Now()
	time.Sleep(20 * time.Millisecond)
	kTime := count()
	h.gate.Unlock()
	// Point 3: a named checkpoint (guest file systems would be frozen).
	time.Sleep(300 * time.Millisecond)
	h.gate.Lock()
	cctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	err := r.Agent.Checkpoint(cctx, "before-upgrade")
	cancel()
	kCkpt := count()
	h.gate.Unlock()
	if err != nil {
		t.Fatalf("checkpoint: %v", err)
	}
	// The same name again, later in the stream: the hub refuses it and
	// the name keeps selecting the first point (checked below).
	time.Sleep(100 * time.Millisecond)
	cctx, cancel = context.WithTimeout(context.Background(), 20*time.Second)
	err = r.Agent.Checkpoint(cctx, "before-upgrade")
	cancel()
	if !errors.Is(err, agent.ErrCheckpointRefused) || !strings.Contains(err.Error(), `"before-upgrade"`) {
		t.Fatalf("a second checkpoint of the same name: %v, want refused, naming it", err)
	}
	t.Logf("a second checkpoint of the same name: %v", err)
	time.Sleep(300 * time.Millisecond)
	stop()
	acked()
	t.Logf("points: seq %d after %d writes, time %s after %d, checkpoint after %d; %d writes in all",
		seq, kSeq, at.Format(time.RFC3339Nano), kTime, kCkpt, h.len())
	if !(0 < kSeq && kSeq < kTime && kTime < kCkpt && kCkpt < h.len()) {
		t.Fatalf("the points are not distinct: %d %d %d of %d", kSeq, kTime, kCkpt, h.len())
	}

	sum := func() [2][32]byte {
		var out [2][32]byte
		for i, v := range vols {
			b, err := os.ReadFile(filepath.Join(hp.store, "vm1", v.Name+".img"))
			if err != nil {
				t.Fatal(err)
			}
			out[i] = sha256.Sum256(b)
		}
		return out
	}
	liveBefore := sum()
	check := func(name string, want int, args ...string) {
		t.Helper()
		out := filepath.Join(dir, name)
		rec := recoverCLI(t, append([]string{"--vm", "vm1", "--out", out}, args...)...)
		var paths []string
		for _, v := range vols {
			paths = append(paths, filepath.Join(out, v.Name+".img"))
		}
		k, err := h.prefixOf(readImages(t, paths))
		if err != nil || k != want {
			t.Errorf("%s (%v): recovered the first %d writes (%v), want the first %d", name, args, k, err, want)
		}
		c, err := config.Load(rec.Config)
		if err != nil || len(c.Exports) != len(vols) {
			t.Errorf("%s: the recovered configuration: %v", name, err)
		}
		t.Logf("%s: %s mode, seq %d, %d writes", name, rec.Mode, rec.Seq, k)
	}
	check("at-seq", kSeq, "--qmp", hp.qmp, "--seq", fmt.Sprint(seq))
	check("at-time", kTime, "--qmp", hp.qmp, "--at", at.UTC().Format(time.RFC3339Nano))
	check("at-checkpoint", kCkpt, "--qmp", hp.qmp, "--checkpoint", "before-upgrade")
	check("newest", h.len(), "--qmp", hp.qmp)
	if liveBefore != sum() {
		t.Errorf("recovery changed the live replica images")
	}
	for _, bad := range []struct {
		name string
		code int
		says string
	}{
		{"no-such-checkpoint", 1, "unknown checkpoint"},
		{"a/b", 2, "not a valid name"},
		{"..", 2, "not a valid name"},
		{strings.Repeat("x", 200), 2, "not a valid name"},
		{"x\x1b[2J", 2, "not a valid name"},
	} {
		var errOut, stdout bytes.Buffer
		code := run([]string{"recover", "--vm", "vm1", "--out", filepath.Join(dir, "bad-checkpoint"), "--qmp", hp.qmp, "--checkpoint", bad.name}, &stdout, &errOut)
		if code != bad.code || !strings.Contains(errOut.String(), bad.says) || strings.Contains(errOut.String(), "\x1b") {
			t.Errorf("recover --checkpoint %q: exit %d, %q; want exit %d saying %q", bad.name, code, errOut.String(), bad.code, bad.says)
		}
	}
	var errOut, stdout bytes.Buffer
	if code := run([]string{"recover", "--vm", "vm1", "--out", filepath.Join(dir, "offline-refused"), "--store", hp.store}, &stdout, &errOut); code == 0 {
		t.Errorf("offline recovery while the hub runs succeeded")
	}
	// Offline, on the store of a killed hub.
	r.Agent.Abort()
	hp.kill()
	killed = true
	check("offline-checkpoint", kCkpt, "--store", hp.store, "--checkpoint", "before-upgrade")
	check("offline-seq", kSeq, "--store", hp.store, "--seq", fmt.Sprint(seq))
}
