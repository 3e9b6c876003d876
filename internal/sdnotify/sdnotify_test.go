package sdnotify

import (
	"net"
	"path/filepath"
	"testing"
	"time"
)

func TestNotify(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		path := filepath.Join(t.TempDir(), "notify")
		name := path
		if abstract {
			name = "\x00vhostdm-test-" + filepath.Base(t.TempDir())
		}
		conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		env := name
		if abstract {
			env = "@" + name[1:]
		}
		t.Setenv("NOTIFY_SOCKET", env)
		if err := Notify(Ready, Status("serving 2 exports")); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 256)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := string(buf[:n]), "READY=1\nSTATUS=serving 2 exports\n"; got != want {
			t.Fatalf("datagram %q, want %q", got, want)
		}
		conn.Close()
	}
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Notify(Ready); err != nil {
		t.Fatalf("without NOTIFY_SOCKET: %v", err)
	}
}
