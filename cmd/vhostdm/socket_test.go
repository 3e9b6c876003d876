package main

import (
	"context"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/config"
)

// sockPerm returns a socket file's mode bits, uid and gid.
func sockPerm(t *testing.T, path string) (fs.FileMode, int, int) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		t.Fatalf("%s is not a socket", path)
	}
	return fs.FileMode(st.Mode & 0o777), int(st.Uid), int(st.Gid)
}

// TestSocketOwnerGroupMode checks that the socket keys of the exports and
// of the QMP socket hold after start, after a reload that re-adds the
// export, and after a restart of the daemon.
func TestSocketOwnerGroupMode(t *testing.T) {
	uid, gid := os.Getuid(), os.Getgid()
	if uid == 0 {
		// Root may give the sockets away: use ids nobody has.
		uid, gid = 4242, 4343
	}
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "disk.img"), 8<<20)
	text := func(mode string) string {
		return strings.NewReplacer(
			`socket = "qmp.sock"`, `socket = "qmp.sock"
socket-group = "`+strconv.Itoa(gid)+`"
socket-mode = "0660"`,
			`serial = "vm-root"`, `serial = "vm-root"
socket-owner = "`+strconv.Itoa(uid)+`"
socket-group = "`+strconv.Itoa(gid)+`"
socket-mode = "`+mode+`"`).Replace(serveConfig)
	}
	path := writeConfig(t, dir, text("0640"))
	rootSock, qmpSock := filepath.Join(dir, "root.sock"), filepath.Join(dir, "qmp.sock")
	check := func(when string, mode fs.FileMode) {
		t.Helper()
		if m, u, g := sockPerm(t, rootSock); m != mode || u != uid || g != gid {
			t.Errorf("%s: export socket %#o %d:%d, want %#o %d:%d", when, m, u, g, mode, uid, gid)
		}
		if m, _, g := sockPerm(t, qmpSock); m != 0o660 || g != gid {
			t.Errorf("%s: QMP socket %#o group %d, want 0660 group %d", when, m, g, gid)
		}
	}
	start := func() *daemon {
		t.Helper()
		c, err := config.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		d, err := startDaemon(context.Background(), c, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	d := start()
	check("after start", 0o640)

	// A changed mode re-adds the export with a new socket.
	writeConfig(t, dir, text("0600"))
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	check("after reload", 0o600)
	// A reload that removes the export and one that adds it back.
	writeConfig(t, dir, strings.Split(text("0600"), "[[export]]")[0])
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(rootSock); err == nil {
		t.Fatal("export socket still there after the export was removed")
	}
	writeConfig(t, dir, text("0600"))
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	check("after reload re-adding the export", 0o600)

	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = start()
	defer d.Close()
	check("after restart", 0o600)
}
