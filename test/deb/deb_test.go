// Package deb tests the Debian package that scripts/build-deb.sh builds:
// it builds it, installs it into this machine with dpkg -i (the test needs
// root), checks what the maintainer scripts made, validates the shipped
// example configuration with the installed vhostdm, verifies the installed
// systemd units with systemd-analyze, removes the package with dpkg -r and
// purges it, and checks that nothing of it is left.
package deb

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "scripts", "build-deb.sh")); err != nil {
		t.Fatal(err)
	}
	return dir
}

func runOK(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// packaged lists the files the package installs (dirs excluded).
var packaged = []string{
	"/usr/bin/vhostdm", "/usr/bin/repagent-hub",
	"/lib/systemd/system/vhostdm@.service", "/lib/systemd/system/repagent-hub.service",
	"/etc/vhostdm/example.toml", "/etc/libvirt/hooks/qemu.d/vhostdm",
	"/usr/share/doc/vhostdm/README.md.gz", "/usr/share/doc/vhostdm/OPERATIONS.md.gz",
	"/usr/share/doc/vhostdm/REFERENCE.md.gz", "/usr/share/doc/vhostdm/copyright",
}

func TestDebianPackage(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("the package test installs the package into this machine with dpkg -i and needs root")
	}
	for _, tool := range []string{"dpkg", "dpkg-deb", "systemd-analyze"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing (Debian packages dpkg and systemd; scripts/setup.sh): %v", tool, err)
		}
	}
	root := repoRoot(t)
	out := t.TempDir()
	deb := strings.TrimSpace(runOK(t, "bash", filepath.Join(root, "scripts", "build-deb.sh"), out))
	b, _ := os.ReadFile(filepath.Join(root, "cmd", "vhostdm", "version.go"))
	version := regexp.MustCompile(`const Version = "([^"]+)"`).FindSubmatch(b)
	if version == nil {
		t.Fatal("no Version in cmd/vhostdm/version.go")
	}
	if want := filepath.Join(out, "vhostdm_"+string(version[1])+"_amd64.deb"); deb != want {
		t.Fatalf("build-deb.sh made %q, want %q", deb, want)
	}

	// Control fields: QEMU is a recommendation, not a dependency.
	field := func(name string) string {
		return strings.TrimSpace(runOK(t, "dpkg-deb", "-f", deb, name))
	}
	if p, v, a := field("Package"), field("Version"), field("Architecture"); p != "vhostdm" || v != string(version[1]) || a != "amd64" {
		t.Errorf("control: Package %q Version %q Architecture %q", p, v, a)
	}
	if d := field("Depends"); strings.Contains(d, "qemu") {
		t.Errorf("Depends: %q names QEMU", d)
	}
	if r := field("Recommends"); !strings.Contains(r, "qemu-system-x86") {
		t.Errorf("Recommends: %q lacks qemu-system-x86", r)
	}
	contents := runOK(t, "dpkg-deb", "-c", deb)
	for _, f := range packaged {
		if !strings.Contains(contents, " ."+f+"\n") {
			t.Errorf("the package lacks %s:\n%s", f, contents)
		}
	}

	runOK(t, "dpkg", "-i", deb)
	t.Cleanup(func() { exec.Command("dpkg", "--purge", "vhostdm").Run() })

	// What the maintainer scripts made.
	g, err := user.LookupGroup("vhostdm")
	if err != nil {
		t.Fatalf("postinst made no group vhostdm: %v", err)
	}
	u, err := user.Lookup("vhostdm")
	if err != nil {
		t.Fatalf("postinst made no user vhostdm: %v", err)
	}
	if u.Gid != g.Gid {
		t.Errorf("user vhostdm's group %s, want vhostdm's %s", u.Gid, g.Gid)
	}
	if q, err := user.Lookup("libvirt-qemu"); err == nil {
		ids, _ := q.GroupIds()
		if !slices.Contains(ids, g.Gid) {
			t.Errorf("libvirt-qemu is not in group vhostdm (groups %v): QEMU could not reach /run/vhostdm", ids)
		}
	}
	for _, d := range []string{"/etc/vhostdm", "/var/lib/vhostdm"} {
		var st syscall.Stat_t
		if err := syscall.Stat(d, &st); err != nil {
			t.Fatalf("postinst: %v", err)
		}
		if st.Mode&0o777 != 0o750 || st.Uid != 0 || g.Gid != strconv.FormatUint(uint64(st.Gid), 10) {
			t.Errorf("%s: mode %#o owner %d:%d, want 0750 root:vhostdm", d, st.Mode&0o777, st.Uid, st.Gid)
		}
	}

	// The shipped example validates with the installed binary.
	if out, err := exec.Command("/usr/bin/vhostdm", "validate", "-c", "/etc/vhostdm/example.toml").CombinedOutput(); err != nil {
		t.Errorf("vhostdm validate on the shipped example: %v\n%s", err, out)
	}
	// The installed units verify (by name: systemd's own unit path).
	vout, err := exec.Command("systemd-analyze", "verify", "--man=no", "vhostdm@vm1.service", "repagent-hub.service").CombinedOutput()
	var ours []string
	for _, l := range strings.Split(string(vout), "\n") {
		if strings.Contains(l, "vhostdm@") || strings.Contains(l, "repagent-hub") {
			ours = append(ours, l)
		}
	}
	if err != nil || len(ours) > 0 {
		t.Errorf("systemd-analyze verify of the installed units: %v\n%s", err, vout)
	}
	unit, _ := os.ReadFile("/lib/systemd/system/vhostdm@.service")
	for _, want := range []string{"ExecStart=/usr/bin/vhostdm serve", "Group=vhostdm", "RuntimeDirectory=vhostdm", "RuntimeDirectoryMode=0750"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("installed vhostdm@.service lacks %q", want)
		}
	}

	// dpkg -r: the program goes, the configuration stays, and the
	// libvirt hook left behind lets every domain start.
	runOK(t, "dpkg", "-r", "vhostdm")
	if _, err := os.Stat("/usr/bin/vhostdm"); err == nil {
		t.Error("/usr/bin/vhostdm still there after dpkg -r")
	}
	if _, err := os.Stat("/etc/vhostdm/example.toml"); err != nil {
		t.Errorf("dpkg -r removed the configuration: %v", err)
	}
	hook := exec.Command("/etc/libvirt/hooks/qemu.d/vhostdm", "vm1", "prepare", "begin", "-")
	hook.Stdin = strings.NewReader("<domain/>")
	if out, err := hook.CombinedOutput(); err != nil {
		t.Errorf("the libvirt hook of a removed package fails domains: %v\n%s", err, out)
	}

	// dpkg --purge: nothing is left.
	runOK(t, "dpkg", "--purge", "vhostdm")
	if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", "vhostdm").CombinedOutput(); err == nil && strings.Contains(string(out), "installed") {
		t.Errorf("dpkg still knows vhostdm after purge: %s", out)
	}
	for _, f := range append(packaged, "/etc/vhostdm", "/var/lib/vhostdm") {
		if _, err := os.Lstat(f); err == nil {
			t.Errorf("%s left after purge", f)
		}
	}
}
