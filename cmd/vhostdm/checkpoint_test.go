package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestRepagentCheckpoint: the daemon's repagent-checkpoint puts a named
// checkpoint into the VM's write stream; it returns once the hub journaled
// it. A wrong VM name or a bad checkpoint name is refused.
func TestRepagentCheckpoint(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	os.WriteFile(filepath.Join(dir, "root.img"), reptest.Pattern(1, 4<<20), 0o600)
	path := writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr, "protect = true\n"))
	d, _ := serveInProcess(t, path)
	waitReplicated(t, d, h, store, map[string]string{"root0": filepath.Join(dir, "root.img")})
	if _, err := d.qmpCheckpoint(map[string]string{"vm": "vm1", "name": "nightly-1"}); err != nil {
		t.Fatalf("repagent-checkpoint: %v", err)
	}
	var vm hub.VMStatus
	for _, s := range h.Status() {
		if s.VM == "vm1" {
			vm = s
		}
	}
	if vm.Journal == nil || !slices.Contains(vm.Journal.Checkpoints, "nightly-1") {
		t.Errorf("the hub's journal has no checkpoint nightly-1: %+v", vm.Journal)
	}
	for _, bad := range []map[string]string{{"vm": "vm2", "name": "x"}, {"vm": "vm1", "name": "a/b"}, {"vm": "vm1", "name": ""}} {
		if _, err := d.qmpCheckpoint(bad); err == nil {
			t.Errorf("repagent-checkpoint %v succeeded", bad)
		}
	}
}
