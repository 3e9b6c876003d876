package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "root.img"), 2<<20)
	good := `[[device]]
name = "root"
table = """
0 2048 linear root.img 0
2048 2048 zero
"""
[[device]]
name = "top"
table = "0 4096 linear /dev/mapper/root 0"
[[export]]
id = "r"
device = "top"
socket = "r.sock"
writable = true
`
	path := writeConfig(t, dir, good)
	var out, errb bytes.Buffer
	if code := run([]string{"validate", "-c", path}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	want := "root: 4096 sectors (2.0 MiB), 2 target(s): linear, zero\ntop: 4096 sectors (2.0 MiB), 1 target(s): linear; exported as r at " +
		filepath.Join(dir, "r.sock") + " (rw, 1 queue(s))\n"
	if out.String() != want {
		t.Fatalf("summary:\n%s\nwant:\n%s", out.String(), want)
	}
	os.WriteFile(path, []byte(strings.Replace(good, "0 2048 linear root.img 0", "0 2048 linear root.img 4000", 1)), 0o644)
	out.Reset()
	errb.Reset()
	if code := run([]string{"validate", "-c", path}, &out, &errb); code != 1 {
		t.Fatalf("exit %d for a bad file", code)
	}
	wantErr := path + ":4: device[0].table: line 1: linear: root.img too small for target: start=4000, len=2048, dev_size=4096\n" +
		path + ": device \"top\" not checked: it uses /dev/mapper/root, which has errors\n"
	if errb.String() != wantErr || out.Len() != 0 {
		t.Fatalf("errors:\n%s\nwant:\n%s", errb.String(), wantErr)
	}
	if code := run([]string{"validate"}, &out, &errb); code != 2 {
		t.Fatalf("validate without -c: exit %d", code)
	}
}

// TestValidateSocketKeys: unknown users and groups and bad modes of the
// socket keys are configuration errors with file:line:key.
func TestValidateSocketKeys(t *testing.T) {
	dir := t.TempDir()
	path := writeConfig(t, dir, `[qmp]
socket = "q.sock"
socket-owner = "no-such-user-vhostdm"
socket-mode = "0999"

[[device]]
name = "d"
table = "0 8 zero"

[[export]]
id = "e"
device = "d"
socket = "e.sock"
socket-owner = "root"
socket-group = "no-such-group-vhostdm"
socket-mode = "rw"
`)
	var out, errb bytes.Buffer
	if code := run([]string{"validate", "-c", path}, &out, &errb); code != 1 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, want := range []string{
		path + `:3: qmp.socket-owner: socket-owner "no-such-user-vhostdm": no such user`,
		path + `:4: qmp.socket-mode: socket-mode "0999": want an octal mode`,
		path + `:15: export[0].socket-group: socket-group "no-such-group-vhostdm": no such group`,
		path + `:16: export[0].socket-mode: socket-mode "rw": want an octal mode`,
	} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("missing %q in:\n%s", want, errb.String())
		}
	}
	if strings.Contains(errb.String(), "socket-owner \"root\"") {
		t.Errorf("user root refused:\n%s", errb.String())
	}
}

// TestValidateCephSection: bad [ceph] keys are configuration errors with
// file:line:key.
func TestValidateCephSection(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "vm.toml")
	os.WriteFile(conf, []byte("[ceph]\nconf = \"nowhere.conf\"\nid = \"client.x\"\n\n[[device]]\nname = \"z\"\ntable = \"0 8 zero\"\n"), 0o644)
	var out, errb bytes.Buffer
	if code := runValidate([]string{"-c", conf}, &out, &errb); code != 1 {
		t.Fatalf("validate exit %d, want 1", code)
	}
	for _, want := range []string{"vm.toml:2: ceph.conf: open " + filepath.Join(dir, "nowhere.conf") + ": no such file", `vm.toml:3: ceph.id: "client.x": give the id without "client." ("x")`} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("validate said %q; want %q", errb.String(), want)
		}
	}
}
