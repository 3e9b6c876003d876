package main

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestPromote: an agent replicates two volumes to a repagent-hub child
// process under a writer; `repagent-hub promote --checkpoint` materialises
// the VM at that checkpoint — exactly the writer's state when it was
// taken — with a vhostdm configuration serving it. From then on the hub
// refuses the VM's agent with a reason the agent reports (REFUSED: the VM
// was promoted), the guest's writes still complete at the source, and a
// second promote is refused.
func TestPromote(t *testing.T) {
	dir := t.TempDir()
	hubAddr := freeAddr(t)
	// A retention window: the checkpoint stays recoverable.
	hp := startHubProc(t, dir, hubAddr, 0, "--retain", "1h")
	defer hp.kill()

	r := reptest.New(t)
	r.Addr = hubAddr
	vols := []*reptest.Vol{r.AddVolume("root", 4<<20), r.AddVolume("data", 2<<20)}
	r.StartAgent(reptest.ProtectAll(vols...))
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, err := hp.status()
		ok := err == nil && len(st) == 1 && st[0].Connected && len(st[0].Volumes) == len(vols)
		for _, v := range volumesIn(st) {
			ok = ok && v.State == hub.StateProtecting
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not protected: %+v %v", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	h, kCkpt := writeAroundCheckpoint(t, r, vols, "before-promote")

	out := filepath.Join(dir, "promoted")
	var stdout, stderr bytes.Buffer
	if code := run([]string{"promote", "--qmp", hp.qmp, "--vm", "vm1", "--out", out, "--checkpoint", "before-promote"}, &stdout, &stderr); code != 0 {
		t.Fatalf("promote: exit %d: %s", code, stderr.String())
	}
	var rec Recovered
	if err := json.Unmarshal(stdout.Bytes(), &rec); err != nil {
		t.Fatalf("promote output %q: %v", stdout.String(), err)
	}
	var paths []string
	for _, v := range vols {
		paths = append(paths, filepath.Join(out, v.Name+".img"))
	}
	if k, err := h.prefixOf(readImages(t, paths)); err != nil || k != kCkpt {
		t.Errorf("promoted volumes hold the first %d writes (%v), want the %d of the checkpoint", k, err, kCkpt)
	}
	if c, err := config.Load(rec.Config); err != nil || len(c.Exports) != len(vols) {
		t.Errorf("the promoted VM's configuration %s: %v", rec.Config, err)
	}
	t.Logf("promoted at seq %d: the first %d of %d writes", rec.Seq, kCkpt, h.len())

	// The agent is refused, and says why; the guest's writes go on.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		as := r.Agent.Status()
		if !as.Connected && strings.Contains(as.Refused, "promoted") {
			t.Logf("agent: refused: %s", as.Refused)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent is not refused with a reason after promote: %+v", as)
		}
	}
	connects := r.Agent.Status().Connects
	if err := vols[0].Client.WriteAt(reptest.Context(t), 0, make([]byte, 4096), 0); err != nil {
		t.Errorf("a guest write after promote: %v", err)
	}
	time.Sleep(500 * time.Millisecond) // the agent retries meanwhile
	if st, err := hp.status(); err != nil || len(st) != 1 || !st[0].Promoted || st[0].Connected {
		t.Errorf("hub after promote: %+v %v, want promoted and disconnected", st, err)
	}
	if c := r.Agent.Status().Connects; c != connects {
		t.Errorf("the agent connected again after promote (%d connects, was %d)", c, connects)
	}
	stdout.Reset()
	stderr.Reset()
	if code := run([]string{"promote", "--qmp", hp.qmp, "--vm", "vm1", "--out", filepath.Join(dir, "again")}, &stdout, &stderr); code == 0 ||
		!strings.Contains(stderr.String(), "already promoted") {
		t.Errorf("a second promote: exit %d, %q; want refused as already promoted", code, stderr.String())
	}
}

func volumesIn(st []hub.VMStatus) []hub.VolumeStatus {
	if len(st) == 0 {
		return nil
	}
	return st[0].Volumes
}
