//go:build !ceph

package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

// TestCephStoreNeedsTag: the plain build refuses a Ceph store for serve,
// recover, seed and clones, naming the build tag that adds it; clones
// refuses a directory store.
func TestCephStoreNeedsTag(t *testing.T) {
	for _, args := range [][]string{
		{"serve", "--listen", "127.0.0.1:0", "--store", "ceph:vhostdm-hub"},
		{"recover", "--vm", "vm1", "--out", filepath.Join(t.TempDir(), "out"), "--store", "ceph:vhostdm-hub"},
		{"seed", "--vm", "vm1", "--volume", "root=/dev/null", "--store", "ceph:vhostdm-hub"},
		{"clones", "--store", "ceph:vhostdm-hub"},
	} {
		var out, errb bytes.Buffer
		if code := run(args, &out, &errb); code == 0 || !strings.Contains(errb.String(), "built without Ceph support: build it with -tags ceph") {
			t.Errorf("%v: exit %d: %s", args, code, errb.String())
		}
	}
	var out, errb bytes.Buffer
	if code := run([]string{"serve", "--store", t.TempDir(), "--ceph-id", "hub"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "go with --store ceph:POOL") {
		t.Errorf("--ceph-id without a Ceph store: exit %d: %s", code, errb.String())
	}
	errb.Reset()
	if code := run([]string{"clones", "--store", t.TempDir()}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "is a directory store") {
		t.Errorf("clones on a directory store: exit %d: %s", code, errb.String())
	}
}
