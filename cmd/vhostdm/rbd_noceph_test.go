//go:build !ceph

package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestValidateRBDWithoutCeph: the plain build refuses an rbd: backend at
// load time, naming the file, the table line and the reason.
func TestValidateRBDWithoutCeph(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "vm.toml")
	os.WriteFile(conf, []byte("[ceph]\nid = \"vhostdm\"\n\n[[device]]\nname = \"root\"\ntable = \"\"\"\n0 2048 linear rbd:vms/root 0\n\"\"\"\n"), 0o644)
	var out, errb bytes.Buffer
	if code := runValidate([]string{"-c", conf}, &out, &errb); code != 1 {
		t.Fatalf("validate exit %d, want 1; stdout %q stderr %q", code, out.String(), errb.String())
	}
	want := "vm.toml:7: device[0].table: line 1: linear: rbd:vms/root: this vhostdm was built without Ceph support (build it with -tags ceph)"
	if !strings.Contains(errb.String(), want) {
		t.Fatalf("validate said %q; want it to contain %q", errb.String(), want)
	}
}
