package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// The guide's libvirt example (docs/OPERATIONS.md, "With libvirt") is what
// this test runs: the TOML and the domain XML are read from the fenced
// blocks after these markers, with only host paths, the domain type (kvm
// there, TCG here), the memory size, the kernel command line and the
// console replaced. So the guide cannot drift from a run that works.
const (
	guideTOMLMarker = "<!-- e2e: libvirt-vm1.toml -->"
	guideXMLMarker  = "<!-- e2e: libvirt-vm1.xml -->"
)

// libvirtStartBound is how long `virsh start` may take to refuse a domain
// whose vhostdm socket QEMU cannot open (the vhostdm libvirt hook fails it
// at "prepare"; without the hook QEMU with <reconnect> waits forever).
const libvirtStartBound = 30 * time.Second

// guideBlock returns the fenced block after marker in docs/OPERATIONS.md.
func guideBlock(t *testing.T, e *harness.Env, marker string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.RepoRoot, "docs", "OPERATIONS.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), marker)
	if !ok {
		t.Fatalf("docs/OPERATIONS.md has no %s", marker)
	}
	m := regexp.MustCompile("(?s)^\\s*```[a-z]*\\n(.*?)\\n```").FindStringSubmatch(rest)
	if m == nil {
		t.Fatalf("docs/OPERATIONS.md: no fenced block right after %s", marker)
	}
	return m[1]
}

// replaceAll replaces each old with its new, failing the test when the
// guide's text lacks one (the guide changed: update the test with it).
func replaceAll(t *testing.T, what, s string, pairs ...string) string {
	t.Helper()
	for i := 0; i < len(pairs); i += 2 {
		if !strings.Contains(s, pairs[i]) {
			t.Fatalf("the guide's %s no longer contains %q", what, pairs[i])
		}
		s = strings.ReplaceAll(s, pairs[i], pairs[i+1])
	}
	return s
}

// libvirt is a private libvirtd (system mode, as root, QEMU run as
// libvirt-qemu) with its own virtlogd, in a private mount namespace whose
// /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
// /var/cache/libvirt are directories of the test: nothing of the host's
// libvirt is used or changed.
type libvirt struct {
	root string // the test's directory: etc, run, lib, log, cache, sock
	uri  string
	cmd  *exec.Cmd
	log  *bytes.Buffer
}

func startLibvirt(t *testing.T, root, vhostdm string) *libvirt {
	t.Helper()
	for _, bin := range []string{"/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/bin/virsh", "/usr/bin/unshare"} {
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("%s is missing: install libvirt-daemon-system, libvirt-daemon-driver-qemu and libvirt-clients (scripts/setup.sh): %v", bin, err)
		}
	}
	if _, err := user.Lookup("libvirt-qemu"); err != nil {
		t.Fatalf("no user libvirt-qemu (Debian package libvirt-daemon-system creates it): %v", err)
	}
	lv := &libvirt{root: root, log: &bytes.Buffer{}}
	for _, d := range []string{"etc/hooks/qemu.d", "etc/qemu", "run", "lib/qemu", "log/qemu", "cache", "sock"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		"etc/libvirtd.conf": fmt.Sprintf(`unix_sock_dir = %q
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:stderr"
`, filepath.Join(root, "sock")),
		// Debian's defaults for the user; no mount namespace, cgroups or
		// MAC driver, which a CI container may not provide.
		"etc/qemu.conf": `user = "libvirt-qemu"
group = "libvirt-qemu"
namespaces = []
cgroup_controllers = []
security_driver = "none"
remember_owner = 0
`,
		"etc/virtlogd.conf": "",
		"etc/libvirt.conf":  "",
		// The hook the Debian package installs as
		// /etc/libvirt/hooks/qemu.d/vhostdm, running a copy of the test's
		// vhostdm from /etc/libvirt/hooks: where AppArmor's libvirtd
		// profile (on hosts that enforce it) lets hooks execute programs,
		// besides /usr/bin where the package puts vhostdm.
		"etc/hooks/qemu.d/vhostdm": "#!/bin/sh\nexec /etc/libvirt/hooks/vhostdm-bin libvirt-hook \"$@\"\n",
		"start.sh": `set -e
R=$1
mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
mount --bind $R/etc /etc/libvirt
mount --bind $R/run /run/libvirt
mount --bind $R/lib /var/lib/libvirt
mount --bind $R/log /var/log/libvirt
mount --bind $R/cache /var/cache/libvirt
/usr/sbin/virtlogd --daemon --pid-file $R/virtlogd.pid
exec /usr/sbin/libvirtd --config /etc/libvirt/libvirtd.conf --pid-file $R/libvirtd.pid
`,
	}
	bin, err := os.ReadFile(vhostdm)
	if err != nil {
		t.Fatal(err)
	}
	files["etc/hooks/vhostdm-bin"] = string(bin)
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(root, name), []byte(text), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	lv.cmd = exec.Command("/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", filepath.Join(root, "start.sh"), root)
	lv.cmd.Stdout, lv.cmd.Stderr = lv.log, lv.log
	lv.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := lv.cmd.Start(); err != nil {
		t.Fatalf("start libvirtd: %v", err)
	}
	lv.uri = "qemu:///system?socket=" + filepath.Join(root, "sock", "libvirt-sock")
	t.Cleanup(func() {
		lv.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { lv.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			lv.cmd.Process.Kill()
			<-done
		}
		if b, err := os.ReadFile(filepath.Join(root, "virtlogd.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGTERM)
			}
		}
		if t.Failed() {
			t.Logf("libvirtd log:\n%s", tail(lv.log.String(), 40))
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := lv.virsh(10*time.Second, "version")
		if err == nil && strings.Contains(out, "Running hypervisor: QEMU") {
			return lv
		}
		if time.Now().After(deadline) {
			t.Fatalf("private libvirtd did not answer: %v\n%s\nlibvirtd log:\n%s", err, out, tail(lv.log.String(), 40))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// virsh runs virsh against the private libvirtd.
func (lv *libvirt) virsh(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "/usr/bin/virsh", append([]string{"-c", lv.uri}, args...)...).CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("virsh %s: no answer within %v", strings.Join(args, " "), timeout)
	}
	return string(out), err
}

// TestLibvirt boots a TCG guest through a private libvirtd from the
// guide's domain XML on the guide's vhostdm configuration (socket-owner
// libvirt-qemu), runs the verify pattern in the guest and checks the image
// on the host. Then, with the socket left root's (no socket-owner), `virsh
// start` must fail within libvirtStartBound and say why (the vhostdm libvirt
// hook); and without the hook it must behave as the guide says: QEMU logs
// the permission error and `virsh start` waits until the domain is
// destroyed.
func TestLibvirt(t *testing.T) {
	e := needEnv(t)
	if os.Getuid() != 0 {
		t.Fatal("the libvirt test runs a system-mode libvirtd and needs root")
	}
	started := time.Now()
	root, err := os.MkdirTemp("", "vdm-lv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	// QEMU runs as libvirt-qemu: it must reach the kernel, the initrd
	// and the console file.
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	bin, err := e.Vhostdm()
	if err != nil {
		t.Fatal(err)
	}
	initrd, err := e.Initrd()
	if err != nil {
		t.Fatal(err)
	}
	for src, dst := range map[string]string{e.Kernel: "vmlinuz", initrd: "initrd.img"} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, dst), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The socket directory as the guide lays it out: root's, searchable by
	// a group QEMU's user is in (here its own), closed to everyone else.
	qemuGroup, err := user.LookupGroup("libvirt-qemu")
	if err != nil {
		t.Fatalf("group libvirt-qemu (libvirt-daemon-system): %v", err)
	}
	gid, _ := strconv.Atoi(qemuGroup.Gid)
	sockDir := filepath.Join(root, "run-vhostdm")
	if err := os.Mkdir(sockDir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sockDir, 0, gid); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(root, "vm1-root.img")
	const imgSectors = 131072 // 64 MiB
	sparse(t, img, imgSectors*512)

	guideTOML := guideBlock(t, e, guideTOMLMarker)
	toml := replaceAll(t, "TOML", guideTOML,
		"/run/vhostdm/", sockDir+"/",
		"/var/lib/vhostdm/vm1-root.img", img,
		"41943040", strconv.Itoa(imgSectors))
	if !strings.Contains(toml, `socket-owner = "libvirt-qemu"`) {
		t.Fatal(`the guide's TOML must set socket-owner = "libvirt-qemu"`)
	}
	cfgPath := filepath.Join(root, "vm1.toml")
	if err := os.WriteFile(cfgPath, []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "validate", "-c", cfgPath).CombinedOutput(); err != nil {
		t.Fatalf("vhostdm validate on the guide's TOML: %v\n%s", err, out)
	}

	const seed, coverage, maxBlocks = 7007, 25, 32
	args := e.QEMUArgs(harness.VMConfig{
		Disks:  []harness.Disk{{NumQueues: 2}},
		Steps:  []string{proto.StepInfo, proto.StepVerify},
		Params: seedParams(seed, coverage, maxBlocks),
	}, "")
	var cmdline string
	for i, a := range args {
		if a == "-append" {
			cmdline = args[i+1]
		}
	}
	console := filepath.Join(root, "console.log")
	guideXML := guideBlock(t, e, guideXMLMarker)
	xml := replaceAll(t, "domain XML", guideXML,
		"<domain type='kvm'>", "<domain type='qemu'>",
		"<memory unit='GiB'>4</memory>", "<memory unit='MiB'>512</memory>",
		"/var/lib/vhostdm/vm1/vmlinuz", filepath.Join(root, "vmlinuz"),
		"/var/lib/vhostdm/vm1/initrd.img", filepath.Join(root, "initrd.img"),
		"<cmdline>console=ttyS0</cmdline>", "<cmdline>"+cmdline+"</cmdline>",
		"/run/vhostdm/", sockDir+"/",
		"<serial type='pty'>", "<serial type='file'><source path='"+console+"'/>",
	)
	xmlPath := filepath.Join(root, "vm1.xml")
	if err := os.WriteFile(xmlPath, []byte(xml), 0o644); err != nil {
		t.Fatal(err)
	}

	lv := startLibvirt(t, filepath.Join(root, "libvirt"), bin)
	if out, err := lv.virsh(30*time.Second, "define", xmlPath); err != nil {
		t.Fatalf("virsh define of the guide's XML: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		lv.virsh(30*time.Second, "destroy", "vm1")
		lv.virsh(30*time.Second, "undefine", "vm1")
	})
	t.Logf("private libvirtd up %v after the test started", time.Since(started).Round(time.Millisecond))

	t.Run("boot", func(t *testing.T) {
		d := startVhostdm(t, e, cfgPath)
		sock := filepath.Join(sockDir, "vm1-root.sock")
		var st syscall.Stat_t
		if err := syscall.Stat(sock, &st); err != nil {
			t.Fatal(err)
		}
		if u, _ := user.Lookup("libvirt-qemu"); strconv.Itoa(int(st.Uid)) != u.Uid || st.Mode&0o777 != 0o600 {
			t.Fatalf("socket uid %d mode %#o, want libvirt-qemu's uid (%s) and 0600", st.Uid, st.Mode&0o777, u.Uid)
		}
		bootStart := time.Now()
		if out, err := lv.virsh(2*time.Minute, "start", "vm1"); err != nil {
			t.Fatalf("virsh start: %v\n%s\nQEMU log:\n%s", err, out, lv.qemuLog())
		}
		// The guest powers off when its steps are done.
		deadline := time.Now().Add(guestTimeout)
		for {
			out, _ := lv.virsh(30*time.Second, "domstate", "vm1")
			if strings.TrimSpace(out) == "shut off" {
				break
			}
			if time.Now().After(deadline) {
				con, _ := os.ReadFile(console)
				t.Fatalf("guest still %q after %v; console tail:\n%s", strings.TrimSpace(out), guestTimeout, tail(string(con), 40))
			}
			time.Sleep(500 * time.Millisecond)
		}
		t.Logf("libvirt guest: start to shut off %v", time.Since(bootStart).Round(time.Millisecond))
		con, err := os.ReadFile(console)
		if err != nil {
			t.Fatal(err)
		}
		run, err := harness.ParseConsole(string(con))
		if err != nil {
			t.Fatal(err)
		}
		if run.End == nil {
			t.Fatalf("the guest printed no end line; console tail:\n%s", tail(string(con), 40))
		}
		if f := run.Failed(); f != "" {
			t.Fatalf("guest steps failed:\n%s", f)
		}
		di := info(t, run, "vda")
		if di.Sectors != imgSectors {
			t.Errorf("guest capacity %d sectors, want %d", di.Sectors, imgSectors)
		}
		if di.Serial != "vm1-root" {
			t.Errorf("guest serial %q, want the export's serial vm1-root (libvirt refuses <serial> on vhostuser disks)", di.Serial)
		}
		if di.Queues != 2 {
			t.Errorf("guest vda has %d queues, want 2 (queues='2', num-queues = 2, 2 vCPUs)", di.Queues)
		}
		d.Stop()
		data, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		for _, err := range harness.CheckPlan(data, harness.PlanCheck{
			Seed: seed, Coverage: coverage, MaxBlocks: maxBlocks, ZeroElsewhere: true,
		}) {
			t.Errorf("host check of the image: %v", err)
		}
	})

	t.Run("unreachable-socket", func(t *testing.T) {
		// The same file without socket-owner: the socket is root's 0600.
		bad := strings.ReplaceAll(toml, `socket-owner = "libvirt-qemu"`, "")
		badPath := filepath.Join(root, "vm1-bad.toml")
		if err := os.WriteFile(badPath, []byte(bad), 0o644); err != nil {
			t.Fatal(err)
		}
		startVhostdm(t, e, badPath)
		begin := time.Now()
		out, err := lv.virsh(libvirtStartBound+30*time.Second, "start", "vm1")
		took := time.Since(begin)
		t.Logf("virsh start refused after %v: %s", took.Round(time.Millisecond), strings.TrimSpace(out))
		if err == nil {
			t.Fatalf("virsh start succeeded with a socket QEMU cannot open:\n%s", out)
		}
		if took > libvirtStartBound {
			t.Errorf("virsh start took %v to fail, want at most %v", took, libvirtStartBound)
		}
		sock := filepath.Join(sockDir, "vm1-root.sock")
		for _, want := range []string{sock, "libvirt-qemu", "permission denied", "socket-owner"} {
			if !strings.Contains(out, want) {
				t.Errorf("virsh start's error does not say %q:\n%s", want, out)
			}
		}
		if st, _ := lv.virsh(30*time.Second, "domstate", "vm1"); strings.TrimSpace(st) != "shut off" {
			t.Errorf("domain state after the refused start: %q", strings.TrimSpace(st))
		}
	})

	// What the guide says happens without the hook: QEMU with <reconnect>
	// waits for the socket, `virsh start` does not return, and the
	// domain's QEMU log names the socket and the permission error.
	t.Run("unreachable-socket-without-hook", func(t *testing.T) {
		hook := filepath.Join(lv.root, "etc", "hooks", "qemu.d", "vhostdm")
		orig, err := os.ReadFile(hook)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(hook, []byte("#!/bin/sh\ncat >/dev/null\nexit 0\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		defer os.WriteFile(hook, orig, 0o755)
		bad := strings.ReplaceAll(toml, `socket-owner = "libvirt-qemu"`, "")
		badPath := filepath.Join(root, "vm1-bad.toml")
		if err := os.WriteFile(badPath, []byte(bad), 0o644); err != nil {
			t.Fatal(err)
		}
		startVhostdm(t, e, badPath)
		os.Remove(filepath.Join(lv.root, "log", "qemu", "vm1.log"))
		type result struct {
			out string
			err error
		}
		done := make(chan result, 1)
		go func() {
			out, err := lv.virsh(3*time.Minute, "start", "vm1")
			done <- result{out, err}
		}()
		want := "Failed to connect to '" + filepath.Join(sockDir, "vm1-root.sock") + "': Permission denied"
		deadline := time.Now().Add(libvirtStartBound)
		for !strings.Contains(lv.qemuLog(), want) {
			select {
			case r := <-done:
				t.Fatalf("virsh start returned (%v) before QEMU logged %q:\n%s\nQEMU log:\n%s", r.err, want, r.out, lv.qemuLog())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("QEMU log lacks %q after %v:\n%s", want, libvirtStartBound, lv.qemuLog())
			}
			time.Sleep(200 * time.Millisecond)
		}
		select {
		case r := <-done:
			t.Fatalf("virsh start returned (%v) although QEMU cannot reach the socket: %s", r.err, r.out)
		case <-time.After(5 * time.Second):
		}
		if out, err := lv.virsh(time.Minute, "destroy", "vm1"); err != nil {
			t.Fatalf("virsh destroy: %v\n%s", err, out)
		}
		if r := <-done; r.err == nil {
			t.Fatalf("virsh start succeeded: %s", r.out)
		}
	})
	t.Logf("libvirt e2e took %v", time.Since(started).Round(time.Millisecond))
}

// qemuLog returns the tail of the domain's QEMU log.
func (lv *libvirt) qemuLog() string {
	b, _ := os.ReadFile(filepath.Join(lv.root, "log", "qemu", "vm1.log"))
	return tail(string(b), 20)
}
