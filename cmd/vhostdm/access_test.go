package main

import (
	"bytes"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestHookTargets(t *testing.T) {
	xml := `<domain type='kvm'><name>vm1</name>
  <seclabel type='static' model='dac' relabel='no'><label>+4242:+4343</label></seclabel>
  <devices>
    <disk type='file' device='disk'><source file='/var/lib/x.img'/><target dev='sda'/></disk>
    <disk type='vhostuser' device='disk'><source type='unix' path='/run/vhostdm/a.sock'><reconnect enabled='yes' timeout='1'/></source></disk>
    <disk type='vhostuser' device='disk'><source type='unix' path='/run/vhostdm/b.sock'/></disk>
  </devices></domain>`
	socks, usr, grp, err := hookTargets([]byte(xml))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(socks, []string{"/run/vhostdm/a.sock", "/run/vhostdm/b.sock"}) || usr != "4242" || grp != "4343" {
		t.Fatalf("sockets %v user %q group %q", socks, usr, grp)
	}
	if _, _, _, err := hookTargets([]byte("<domain><devices>")); err == nil {
		t.Fatal("broken XML accepted")
	}
}

func TestQEMUUser(t *testing.T) {
	p := filepath.Join(t.TempDir(), "qemu.conf")
	os.WriteFile(p, []byte("# user = \"nobody\"\nuser = \"qemu\"\ngroup = \"+107\"\n"), 0o644)
	if u, g := qemuUser(p); u != "qemu" || g != "107" {
		t.Fatalf("qemu.conf: %q %q", u, g)
	}
	if u, g := qemuUser(filepath.Join(t.TempDir(), "none")); u != defaultQEMUUser || g != defaultQEMUUser {
		t.Fatalf("no qemu.conf: %q %q", u, g)
	}
}

// TestCheckAccess connects as this process's own user: a listening socket
// is ok, a missing one and a stale one are reported with the reason.
func TestCheckAccess(t *testing.T) {
	dir := t.TempDir()
	live := filepath.Join(dir, "live.sock")
	l, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	stale := filepath.Join(dir, "stale.sock")
	sl, _ := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	sl.SetUnlinkOnClose(false)
	sl.Close()
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	self := me.Username
	var out, errb bytes.Buffer
	if code := run([]string{"check-access", "--user", self, live}, &out, &errb); code != 0 || out.String() != live+": ok\n" {
		t.Fatalf("live socket: exit %d: %s%s", code, out.String(), errb.String())
	}
	out.Reset()
	code := run([]string{"check-access", "--user", self, filepath.Join(dir, "missing.sock"), stale}, &out, &errb)
	if code != 1 || !strings.Contains(errb.String(), "no such file or directory (is vhostdm serving this export?)") ||
		!strings.Contains(errb.String(), "connection refused (a stale socket: vhostdm is not running)") {
		t.Fatalf("exit %d:\n%s", code, errb.String())
	}
}
