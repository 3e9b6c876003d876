package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/qmp"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestStatusOverQMP: query-repagent and the failover commands are served,
// and `status` prints the table.
func TestStatusOverQMP(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	h, err := hub.New(hub.Config{Store: filepath.Join(dir, "store"), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	sock := filepath.Join(dir, "hub.qmp")
	ln, err := qmp.ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: log})
	defer m.Close()
	srv := qmp.NewServer(qmp.Config{Manager: m, Logger: log, Version: Version, Extra: Commands(h, log)})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Serve(ctx, ln)
	defer srv.Close()

	var out, errb bytes.Buffer
	if code := run([]string{"status", "--qmp", sock}, &out, &errb); code != 0 {
		t.Fatalf("status: exit %d: %s", code, errb.String())
	}
	if !strings.HasPrefix(out.String(), "VM ") || !strings.Contains(out.String(), "APPLIED-SEQ") {
		t.Errorf("status output:\n%s", out.String())
	}
	mon, err := dialQMP(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	raw, err := mon.Run([]byte(`{"execute":"repagent-failover-test","arguments":{"vm":"nope","dir":"/tmp/x"}}`))
	if err == nil || !strings.Contains(err.Error(), `vm "nope" not found`) {
		t.Errorf("failover test of an unknown vm: %s %v", raw, err)
	}
	if _, err := mon.Run([]byte(`{"execute":"repagent-failover-test-stop"}`)); err == nil {
		t.Errorf("missing vm argument accepted")
	}
	if code := run([]string{"serve"}, &out, &errb); code != 2 {
		t.Errorf("serve without --store: exit %d", code)
	}
}

func TestFormatStatus(t *testing.T) {
	s := FormatStatus([]hub.VMStatus{{VM: "vm1", Volumes: []hub.VolumeStatus{
		{Volume: "root", State: hub.StateSyncing, SyncProgress: 0.5, SyncDoneBytes: 1 << 20, SyncTotalBytes: 2 << 20},
		{Volume: "data", State: hub.StateProtecting, SyncProgress: 1, AppliedSeq: 42},
		{Volume: "logs", State: hub.StateStoreError, StoreError: "fsync: input/output error", StoreErrors: 1},
	}}}, true)
	for _, want := range []string{"store-error", "    store error: fsync: input/output error\n", "vm1", "syncing", " 50.0%", "[####################--------------------] 1.0MiB of 2.0MiB", "protecting", "42"} {
		if !strings.Contains(s, want) {
			t.Errorf("missing %q in\n%s", want, s)
		}
	}
}
