package main

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestSeedCommand: `repagent-hub seed` puts existing images into a store
// as a VM's replicas (refusing a VM the store holds); the hub lists them
// with the VM's UUID, and `recover --protect-to` writes a vhostdm
// configuration that serves them under their volume names, protected to
// a hub: the failback's configuration.
func TestSeedCommand(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	imgs := map[string][]byte{"root": reptest.Pattern(1, 1<<20), "data": reptest.Pattern(2, 512<<10)}
	args := []string{"seed", "--store", store, "--vm", "vm1", "--uuid", "6c1d7d0e-3b1f-4d2a-9a51-0c5f2d1e7a10"}
	for n, b := range imgs {
		p := filepath.Join(dir, n+".raw")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--volume", n+"="+p)
	}
	var out, errb bytes.Buffer
	if code := run(args, &out, &errb); code != 0 {
		t.Fatalf("seed: exit %d: %s", code, errb.String())
	}
	if code := run(args, &out, &errb); code != 1 || !strings.Contains(errb.String(), "already holds vm") {
		t.Errorf("seeding again: exit %d: %s", code, errb.String())
	}
	if code := run([]string{"seed", "--store", store, "--vm", "vm2", "--volume", "x"}, &out, &errb); code != 2 {
		t.Errorf("--volume without a path: exit %d", code)
	}
	h, err := hub.New(hub.Config{Store: store, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	st := h.Status()
	h.Close()
	if len(st) != 1 || st[0].UUID != "6c1d7d0e-3b1f-4d2a-9a51-0c5f2d1e7a10" || len(st[0].Volumes) != 2 || st[0].Volumes[1].Volume != "root" || st[0].Volumes[1].Sectors != 2048 {
		t.Fatalf("hub status of the seeded store: %+v", st)
	}
	rec := filepath.Join(dir, "back")
	errb.Reset()
	if code := run([]string{"recover", "--store", store, "--vm", "vm1", "--out", rec, "--protect-to", "127.0.0.1:7070"}, &out, &errb); code != 0 {
		t.Fatalf("recover: exit %d: %s", code, errb.String())
	}
	for n, b := range imgs {
		got, err := os.ReadFile(filepath.Join(rec, n+".img"))
		if err != nil || !bytes.Equal(got, b) {
			t.Errorf("recovered %s differs from the seed image (%v)", n, err)
		}
	}
	cfgPath := filepath.Join(rec, "vm.toml")
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse(b, cfgPath, rec)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RepAgent.Hub != "127.0.0.1:7070" || cfg.RepAgent.VM != "vm1" || cfg.RepAgent.UUID != "6c1d7d0e-3b1f-4d2a-9a51-0c5f2d1e7a10" {
		t.Errorf("[repagent] of the failback configuration: %+v", cfg.RepAgent)
	}
	ids := map[string]bool{}
	for _, e := range cfg.Exports {
		ids[e.ID] = e.Protect
	}
	if len(ids) != 2 || !ids["root"] || !ids["data"] {
		t.Errorf("exports %v: want root and data, protected", ids)
	}
}
