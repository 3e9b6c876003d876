package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// persistConfig is vhostNBDConfig with persistent bitmaps kept in state/.
const persistConfig = "state-dir = \"state\"\n" + vhostNBDConfig

// TestPersistentBitmapRestartAndCrash runs the real daemon: a persistent
// bitmap keeps its bits across a clean stop (SIGTERM, exit 0) while a
// non-persistent one is gone; after kill -9 the persistent bitmap comes
// back inconsistent, not recording, refused for an NBD export with QEMU's
// words, and only removable.
func TestPersistentBitmapRestartAndCrash(t *testing.T) {
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "disk.img"), 8<<20)
	cfg := writeConfig(t, dir, persistConfig)
	qsock := filepath.Join(dir, "qmp.sock")
	vsock := filepath.Join(dir, "v.sock")
	const gran = 65536
	writeChunks := func(chunks ...uint64) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		vc, err := frontend.Dial(ctx, frontend.Config{Socket: vsock})
		if err != nil {
			t.Fatal(err)
		}
		defer vc.Close()
		for _, c := range chunks {
			if err := vc.WriteAt(ctx, 0, bytes.Repeat([]byte{0x5a}, 4096), c*gran/512); err != nil {
				t.Fatal(err)
			}
		}
	}

	c := startChild(t, cfg, qsock, filepath.Join(dir, "v.sock"))
	q := dialQMP(t, qsock)
	q.must("block-dirty-bitmap-add", map[string]any{"node": "disk", "name": "b0", "granularity": gran, "persistent": true})
	q.must("block-dirty-bitmap-add", map[string]any{"node": "disk", "name": "tmp"})
	writeChunks(3, 40)
	if code, took := c.signal(t, syscall.SIGTERM); code != 0 || took > 5*time.Second {
		t.Fatalf("SIGTERM: exit %d after %v", code, took)
	}

	c = startChild(t, cfg, qsock, filepath.Join(dir, "v.sock"))
	q = dialQMP(t, qsock)
	b0, ok := q.bitmapInfo("disk", "b0")
	if !ok || b0.Count != 2*gran || b0.Inconsistent || !b0.Recording || !b0.Persistent {
		t.Fatalf("b0 after a clean restart: %+v (present %v), want 2 chunks, recording, consistent", b0, ok)
	}
	if _, ok := q.bitmapInfo("disk", "tmp"); ok {
		t.Error("a non-persistent bitmap survived the restart")
	}
	writeChunks(100)
	if b0, _ = q.bitmapInfo("disk", "b0"); b0.Count != 3*gran {
		t.Errorf("b0 after another write: count %d, want %d", b0.Count, 3*gran)
	}
	c.cmd.Process.Kill() // kill -9
	<-c.done

	c = startChild(t, cfg, qsock, filepath.Join(dir, "v.sock"))
	q = dialQMP(t, qsock)
	b0, ok = q.bitmapInfo("disk", "b0")
	if !ok || !b0.Inconsistent || b0.Recording {
		t.Fatalf("b0 after kill -9: %+v (present %v), want inconsistent and not recording", b0, ok)
	}
	nsock := filepath.Join(dir, "nbd.sock")
	if _, e := q.call("block-export-add", nbdExportArgs("inc", "disk", nsock, false, "b0")); !strings.Contains(e, "Bitmap 'b0' is inconsistent and cannot be used") {
		t.Errorf("NBD export of an inconsistent bitmap: %q", e)
	}
	if _, e := q.call("block-dirty-bitmap-enable", map[string]any{"node": "disk", "name": "b0"}); !strings.Contains(e, "inconsistent") {
		t.Errorf("enable of an inconsistent bitmap: %q", e)
	}
	q.must("block-dirty-bitmap-remove", map[string]any{"node": "disk", "name": "b0"})
	if code, took := c.signal(t, syscall.SIGTERM); code != 0 || took > 5*time.Second {
		t.Fatalf("SIGTERM: exit %d after %v", code, took)
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "disk.bitmaps")); !os.IsNotExist(err) {
		t.Errorf("state file after the last persistent bitmap was removed: %v", err)
	}
}
