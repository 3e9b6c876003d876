// Package sdnotifytest is a fake systemd for tests: a NOTIFY_SOCKET that
// records what a daemon reports.
package sdnotifytest

import (
	"net"
	"path/filepath"
	"testing"
	"time"
)

// Socket is a listening notification socket.
type Socket struct {
	t    testing.TB
	conn *net.UnixConn
}

// Listen creates a notification socket in a temporary directory and
// points NOTIFY_SOCKET at it for the rest of the test.
func Listen(t testing.TB) *Socket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return &Socket{t: t, conn: conn}
}

// Next returns the next datagram, failing the test after 20 s without one.
func (s *Socket) Next() string {
	s.t.Helper()
	s.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 4096)
	n, err := s.conn.Read(buf)
	if err != nil {
		s.t.Fatalf("no notification: %v", err)
	}
	return string(buf[:n])
}
