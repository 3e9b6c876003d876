package vhost

import (
	"bytes"
	"context"
	"github.com/vhostdm/vhostdm/vhost/frontend"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// qsdPath is qemu-storage-daemon, installed by scripts/setup.sh.
const qsdPath = "/usr/bin/qemu-storage-daemon"

// startQSD starts qemu-storage-daemon exporting a file (or a null-co
// device) as vhost-user-blk and returns its socket. The test fails, never
// skips, when the daemon is missing.
func startQSD(t testing.TB, blockdev string, extra string) string {
	t.Helper()
	if _, err := os.Stat(qsdPath); err != nil {
		t.Fatalf("qemu-storage-daemon is required (scripts/setup.sh installs it): %v", err)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "qsd.sock")
	cmd := exec.Command(qsdPath,
		"--blockdev", blockdev,
		"--export", "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="+sock+extra)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu-storage-daemon: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("qemu-storage-daemon stderr:\n%s", stderr.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-storage-daemon did not create %s: %s", sock, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestClientAgainstQSD runs the client's basic read, write and flush
// against qemu-storage-daemon's vhost-user-blk export.
func TestClientAgainstQSD(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8<<20); err != nil {
		t.Fatal(err)
	}
	sock := startQSD(t, "driver=file,node-name=f0,filename="+img, ",writable=on,num-queues=2")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, cc := range []frontend.Config{{NumQueues: 2}, {NumQueues: 1, Indirect: true, NoEventIdx: true, MemTable: true}} {
		cc.Socket = sock
		c, err := frontend.Dial(ctx, cc)
		if err != nil {
			t.Fatal(err)
		}
		cfg := c.Config()
		if cfg.Capacity != 8<<20/512 || cfg.BlkSize != 512 {
			t.Fatalf("config %+v", cfg)
		}
		for q := range c.NumQueues() {
			want := pattern(uint64(q+1), 16384)
			sector := uint64(q * 64)
			if err := c.WriteAt(ctx, q, want, sector); err != nil {
				t.Fatalf("write: %v", err)
			}
			if err := c.Flush(ctx, q); err != nil {
				t.Fatalf("flush: %v", err)
			}
			got := make([]byte, len(want))
			if err := c.ReadAt(ctx, q, got, sector); err != nil {
				t.Fatalf("read: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("read back differs")
			}
			file, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(file[sector*512:sector*512+uint64(len(want))], want) {
				t.Fatal("image differs after flush")
			}
		}
		id, err := c.GetID(ctx, 0)
		if err != nil || !strings.HasPrefix(id, "vhost_user_blk") {
			t.Fatalf("GET_ID %q %v", id, err)
		}
		// QSD re-listens after a disconnect; close so the next client runs.
		c.Close()
	}
}
