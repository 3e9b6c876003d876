// Package sdnotify sends service state to systemd through the plain
// sd_notify protocol: one datagram of newline-separated KEY=VALUE lines to
// the unix socket named by $NOTIFY_SOCKET ('@' at its start means the
// abstract namespace). Without $NOTIFY_SOCKET every call does nothing, so
// daemons call it unconditionally.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"strings"
)

// States a daemon reports.
const (
	Ready     = "READY=1"
	Reloading = "RELOADING=1"
	Stopping  = "STOPPING=1"
)

// Notify sends the given KEY=VALUE lines. It returns nil without
// $NOTIFY_SOCKET.
func Notify(lines ...string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(strings.Join(lines, "\n") + "\n")); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

// Status returns a STATUS= line with a free-form message.
func Status(msg string) string { return "STATUS=" + strings.ReplaceAll(msg, "\n", " ") }
