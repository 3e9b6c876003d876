package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/sdnotify/sdnotifytest"
)

// TestServeNotifyMetricsQuit runs `repagent-hub serve` as systemd would:
// READY=1 arrives on NOTIFY_SOCKET once it listens, /metrics answers, and
// QMP quit stops it with exit status 0 after STOPPING=1.
func TestServeNotifyMetricsQuit(t *testing.T) {
	dir := t.TempDir()
	ns := sdnotifytest.Listen(t)
	// A free port for the metrics endpoint.
	maddr := freeAddr(t)
	sock := filepath.Join(dir, "hub.qmp")
	exit := make(chan int, 1)
	go func() {
		exit <- run([]string{"serve", "--listen", "127.0.0.1:0", "--store", filepath.Join(dir, "store"),
			"--qmp", sock, "--metrics", maddr, "--log-format", "json"}, io.Discard, io.Discard)
	}()
	if got := ns.Next(); !strings.HasPrefix(got, "READY=1\nSTATUS=listening on 127.0.0.1:") {
		t.Fatalf("first notification %q", got)
	}
	// The QMP socket is the owner's only, and a second hub cannot take it.
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("QMP socket: %v %v, want mode 0600", fi.Mode(), err)
	}
	var second bytes.Buffer
	if code := run([]string{"serve", "--listen", "127.0.0.1:0", "--store", filepath.Join(dir, "store2"),
		"--qmp", sock}, io.Discard, &second); code != 1 || !strings.Contains(second.String(), "a running server answers on this socket") {
		t.Fatalf("a second hub on the same QMP socket: exit %d: %s", code, second.String())
	}
	resp, err := http.Get("http://" + maddr + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("metrics: %s", resp.Status)
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var greeting map[string]any
	json.NewDecoder(conn).Decode(&greeting)
	fmt.Fprint(conn, `{"execute":"qmp_capabilities"}{"execute":"quit"}`)
	if got := ns.Next(); got != "STOPPING=1\n" {
		t.Fatalf("notification at quit %q", got)
	}
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("exit status %d", code)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the hub did not stop after quit")
	}
}
