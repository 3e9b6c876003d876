//go:build ceph

package cephtest

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

var cluster *Cluster

// helperEnv makes the test binary a helper process that starts a cluster
// of its own, prints its directory and waits to be killed.
const helperEnv = "CEPHTEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		c, err := StartOwn()
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString(c.Dir + "\n")
		select {}
	}
	os.Exit(Main(m, &cluster))
}

// TestClusterServesRBD: the shared cluster stores images, in its rbd pool
// and in a new pool, and rbd export reads them back; health is OK.
func TestClusterServesRBD(t *testing.T) {
	name := cluster.CreateImage(t, Pool, 1<<20+4096)
	if got := cluster.Export(t, name); len(got) != 1<<20+4096 {
		t.Fatalf("exported %d bytes, want %d", len(got), 1<<20+4096)
	}
	pool := cluster.CreatePool(t, "rbd")
	if got := cluster.Export(t, cluster.CreateImage(t, pool, 4096)); len(got) != 4096 {
		t.Fatalf("exported %d bytes from an image in a new pool, want 4096", len(got))
	}
	if out := cluster.Must(t, "ceph", "health"); !strings.HasPrefix(out, "HEALTH_OK") {
		t.Errorf("ceph health: %s", out)
	}
}

// daemonPids reads the cluster's pid files.
func daemonPids(t *testing.T, dir string) []int {
	t.Helper()
	var pids []int
	for _, n := range []string{"mon.a", "mgr.x", "osd.0"} {
		b, err := os.ReadFile(filepath.Join(dir, "run", n+".pid"))
		if err != nil {
			t.Fatalf("pid file of %s: %v", n, err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatalf("pid file of %s: %v", n, err)
		}
		pids = append(pids, pid)
	}
	return pids
}

// alive reports whether pid runs (not a zombie).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// TestWatchdogOnKill: kill -9 of the process that started a cluster makes
// the watchdog kill the daemons and remove the directory.
func TestWatchdogOnKill(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		cmd.Wait()
		t.Fatalf("helper did not start a cluster: %v", err)
	}
	dir := strings.TrimSpace(line)
	pids := daemonPids(t, dir)
	for _, p := range pids {
		if !alive(p) {
			t.Fatalf("daemon %d not running before the kill", p)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	start := time.Now()
	for time.Since(start) < 30*time.Second {
		gone := true
		for _, p := range pids {
			if alive(p) {
				gone = false
			}
		}
		if _, err := os.Stat(dir); gone && os.IsNotExist(err) {
			t.Logf("cluster gone %v after the owner's kill -9", time.Since(start).Round(time.Millisecond))
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("30 s after kill -9 of the owner, the daemons %v or %s remain", pids, dir)
}

// TestStopChecksCmdline: stop signals a pid from a pid file only when
// that process runs with the cluster's conf.
func TestStopChecksCmdline(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "run"), 0o755)
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer other.Process.Kill()
	pidf := filepath.Join(dir, "run", "osd.0.pid")
	os.WriteFile(pidf, []byte(strconv.Itoa(other.Process.Pid)+"\n"), 0o644)
	if out, err := exec.Command("bash", "-c", script, "cluster.sh", "stop", dir).CombinedOutput(); err != nil {
		t.Fatalf("stop: %v\n%s", err, out)
	}
	time.Sleep(100 * time.Millisecond)
	if !alive(other.Process.Pid) {
		t.Fatal("stop killed a process that is not the cluster's (reused pid)")
	}
	if _, err := os.Stat(pidf); !os.IsNotExist(err) {
		t.Errorf("stale pid file left: %v", err)
	}
}
