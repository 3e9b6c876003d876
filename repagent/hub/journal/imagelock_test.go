package journal

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestImageLocked: a replica image the hub has open carries QEMU's image
// locks as a running VM's disk does, read by the real qemu-img: writing
// into it fails for want of the "write" lock and reading it for want of
// the shared one (-U reads it); once the hub closes it, both work.
func TestImageLocked(t *testing.T) {
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal("qemu-img not found: install the Debian package qemu-utils (scripts/setup.sh does)")
	}
	dir := t.TempDir()
	st := DirStore(dir)
	lock, err := st.Lock()
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	img, err := st.OpenImage("root", true)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(1 << 20); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "root"+imageSuffix)
	src, out := filepath.Join(t.TempDir(), "src"), filepath.Join(t.TempDir(), "out")
	for _, p := range []string{src, out} {
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	run := func(args ...string) (string, error) {
		b, err := exec.Command(qemuImg, args...).CombinedOutput()
		return string(b), err
	}
	into := []string{"convert", "-n", "-f", "raw", "-O", "raw", src, path}
	from := []string{"convert", "-n", "-f", "raw", "-O", "raw", path, out}
	if o, err := run(into...); err == nil || !strings.Contains(o, `Failed to get "write" lock`) {
		t.Errorf("qemu-img convert into the hub's open image: %v, want the write lock refused:\n%s", err, o)
	}
	if o, err := run(from...); err == nil || !strings.Contains(o, `Failed to get shared "write" lock`) {
		t.Errorf("qemu-img convert from the hub's open image: %v, want the shared write lock refused:\n%s", err, o)
	}
	if o, err := run(append([]string{"convert", "-U"}, from[1:]...)...); err != nil {
		t.Errorf("qemu-img convert -U from the hub's open image: %v\n%s", err, o)
	}
	// A second open in the process shares the locks.
	img2, err := st.OpenImage("root", false)
	if err != nil {
		t.Fatalf("a second open of the image in the hub's process: %v", err)
	}
	img2.Close()
	if o, err := run(into...); err == nil {
		t.Errorf("qemu-img convert into the image after one of two opens closed: succeeded, want refused:\n%s", o)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{into, from} {
		if o, err := run(args...); err != nil {
			t.Errorf("qemu-img %s once the hub closed the image: %v\n%s", strings.Join(args, " "), err, o)
		}
	}
}
