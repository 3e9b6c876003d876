package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/qmpclient"
)

// TestImageLockSecondDaemon: `vhostdm serve` (a real child process) holds
// QEMU's image locks on the image it serves, as a QEMU guest disk does:
// the real `qemu-img convert` into it fails, and a second `vhostdm serve`
// over the same image refuses to start, naming the image and why, instead
// of writing it beside the first. With locking = "off" the second starts;
// once the first stops, nothing holds the image.
func TestImageLockSecondDaemon(t *testing.T) {
	qemuImg := qemuImgPath(t)
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
	dir, writeInto := lockImages(t)
	const one = "[[device]]\nname = \"a\"\ntable = \"0 2048 linear a.img 0\"\n%s\n"
	path := writeConfig(t, dir, fmt.Sprintf(one, ""))
	d, _ := serveInProcess(t, path)
	if writeInto("a.img") == nil {
		t.Fatal("qemu-img wrote into a.img while device a serves it")
	}
	writeConfig(t, dir, fmt.Sprintf(one, `locking = "off"`))
	err := d.reloadConfig(path)
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

// TestQMPCreateLocking: dm-create's locking argument, as device.locking:
// "off" creates a device whose image the real qemu-img may write, the
// default one that refuses it, and a bad value is refused with the
// accepted ones, leaving no device.
func TestQMPCreateLocking(t *testing.T) {
	dir, writeInto := lockImages(t)
	path := writeConfig(t, dir, "[qmp]\nsocket = \"qmp.sock\"\n")
	d, ctx := serveInProcess(t, path)
	mon, err := qmpclient.Dial(ctx, "unix", filepath.Join(dir, "qmp.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	create := func(args string) error {
		_, err := mon.Run([]byte(`{"execute":"dm-create","arguments":` + args + `}`))
		return err
	}
	err = create(`{"name":"bad","table":"0 2048 linear ` + filepath.Join(dir, "a.img") + ` 0","locking":"yes"}`)
	var qe *qmpclient.Error
	if !errors.As(err, &qe) || !strings.Contains(qe.Desc, `locking "yes": want "auto", "on" or "off"`) {
		t.Errorf("dm-create with locking yes: %v", err)
	}
	if _, err := d.m.Get("bad"); err == nil {
		t.Fatal("a refused dm-create left its device")
	}
	if err := create(`{"name":"off","table":"0 2048 linear ` + filepath.Join(dir, "a.img") + ` 0","locking":"off"}`); err != nil {
		t.Fatal(err)
	}
	if err := create(`{"name":"auto","table":"0 2048 linear ` + filepath.Join(dir, "b.img") + ` 0"}`); err != nil {
		t.Fatal(err)
	}
	if err := writeInto("a.img"); err != nil {
		t.Errorf("qemu-img into the image of a device created with locking off: %v", err)
	}
	if writeInto("b.img") == nil {
		t.Error("qemu-img wrote into the image of a device created with the default locking")
	}
}

// lockImages makes a.img, b.img and src.img (1 MiB) in a new directory and
// returns it with a function that has the real qemu-img write src.img into
// one of the others (refused while a device holds its image locks).
func lockImages(t *testing.T) (dir string, writeInto func(img string) error) {
	t.Helper()
	qemuImg := qemuImgPath(t)
	dir = t.TempDir()
	for _, n := range []string{"a.img", "b.img", "src.img"} {
		sparse(t, filepath.Join(dir, n), 1<<20)
	}
	return dir, func(img string) error {
		return exec.Command(qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", filepath.Join(dir, "src.img"), filepath.Join(dir, img)).Run()
	}
}

// qemuImgPath returns qemu-img's path, failing t without it.
func qemuImgPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal("qemu-img not found: install the Debian package qemu-utils (scripts/setup.sh does)")
	}
	return p
}
