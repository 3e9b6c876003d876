package cephtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestMissingToolNamesPackage: without the Ceph daemons StartOwn fails,
// naming the Debian package to install.
func TestMissingToolNamesPackage(t *testing.T) {
	bin := t.TempDir()
	for _, tool := range []string{"bash", "cat", "rm"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatalf("%s: %v", tool, err)
		}
		if err := os.Symlink(p, filepath.Join(bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", bin)
	c, err := StartOwn()
	if err == nil {
		c.Stop()
		t.Fatal("a cluster started without ceph-mon on PATH")
	}
	if !strings.Contains(err.Error(), "ceph-mon not found: install the Debian package ceph-mon") {
		t.Fatalf("Start: %v; want it to name the package ceph-mon", err)
	}
}
