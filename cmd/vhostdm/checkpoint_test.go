package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// TestRepagentCheckpoint: the daemon's repagent-checkpoint, over its QMP
// socket, puts a named checkpoint into the VM's write stream and returns
// once the hub journaled it. A name already in the VM's journal is
// refused with a GenericError naming it, and nothing changes: the hub's
// checkpoint of that name still recovers the first point, the connection
// stays up and the next checkpoint works. A wrong VM name and hostile
// names (too long, control bytes, '/', "..", non-ASCII) are refused before
// anything is sent.
func TestRepagentCheckpoint(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	// Checkpoints stay in the retention window for the whole test.
	h, addr := reptest.ServeHub(t, hub.Config{Store: store, Name: "hub", Retain: time.Hour, Logger: slog.New(slog.DiscardHandler)})
	img := filepath.Join(dir, "root.img")
	os.WriteFile(img, reptest.Pattern(1, 4<<20), 0o600)
	path := writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr, "protect = true\n"))
	d, ctx := serveInProcess(t, path)
	// Protected (the replica is not compared: with the retention window
	// the journal is not applied to it).
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ok := false
		for _, s := range h.Status() {
			ok = s.VM == "vm1" && len(s.Volumes) == 1 && s.Volumes[0].State == hub.StateProtecting
		}
		as := d.agent.Status()
		ok = ok && as.Connected && len(as.Volumes) == 1 && as.Volumes[0].Mirroring
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not protected: hub %+v agent %+v", h.Status(), as)
		}
	}
	q := dialQMP(t, filepath.Join(dir, "qmp.sock"))

	cl, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, "root.sock")})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	buf, err := cl.Buf(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	write := func(seed uint64) []byte {
		t.Helper()
		copy(buf, reptest.Pattern(seed, len(buf)))
		if err := cl.WriteAt(context.Background(), 0, buf, 2048); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	checkpoints := func() []string {
		for _, s := range h.Status() {
			if s.VM == "vm1" && s.Journal != nil {
				return s.Journal.Checkpoints
			}
		}
		return nil
	}

	first := write(2)
	if _, err := q.exec("repagent-checkpoint", map[string]any{"vm": "vm1", "name": "nightly-1"}); err != nil {
		t.Fatalf("repagent-checkpoint: %v", err)
	}
	if !slices.Contains(checkpoints(), "nightly-1") {
		t.Fatalf("the hub's journal has no checkpoint nightly-1: %v", checkpoints())
	}
	connects := d.agent.Status().Connects

	// The same name again, after more writes: refused, nothing changed.
	second := write(3)
	_, err = q.exec("repagent-checkpoint", map[string]any{"vm": "vm1", "name": "nightly-1"})
	if err == nil || !strings.HasPrefix(err.Error(), "GenericError: ") || !strings.Contains(err.Error(), `"nightly-1"`) ||
		!strings.Contains(err.Error(), "already used") {
		t.Fatalf("a second checkpoint nightly-1: %v, want a GenericError naming it and saying it is already used", err)
	}
	t.Logf("duplicate refused: %v", err)
	if got := checkpoints(); !slices.Equal(got, []string{"nightly-1"}) {
		t.Errorf("after the refused duplicate the journal has checkpoints %v, want [nightly-1]", got)
	}
	if _, err := q.exec("repagent-checkpoint", map[string]any{"vm": "vm1", "name": "nightly-2"}); err != nil {
		t.Fatalf("repagent-checkpoint nightly-2 after the refusal: %v", err)
	}
	if c := d.agent.Status().Connects; c != connects {
		t.Errorf("the refusal cost a reconnect: %d connects, was %d", c, connects)
	}
	for name, want := range map[string][]byte{"nightly-1": first, "nightly-2": second} {
		out := filepath.Join(dir, "recovered-"+name)
		rec, err := h.Recover(context.Background(), "vm1", journal.AtCheckpoint(name), out)
		if err != nil {
			t.Fatalf("recover --checkpoint %s: %v", name, err)
		}
		got, err := os.ReadFile(rec.Volumes[0].Path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("checkpoint %s does not recover the source as it was when it was taken", name)
		}
	}

	// Hostile input: refused with the reason, nothing journaled.
	for _, bad := range []map[string]any{
		{"vm": "vm2", "name": "x"},
		{"vm": "vm1", "name": ""},
		{"vm": "vm1", "name": strings.Repeat("a", 65)},
		{"vm": "vm1", "name": "a/b"},
		{"vm": "vm1", "name": ".."},
		{"vm": "vm1", "name": "a b"},
		{"vm": "vm1", "name": "x\n\x00\x1b[2J"},
		{"vm": "vm1", "name": "nächtlich"},
		{"vm": "vm1", "name": 7},
		{"vm": "vm1"},
	} {
		_, err := q.exec("repagent-checkpoint", bad)
		if err == nil || !strings.HasPrefix(err.Error(), "GenericError: ") {
			t.Errorf("repagent-checkpoint %q: %v, want a GenericError", bad, err)
			continue
		}
		if strings.ContainsAny(err.Error(), "\n\x00\x1b") {
			t.Errorf("repagent-checkpoint %q: the error carries raw control bytes: %q", bad, err)
		}
	}
	if got := checkpoints(); !slices.Equal(got, []string{"nightly-1", "nightly-2"}) {
		t.Errorf("after hostile names the journal has checkpoints %v, want [nightly-1 nightly-2]", got)
	}
	if c := d.agent.Status().Connects; c != connects {
		t.Errorf("hostile names cost a reconnect: %d connects, was %d", c, connects)
	}
	// The hub resolves only names it journaled.
	if _, err := h.Recover(context.Background(), "vm1", journal.AtCheckpoint("nightly-3"), filepath.Join(dir, "r3")); err == nil {
		t.Errorf("recover of the unknown checkpoint nightly-3 succeeded")
	}
}
