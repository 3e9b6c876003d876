package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/looptest"
)

// TestValidateDirectRefused: a cache = "none" device over a file on
// ramfs, which refuses O_DIRECT, fails validate (and so serve) with the
// file, line and key of its table and an error that says why.
func TestValidateDirectRefused(t *testing.T) {
	ram := t.TempDir()
	if out, err := exec.Command("mount", "-t", "ramfs", "ramfs", ram).CombinedOutput(); err != nil {
		t.Fatalf("mount -t ramfs (needs root): %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", ram).Run() })
	sparse(t, filepath.Join(ram, "root.img"), 1<<20)
	dir := t.TempDir()
	path := writeConfig(t, dir, fmt.Sprintf("[[device]]\nname = \"root\"\ncache = \"none\"\ntable = \"0 2048 linear %s/root.img 0\"\n", ram))
	var out, errb bytes.Buffer
	if code := run([]string{"validate", "-c", path}, &out, &errb); code != 1 {
		t.Fatalf("validate exit %d, want 1: %s", code, errb.String())
	}
	if want := "vm.toml:4: device[0].table: line 1: linear: "; !strings.Contains(errb.String(), want) || !strings.Contains(errb.String(), "refuses O_DIRECT") {
		t.Fatalf("validate said %q; want %q ... refuses O_DIRECT", errb.String(), want)
	}
	// With the page cache the same file is fine.
	os.WriteFile(path, []byte(fmt.Sprintf("[[device]]\nname = \"root\"\ntable = \"0 2048 linear %s/root.img 0\"\n", ram)), 0o644)
	errb.Reset()
	if code := run([]string{"validate", "-c", path}, &out, &errb); code != 0 {
		t.Fatalf("validate exit %d: %s", code, errb.String())
	}
}

// TestServeDirectBlockSize: an export of a cache = "none" device over a
// disk with 4096-byte logical blocks must say logical-block-size = 4096;
// with the default 512 serve refuses it, naming the sizes.
func TestServeDirectBlockSize(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	sparse(t, img, 4<<20)
	loop := looptest.Attach(t, img, 4096)
	text := fmt.Sprintf("[[device]]\nname = \"d\"\ncache = \"none\"\ntable = \"0 8192 linear %s 0\"\n[[export]]\nid = \"e\"\ndevice = \"d\"\nsocket = \"e.sock\"\nwritable = true\n", loop)
	c, err := config.Load(writeConfig(t, dir, text))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d, err := startDaemon(ctx, c, slog.New(slog.DiscardHandler))
	if err == nil {
		d.Close()
		t.Fatal("serve started an export with logical-block-size 512 over a 4096-byte O_DIRECT disk")
	}
	if want := "logical-block-size 512 is smaller than the 4096-byte logical block of device d's O_DIRECT backends"; !strings.Contains(err.Error(), want) {
		t.Fatalf("serve: %v; want %q", err, want)
	}
	c, err = config.Load(writeConfig(t, dir, text+"logical-block-size = 4096\n"))
	if err != nil {
		t.Fatal(err)
	}
	d, err = startDaemon(ctx, c, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}
