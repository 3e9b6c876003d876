package mapper_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/mapper"
)

// qemuTool returns the path of a QEMU tool, failing t without it.
func qemuTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found: install the Debian package qemu-utils (scripts/setup.sh does)", name)
	}
	return p
}

// TestImageLockQEMU: the files a device opens carry QEMU's image locks as
// a QEMU guest disk takes them (write not shared), read by the real
// qemu-img and qemu-io: while a writable table serves an image, `qemu-img
// convert` into it and `qemu-io -c write` fail for want of the "write"
// lock, and reading it with `qemu-img convert` fails for want of the
// shared "write" lock (and works with -U, as for a running VM's disk); a
// read-only table still refuses writers but lets readers in; devices of
// one process (two Managers, read-only and read-write) never conflict
// with each other; the locks go with the last device. The other way
// round, an image that qemu-io holds open for writing fails a table's
// load with ErrBusy naming the permission, unless the device's locking is
// off.
func TestImageLockQEMU(t *testing.T) {
	qemuImg, qemuIO := qemuTool(t, "qemu-img"), qemuTool(t, "qemu-io")
	dir := t.TempDir()
	img, src, out := filepath.Join(dir, "img"), filepath.Join(dir, "src"), filepath.Join(dir, "out")
	for _, p := range []string{img, src, out} {
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	want := func(step string, wantErr string, tool string, args ...string) {
		t.Helper()
		o, err := exec.Command(tool, args...).CombinedOutput()
		switch {
		case wantErr == "" && err != nil:
			t.Fatalf("%s: %s %s: %v\n%s", step, filepath.Base(tool), strings.Join(args, " "), err, o)
		case wantErr != "" && (err == nil || !strings.Contains(string(o), wantErr)):
			t.Fatalf("%s: %s %s: %v, want it to fail with %q:\n%s", step, filepath.Base(tool), strings.Join(args, " "), err, wantErr, o)
		}
	}
	writeInto := []string{"convert", "-n", "-f", "raw", "-O", "raw", src, img}
	readFrom := []string{"convert", "-n", "-f", "raw", "-O", "raw", img, out}
	readFromU := []string{"convert", "-U", "-n", "-f", "raw", "-O", "raw", img, out}
	ioWrite := []string{"-f", "raw", "-c", "write 0 4k", img}

	m1 := mapper.NewManager(mapper.ManagerOptions{Dir: dir})
	defer m1.Close()
	m2 := mapper.NewManager(mapper.ManagerOptions{Dir: dir})
	defer m2.Close()
	if _, err := m1.CreateTable("rw", "", false, "0 2048 linear img 0"); err != nil {
		t.Fatal(err)
	}
	want("a writable table serves the image", `Failed to get "write" lock`, qemuImg, writeInto...)
	want("a writable table serves the image", `Failed to get "write" lock`, qemuIO, ioWrite...)
	want("a writable table serves the image", `Failed to get shared "write" lock`, qemuImg, readFrom...)
	want("a writable table serves the image, -U", "", qemuImg, readFromU...)
	// The same process: another Manager, read-only, and read-write.
	if _, err := m2.CreateTable("ro", "", true, "0 2048 linear img 0"); err != nil {
		t.Fatalf("a read-only table beside a writable one in the same process: %v", err)
	}
	if _, err := m2.CreateTable("rw2", "", false, "0 2048 linear img 0"); err != nil {
		t.Fatalf("a second writable table in the same process: %v", err)
	}
	if err := m1.Remove("rw", false); err != nil {
		t.Fatal(err)
	}
	want("another writer of the process remains", `Failed to get shared "write" lock`, qemuImg, readFrom...)
	if err := m2.Remove("rw2", false); err != nil {
		t.Fatal(err)
	}
	want("a read-only table only", "", qemuImg, readFrom...)
	want("a read-only table only", `Failed to get "write" lock`, qemuImg, writeInto...)
	if err := m2.Remove("ro", false); err != nil {
		t.Fatal(err)
	}
	want("no table", "", qemuImg, writeInto...)

	// qemu-io holds the image open for writing while its sleep command
	// runs (10 minutes; it is killed at the end).
	cmd := exec.Command(qemuIO, "-f", "raw", "-c", "sleep 600000", img)
	var ioOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &ioOut, &ioOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	// Wait until qemu-io holds the write byte (101), looking as QEMU
	// does (F_OFD_GETLK); a qemu-img probe would itself take bytes and
	// could make qemu-io's open fail.
	probe, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		fl := unix.Flock_t{Type: unix.F_WRLCK, Start: 101, Len: 1}
		if err := unix.FcntlFlock(probe.Fd(), unix.F_OFD_GETLK, &fl); err != nil {
			t.Fatal(err)
		}
		if fl.Type != unix.F_UNLCK {
			break
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("qemu-io exited (%v) before it locked the image:\n%s", err, ioOut.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-io did not lock the image")
		}
	}
	_, err = m1.CreateTable("busy", "", false, "0 2048 linear img 0")
	if !errors.Is(err, mapper.ErrBusy) || !strings.Contains(err.Error(), "the image is in use") || !strings.Contains(err.Error(), `"write" permission`) {
		t.Fatalf("a writable table over an image qemu-io writes: %v, want ErrBusy naming the write permission", err)
	}
	if _, err := m1.CreateTable("busy", "", true, "0 2048 linear img 0"); !errors.Is(err, mapper.ErrBusy) {
		t.Fatalf("a read-only table over an image qemu-io writes: %v, want ErrBusy", err)
	}
	if _, err := m1.CreateTableWith("off", "", mapper.DeviceOptions{Locking: mapper.LockOff}, "0 2048 linear img 0"); err != nil {
		t.Fatalf("locking off: %v", err)
	}
}

// TestParseLockMode: the locking option's values.
func TestParseLockMode(t *testing.T) {
	for s, want := range map[string]mapper.LockMode{"": mapper.LockAuto, "auto": mapper.LockAuto, "on": mapper.LockOn, "off": mapper.LockOff} {
		if got, err := mapper.ParseLockMode(s); err != nil || got != want {
			t.Errorf("ParseLockMode(%q) = %v, %v", s, got, err)
		}
	}
	if _, err := mapper.ParseLockMode("yes"); !errors.Is(err, mapper.ErrInvalid) {
		t.Errorf("ParseLockMode(yes): %v", err)
	}
}
