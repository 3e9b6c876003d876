package main

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// healthy checks that a fresh QMP client is answered and that the export
// at sock passes a verified write, flush and read.
func healthy(t *testing.T, qmpSock, sock string) {
	t.Helper()
	q := dialQMP(t, qmpSock)
	if _, err := q.exec("query-version", nil); err != nil {
		t.Fatalf("QMP on %s no longer answers: %v", qmpSock, err)
	}
	q.c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cl, err := frontend.Dial(ctx, frontend.Config{Socket: sock})
	if err != nil {
		t.Fatalf("healthy export %s: %v", sock, err)
	}
	defer cl.Close()
	data, _ := cl.Buf(64 << 10)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	sector := uint64(rand.IntN(1000)) * 8
	if err := cl.WriteAt(ctx, 0, data, sector); err != nil {
		t.Fatalf("healthy export write: %v", err)
	}
	if err := cl.Flush(ctx, 0); err != nil {
		t.Fatalf("healthy export flush: %v", err)
	}
	back, _ := cl.Buf(len(data))
	if err := cl.ReadAt(ctx, 0, back, sector); err != nil {
		t.Fatalf("healthy export read: %v", err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("healthy export read back other data than written")
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return st.Ino
}

const socketsConfig = `
[qmp]
socket = "qmp.sock"

[[device]]
name = "root"
table = "0 16384 linear disk.img 0"

[[export]]
id = "root0"
device = "root"
socket = "root.sock"
writable = true
`

// TestHostileSocketPaths is finding 7 of the vhost isolation issue: no
// export, no QMP client and no second daemon can take a live socket. Two
// `vhostdm serve` children run; block-export-add aimed at the daemon's own
// QMP socket, at its own export socket and at the other daemon's sockets is
// refused with a clear QMP error; a third daemon configured on the first
// one's paths fails to start and steals nothing. After each attack QMP
// answers, the healthy export passes a verified read/write and the socket
// files are the same inodes; SIGTERM then stops both daemons within 5 s
// with exit status 0.
func TestHostileSocketPaths(t *testing.T) {
	dirA, dirB := t.TempDir(), t.TempDir()
	for _, d := range []string{dirA, dirB} {
		sparse(t, filepath.Join(d, "disk.img"), 8<<20)
		writeConfig(t, d, socketsConfig)
	}
	qA, xA := filepath.Join(dirA, "qmp.sock"), filepath.Join(dirA, "root.sock")
	qB, xB := filepath.Join(dirB, "qmp.sock"), filepath.Join(dirB, "root.sock")
	a := startChild(t, filepath.Join(dirA, "vm.toml"))
	a.waitSockets(t, qA, xA)
	b := startChild(t, filepath.Join(dirB, "vm.toml"))
	b.waitSockets(t, qB, xB)
	inodes := map[string]uint64{}
	for _, s := range []string{qA, xA, qB, xB} {
		inodes[s] = inode(t, s)
	}
	after := func(what string) {
		t.Helper()
		healthy(t, qA, xA)
		healthy(t, qB, xB)
		for s, ino := range inodes {
			if got := inode(t, s); got != ino {
				t.Fatalf("after %s: %s was replaced (inode %d, was %d)", what, s, got, ino)
			}
		}
	}
	healthy(t, qA, xA)

	q := dialQMP(t, qA)
	if _, err := q.exec("dm-create", map[string]any{"name": "evil", "table": "0 2048 zero"}); err != nil {
		t.Fatal(err)
	}
	for _, target := range []struct{ name, path string }{
		{"its own QMP socket", qA},
		{"its own export socket", xA},
		{"another daemon's QMP socket", qB},
		{"another daemon's export socket", xB},
	} {
		_, err := q.exec("block-export-add", map[string]any{"type": "vhost-user-blk", "id": "evil0", "node-name": "evil",
			"addr": map[string]any{"type": "unix", "path": target.path}})
		if err == nil {
			t.Fatalf("block-export-add on %s (%s) succeeded", target.name, target.path)
		}
		if !strings.HasPrefix(err.Error(), "GenericError: ") || !strings.Contains(err.Error(), "a running server answers on this socket") ||
			!strings.Contains(err.Error(), target.path) {
			t.Fatalf("block-export-add on %s: %v, want a GenericError naming the path and saying a server answers on it", target.name, err)
		}
		t.Logf("block-export-add on %s: %v", target.name, err)
		// The session that was refused goes on.
		if out, err := q.exec("query-block-exports", nil); err != nil || strings.Contains(string(out), "evil0") {
			t.Fatalf("after the refused export: %s %v", out, err)
		}
		after("block-export-add on " + target.name)
	}

	// A file that is not a socket (the configuration) is not replaced.
	cfgA := filepath.Join(dirA, "vm.toml")
	before, _ := os.ReadFile(cfgA)
	_, err := q.exec("block-export-add", map[string]any{"type": "vhost-user-blk", "id": "evil0", "node-name": "evil",
		"addr": map[string]any{"type": "unix", "path": cfgA}})
	if err == nil || !strings.Contains(err.Error(), "exists and is not a socket") {
		t.Fatalf("block-export-add on a regular file: %v", err)
	}
	if now, _ := os.ReadFile(cfgA); !bytes.Equal(now, before) {
		t.Fatal("block-export-add changed a regular file at addr.path")
	}
	after("block-export-add on a regular file")

	// A second daemon on the first one's paths fails and steals nothing;
	// so does one whose export socket is the first one's QMP socket.
	dirC := t.TempDir()
	sparse(t, filepath.Join(dirC, "disk.img"), 8<<20)
	for _, tc := range []struct{ name, config string }{
		{"the same paths", strings.NewReplacer(`"qmp.sock"`, `"`+qA+`"`, `"root.sock"`, `"`+xA+`"`).Replace(socketsConfig)},
		{"an export on the other's QMP socket", strings.NewReplacer(`"qmp.sock"`, `"c-qmp.sock"`, `"root.sock"`, `"`+qA+`"`).Replace(socketsConfig)},
	} {
		c := startChild(t, writeConfig(t, dirC, tc.config))
		select {
		case <-c.done:
			err := c.err
			if err == nil {
				t.Fatalf("a daemon on %s started", tc.name)
			}
			if !strings.Contains(c.log.String(), "a running server answers on this socket") {
				t.Fatalf("a daemon on %s failed without saying why:\n%s", tc.name, c.log.String())
			}
			t.Logf("second daemon on %s: %v: %s", tc.name, err, strings.TrimSpace(c.log.String()))
		case <-time.After(20 * time.Second):
			t.Fatalf("a daemon on %s is still running", tc.name)
		}
		after("a second daemon on " + tc.name)
	}
	q.c.Close()
	a.stop(t)
	b.stop(t)
	for _, s := range []string{qA, xA, qB, xB} {
		if _, err := os.Lstat(s); err == nil {
			t.Errorf("%s left behind after the daemon stopped", s)
		}
	}
}
