package unixsock

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func statSock(t *testing.T, path string) (mode fs.FileMode, uid, gid uint32) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		t.Fatalf("%s: not a socket (mode %#o)", path, st.Mode)
	}
	return fs.FileMode(st.Mode & 0o777), st.Uid, st.Gid
}

func TestListenModeOwnerGroup(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a.sock")
	l, err := Listen(path, Perm{Owner: "4242", Group: "4343", Mode: 0o660})
	if err != nil {
		t.Fatal(err)
	}
	mode, uid, gid := statSock(t, path)
	if os.Getuid() == 0 && (uid != 4242 || gid != 4343) {
		t.Errorf("owner %d:%d, want 4242:4343", uid, gid)
	}
	if mode != 0o660 {
		t.Errorf("mode %#o, want 0660", mode)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	// Nothing is left in the directory but the socket.
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries, want the socket only: %v", len(ents), ents)
	}
	l.Close()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket not removed on close: %v", err)
	}
}

func TestListenDefaultModeDespiteUmask(t *testing.T) {
	old := unix.Umask(0)
	defer unix.Umask(old)
	path := filepath.Join(t.TempDir(), "a.sock")
	l, err := Listen(path, Perm{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if mode, _, _ := statSock(t, path); mode != DefaultMode {
		t.Errorf("mode %#o, want %#o", mode, DefaultMode)
	}
}

func TestListenRefusesLiveSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.sock")
	first, err := Listen(path, Perm{})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	_, err = Listen(path, Perm{})
	if !errors.Is(err, ErrInUse) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("second Listen on a live socket: %v, want ErrInUse", err)
	}
	// The first listener still owns the path.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("first listener unreachable after the refused Listen: %v", err)
	}
	c.Close()
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.sock")
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	l, err := Listen(path, Perm{})
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l.Close()
}

func TestListenRefusesNonSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.sock")
	os.WriteFile(path, []byte("data"), 0o600)
	if _, err := Listen(path, Perm{}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "data" {
		t.Error("regular file changed")
	}
}

func TestCloseKeepsNewerSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.sock")
	l, err := Listen(path, Perm{})
	if err != nil {
		t.Fatal(err)
	}
	// Someone removes ours and a new server takes the path.
	os.Remove(path)
	l2, err := Listen(path, Perm{})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	l.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("closing the old listener removed the new socket: %v", err)
	}
}

func TestListenLongDirectory(t *testing.T) {
	dir := t.TempDir()
	for len(dir) < 95 {
		dir = filepath.Join(dir, "d")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "x.sock")
	if len(path) >= 108 {
		t.Fatalf("test path too long for a socket: %d", len(path))
	}
	l, err := Listen(path, Perm{Mode: 0o640})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if mode, _, _ := statSock(t, path); mode != 0o640 {
		t.Errorf("mode %#o", mode)
	}
}

func TestPermErrors(t *testing.T) {
	for _, tc := range []struct {
		p    Perm
		want string
	}{
		{Perm{Owner: "no-such-user-vhostdm"}, `socket-owner "no-such-user-vhostdm": no such user`},
		{Perm{Group: "no-such-group-vhostdm"}, `socket-group "no-such-group-vhostdm": no such group`},
		{Perm{Mode: 0o1777}, "only permission bits"},
	} {
		if err := tc.p.Check(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.p, err, tc.want)
		}
	}
	if err := (Perm{Owner: "root", Group: "0", Mode: 0o600}).Check(); err != nil {
		t.Error(err)
	}
	for _, s := range []string{"0888", "1777", "rw", "-1", "0"} {
		if _, err := ParseMode(s); err == nil {
			t.Errorf("ParseMode(%q) accepted", s)
		}
	}
	if m, err := ParseMode("0660"); err != nil || m != 0o660 {
		t.Errorf("ParseMode(0660) = %#o, %v", m, err)
	}
}
