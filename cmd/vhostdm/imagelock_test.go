package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestImageLockSecondDaemon: `vhostdm serve` (a real child process) holds
// QEMU's image locks on the image it serves, as a QEMU guest disk does:
// the real `qemu-img convert` into it fails, and a second `vhostdm serve`
// over the same image refuses to start, naming the image and why, instead
// of writing it beside the first. With locking = "off" the second starts;
// once the first stops, nothing holds the image.
func TestImageLockSecondDaemon(t *testing.T) {
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal("qemu-img not found: install the Debian package qemu-utils (scripts/setup.sh does)")
	}
	dirA, dirB := t.TempDir(), t.TempDir()
	img, src := filepath.Join(dirA, "disk.img"), filepath.Join(dirA, "src.img")
	sparse(t, img, 16<<20)
	sparse(t, src, 16<<20)
	const cfg = `[[device]]
name = "d"
table = "0 32768 linear %s 0"
%s
[[export]]
id = "e"
device = "d"
socket = "e.sock"
writable = true
`
	first := startChild(t, writeConfig(t, dirA, fmt.Sprintf(cfg, img, "")), filepath.Join(dirA, "e.sock"))
	convert := exec.Command(qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", src, img)
	if out, err := convert.CombinedOutput(); err == nil || !strings.Contains(string(out), `Failed to get "write" lock`) {
		t.Errorf("qemu-img convert into the image vhostdm serves: %v, want the write lock refused:\n%s", err, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	second := exec.CommandContext(ctx, os.Args[0], "serve", "-c", writeConfig(t, dirB, fmt.Sprintf(cfg, img, "")))
	second.Env = append(os.Environ(), childEnv+"=1")
	out, err := second.CombinedOutput()
	if err == nil || ctx.Err() != nil || !strings.Contains(string(out), img+": the image is in use: another process") {
		t.Errorf("a second vhostdm serve over the image: %v (timed out: %v), want it to exit naming the image in use:\n%s", err, ctx.Err() != nil, out)
	}

	unlocked := startChild(t, writeConfig(t, dirB, fmt.Sprintf(cfg, img, `locking = "off"`)), filepath.Join(dirB, "e.sock"))
	first.stop(t)
	convert = exec.Command(qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", src, img)
	if out, err := convert.CombinedOutput(); err != nil {
		t.Errorf("qemu-img convert once only a daemon with locking = \"off\" serves the image: %v\n%s", err, out)
	}
	unlocked.stop(t)
}

// TestReloadLocking: a device's locking is fixed at creation, as its
// cache mode: a reload that changes it is refused naming both values and
// leaves the device as it was (still holding the locks, which the real
// qemu-img sees), and the configuration the daemon records keeps the
// device's own value, so that the next reload, back to it, is not refused
// too; a device added by that reload with locking = "off" holds none.
func TestReloadLocking(t *testing.T) {
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal("qemu-img not found: install the Debian package qemu-utils (scripts/setup.sh does)")
	}
	dir := t.TempDir()
	for _, n := range []string{"a.img", "b.img", "src.img"} {
		sparse(t, filepath.Join(dir, n), 1<<20)
	}
	const one = "[[device]]\nname = \"a\"\ntable = \"0 2048 linear a.img 0\"\n%s\n"
	path := writeConfig(t, dir, fmt.Sprintf(one, ""))
	d, _ := serveInProcess(t, path)
	writeInto := func(img string) error {
		return exec.Command(qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", filepath.Join(dir, "src.img"), filepath.Join(dir, img)).Run()
	}
	if writeInto("a.img") == nil {
		t.Fatal("qemu-img wrote into a.img while device a serves it")
	}
	writeConfig(t, dir, fmt.Sprintf(one, `locking = "off"`))
	err = d.reloadConfig(path)
	if err == nil || !strings.Contains(err.Error(), `device "a": locking auto -> off: a device's image locking is fixed at creation`) {
		t.Fatalf("reload changing locking: %v", err)
	}
	if writeInto("a.img") == nil {
		t.Fatal("after the refused reload qemu-img wrote into a.img")
	}
	writeConfig(t, dir, fmt.Sprintf(one, "")+"[[device]]\nname = \"b\"\ntable = \"0 2048 linear b.img 0\"\nlocking = \"off\"\n")
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	if _, err := d.m.Get("b"); err != nil {
		t.Fatal(err)
	}
	if err := writeInto("b.img"); err != nil {
		t.Errorf("qemu-img into b.img, served with locking = \"off\": %v", err)
	}
}
