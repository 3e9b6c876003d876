package main

import (
	"bufio"
	"bytes"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func init() {
	register("check-access", "check that a user (QEMU's) can connect to sockets", runCheckAccess)
	register("libvirt-hook", "libvirt qemu hook: refuse to start a domain whose vhostdm sockets QEMU cannot open", runLibvirtHook)
}

// defaultQEMUUser is the user and group Debian's libvirt runs QEMU as
// under qemu:///system when qemu.conf sets none.
const defaultQEMUUser = "libvirt-qemu"

// accessTimeout bounds one connect of check-access.
const accessTimeout = 5 * time.Second

// runCheckAccess is `vhostdm check-access --user U [--group G] SOCKET...`:
// it connects to every socket as U (with U's groups), as QEMU would, and
// reports each one that fails.
func runCheckAccess(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check-access", flag.ContinueOnError)
	fs.SetOutput(stderr)
	usr := fs.String("user", defaultQEMUUser, "connect as `USER` (name or uid), with its groups")
	grp := fs.String("group", "", "primary `GROUP` (name or gid; default: the user's)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprintln(stderr, "usage: vhostdm check-access [--user USER] [--group GROUP] SOCKET...")
		return 2
	}
	cred, err := credential(*usr, *grp)
	if err != nil {
		fmt.Fprintf(stderr, "vhostdm check-access: %v\n", err)
		return 2
	}
	if cred.Uid != uint32(os.Getuid()) || cred.Gid != uint32(os.Getgid()) {
		// Connect from a child process running as the user.
		return reexecAs(cred, append([]string{"check-access", "--user", *usr, "--group", strconv.Itoa(int(cred.Gid))}, fs.Args()...), stdout, stderr)
	}
	code := 0
	for _, p := range fs.Args() {
		if err := connectOnce(p); err != nil {
			fmt.Fprintf(stderr, "%s: %s (uid %d gid %d) cannot connect: %v\n", p, *usr, os.Getuid(), os.Getgid(), err)
			code = 1
			continue
		}
		fmt.Fprintf(stdout, "%s: ok\n", p)
	}
	return code
}

// connectOnce connects to a unix socket and closes the connection.
func connectOnce(path string) error {
	c, err := net.DialTimeout("unix", path, accessTimeout)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Err != nil {
			err = op.Err
		}
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err
		}
		switch {
		case errors.Is(err, syscall.ENOENT):
			return fmt.Errorf("%w (is vhostdm serving this export?)", err)
		case errors.Is(err, syscall.ECONNREFUSED):
			return fmt.Errorf("%w (a stale socket: vhostdm is not running)", err)
		case errors.Is(err, syscall.EACCES):
			return fmt.Errorf("%w (see the export's socket-owner, socket-group and socket-mode and the directory's permissions)", err)
		}
		return err
	}
	return c.Close()
}

// credential resolves a user and group (names or numeric ids) to the
// credentials QEMU would run with: the user's uid, the group (default the
// user's primary group) and the user's supplementary groups.
func credential(usr, grp string) (*syscall.Credential, error) {
	u, err := user.Lookup(usr)
	if err != nil {
		if _, nerr := strconv.ParseUint(usr, 10, 32); nerr != nil {
			return nil, fmt.Errorf("user %q: %w", usr, err)
		}
		if u, err = user.LookupId(usr); err != nil {
			u = &user.User{Uid: usr, Gid: usr}
		}
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	if grp != "" {
		if n, err := strconv.ParseUint(grp, 10, 32); err == nil {
			gid = n
		} else if g, err := user.LookupGroup(grp); err == nil {
			gid, _ = strconv.ParseUint(g.Gid, 10, 32)
		} else {
			return nil, fmt.Errorf("group %q: %w", grp, err)
		}
	}
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	if ids, err := u.GroupIds(); err == nil {
		for _, s := range ids {
			if n, err := strconv.ParseUint(s, 10, 32); err == nil {
				cred.Groups = append(cred.Groups, uint32(n))
			}
		}
	}
	return cred, nil
}

// reexecAs runs this program with args as cred and copies its output.
func reexecAs(cred *syscall.Credential, args []string, stdout, stderr io.Writer) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "vhostdm: %v\n", err)
		return 2
	}
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		fmt.Fprintf(stderr, "vhostdm: run as uid %d: %v\n", cred.Uid, err)
		return 2
	}
	return 0
}

// runLibvirtHook is libvirt's qemu hook (/etc/libvirt/hooks/qemu.d/vhostdm):
// called as `vhostdm libvirt-hook DOMAIN OPERATION SUBOPERATION EXTRA` with
// the domain XML on stdin. At "prepare begin" it checks that QEMU's user
// can connect to every vhost-user disk socket of the domain, and fails the
// start with the reason otherwise: QEMU with <reconnect> would wait for
// the socket forever instead. Everything else passes.
func runLibvirtHook(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("libvirt-hook", flag.ContinueOnError)
	fs.SetOutput(stderr)
	qemuConf := fs.String("qemu-conf", "/etc/libvirt/qemu.conf", "libvirt's qemu.conf `FILE`, for QEMU's user and group")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() < 3 {
		fmt.Fprintln(stderr, "usage: vhostdm libvirt-hook [--qemu-conf FILE] DOMAIN OPERATION SUBOPERATION [EXTRA] < domain.xml")
		return 2
	}
	domain, op, sub := fs.Arg(0), fs.Arg(1), fs.Arg(2)
	// libvirt writes the XML for every operation: read it all.
	data, err := io.ReadAll(io.LimitReader(os.Stdin, 64<<20))
	io.Copy(io.Discard, os.Stdin)
	if op != "prepare" || sub != "begin" {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "vhostdm: domain %s: read domain XML: %v\n", domain, err)
		return 1
	}
	sockets, usr, grp, err := hookTargets(data)
	if err != nil {
		fmt.Fprintf(stderr, "vhostdm: domain %s: %v\n", domain, err)
		return 1
	}
	if len(sockets) == 0 {
		return 0
	}
	if usr == "" {
		usr, grp = qemuUser(*qemuConf)
	}
	var out bytes.Buffer
	cargs := []string{"--user", usr}
	if grp != "" {
		cargs = append(cargs, "--group", grp)
	}
	if code := runCheckAccess(append(cargs, sockets...), io.Discard, &out); code != 0 {
		fmt.Fprintf(stderr, "vhostdm: domain %s: QEMU cannot open its vhost-user disks: %s", domain, out.String())
		return 1
	}
	return 0
}

// hookTargets returns the vhost-user disk sockets of a domain XML and the
// user and group of a static DAC seclabel ("" if none).
func hookTargets(data []byte) (sockets []string, usr, grp string, err error) {
	var dom struct {
		Disks []struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Type string `xml:"type,attr"`
				Path string `xml:"path,attr"`
			} `xml:"source"`
		} `xml:"devices>disk"`
		Seclabels []struct {
			Model string `xml:"model,attr"`
			Label string `xml:"label"`
		} `xml:"seclabel"`
	}
	if err := xml.Unmarshal(data, &dom); err != nil {
		return nil, "", "", fmt.Errorf("domain XML: %w", err)
	}
	for _, d := range dom.Disks {
		if d.Type == "vhostuser" && d.Source.Path != "" {
			sockets = append(sockets, d.Source.Path)
		}
	}
	for _, s := range dom.Seclabels {
		if s.Model == "dac" && s.Label != "" {
			u, g, _ := strings.Cut(s.Label, ":")
			return sockets, strings.TrimPrefix(u, "+"), strings.TrimPrefix(g, "+"), nil
		}
	}
	return sockets, "", "", nil
}

// qemuUser returns the user and group qemu.conf sets, or Debian's
// default.
func qemuUser(path string) (usr, grp string) {
	usr, grp = defaultQEMUUser, defaultQEMUUser
	f, err := os.Open(path)
	if err != nil {
		return usr, grp
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok || strings.HasPrefix(strings.TrimSpace(k), "#") {
			continue
		}
		v = strings.Trim(strings.TrimSpace(v), `"`)
		switch strings.TrimSpace(k) {
		case "user":
			usr = strings.TrimPrefix(v, "+")
		case "group":
			grp = strings.TrimPrefix(v, "+")
		}
	}
	return usr, grp
}
