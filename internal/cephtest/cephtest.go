// Package cephtest runs a throwaway single-node Ceph cluster for tests:
// one monitor, one manager and one bluestore OSD on a sparse file, on
// 127.0.0.1 only, in a temporary directory, bootstrapped by cluster.sh
// (also scripts/ceph-test-cluster.sh), or the one ClusterEnv names (one
// cluster for many test processes). A test package shares one cluster:
//
//	var cluster *cephtest.Cluster
//
//	func TestMain(m *testing.M) { os.Exit(cephtest.Main(m, &cluster)) }
//
// A watchdog process holds one end of a pipe whose other end only the test
// process holds; when the test process dies in any way (a panic, a
// timeout, kill -9) the pipe closes and the watchdog kills the cluster's
// daemons and removes its directory.
//
// Without the Ceph daemons and tools (Debian packages ceph-mon, ceph-mgr,
// ceph-osd, ceph-common) Start fails naming the missing package; the tests
// fail, they are not skipped.
package cephtest

import (
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

//go:embed cluster.sh
var script string

// Pool is the replicated pool the cluster starts with, initialised for RBD.
const Pool = "rbd"

// Cluster is a running throwaway cluster.
type Cluster struct {
	// Dir holds everything: ceph.conf, keyrings, data, logs (log/).
	Dir string
	// Conf is the ceph.conf clients use; it names client.admin's keyring.
	Conf string
	// Keyring is client.admin's keyring; ID is "admin".
	Keyring string
	ID      string
	// Bootstrap is how long Start took, from an empty directory to a
	// successful object write.
	Bootstrap time.Duration

	root     string
	watchdog *exec.Cmd
	pipe     *os.File // the write end; closing it stops the cluster
	seq      atomic.Int64
}

// ClusterEnv names, when set, the directory of a running cluster
// (scripts/ceph-test-cluster.sh start DIR) that Start uses instead of
// bootstrapping one: scripts/test.sh starts one cluster for its whole Ceph
// stage and stops it at the end. The tests keep apart by name: each
// creates its own pools and images (Name).
const ClusterEnv = "VHOSTDM_CEPH_CLUSTER"

// Start returns the cluster ClusterEnv names, or else bootstraps one in a
// new temporary directory (StartOwn). A cluster of its own lives until
// Stop or until this process exits; Stop leaves one ClusterEnv names
// running.
func Start() (*Cluster, error) {
	if dir := os.Getenv(ClusterEnv); dir != "" {
		return Attach(dir)
	}
	return StartOwn()
}

// Attach returns the running cluster in dir (made by cluster.sh start).
func Attach(dir string) (*Cluster, error) {
	c := &Cluster{Dir: dir, ID: "admin", Conf: filepath.Join(dir, "ceph.conf"), Keyring: filepath.Join(dir, "client.admin.keyring")}
	for _, f := range []string{c.Conf, c.Keyring} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("cephtest: %s=%s: not a running test cluster's directory: %w", ClusterEnv, dir, err)
		}
	}
	return c, nil
}

// StartOwn bootstraps a cluster in a new temporary directory, whatever
// ClusterEnv says. The cluster lives until Stop or until this process
// exits.
func StartOwn() (*Cluster, error) {
	if _, err := exec.LookPath("bash"); err != nil {
		return nil, fmt.Errorf("cephtest: bash not found: install the Debian package bash")
	}
	root, err := os.MkdirTemp("", "vhostdm-ceph-")
	if err != nil {
		return nil, fmt.Errorf("cephtest: %w", err)
	}
	c := &Cluster{root: root, Dir: root, ID: "admin"}
	c.Conf = filepath.Join(c.Dir, "ceph.conf")
	c.Keyring = filepath.Join(c.Dir, "client.admin.keyring")
	// The watchdog first, so that a crash during the bootstrap cleans up too.
	r, w, err := os.Pipe()
	if err != nil {
		os.RemoveAll(root)
		return nil, fmt.Errorf("cephtest: %w", err)
	}
	c.pipe = w
	c.watchdog = exec.Command("bash", "-c", script, "cluster.sh", "watchdog", c.Dir)
	c.watchdog.Stdin = r
	c.watchdog.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // a ^C to the test's group must not kill it
	if err := c.watchdog.Start(); err != nil {
		r.Close()
		w.Close()
		os.RemoveAll(root)
		return nil, fmt.Errorf("cephtest: start the watchdog: %w", err)
	}
	r.Close()
	port, err := freePort()
	if err != nil {
		c.Stop()
		return nil, fmt.Errorf("cephtest: %w", err)
	}
	out, err := os.CreateTemp("", "vhostdm-ceph-start-")
	if err != nil {
		c.Stop()
		return nil, fmt.Errorf("cephtest: %w", err)
	}
	defer os.Remove(out.Name())
	defer out.Close()
	start := time.Now()
	// The daemons inherit the log file, not a pipe: Run returns when the
	// script does, not when the daemons close their output.
	cmd := exec.Command("bash", "-c", script, "cluster.sh", "start", c.Dir)
	cmd.Env = append(os.Environ(), "PORT="+strconv.Itoa(port))
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		log, _ := os.ReadFile(out.Name())
		c.Stop()
		return nil, fmt.Errorf("cephtest: bootstrap: %w\n%s", err, tail(string(log), 40))
	}
	c.Bootstrap = time.Since(start)
	return c, nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Stop kills the cluster's daemons and removes its directory.
func (c *Cluster) Stop() error {
	if c.pipe == nil {
		return nil
	}
	c.pipe.Close()
	c.pipe = nil
	err := c.watchdog.Wait()
	if rerr := os.RemoveAll(c.root); err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("cephtest: stop: %w", err)
	}
	return nil
}

// Main starts a cluster, stores it in *c, runs the tests and stops the
// cluster; TestMain returns its result to os.Exit. A cluster that does
// not start fails the whole package with the reason.
func Main(m *testing.M, c **Cluster) int {
	cl, err := Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		fmt.Fprintln(os.Stderr, "FAIL: the Ceph tests need a throwaway cluster (scripts/setup.sh installs the packages)")
		return 1
	}
	if cl.pipe != nil {
		fmt.Fprintf(os.Stderr, "cephtest: cluster up in %.1fs (%s)\n", cl.Bootstrap.Seconds(), cl.Dir)
	}
	if cl.pipe == nil {
		fmt.Fprintf(os.Stderr, "cephtest: using the cluster in %s (%s)\n", cl.Dir, ClusterEnv)
	}
	*c = cl
	code := m.Run()
	if err := cl.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// Command returns a Ceph tool (ceph, rbd, rados) run as client.admin of
// this cluster.
func (c *Cluster) Command(tool string, args ...string) *exec.Cmd {
	return exec.Command(tool, append([]string{"--conf", c.Conf}, args...)...)
}

// Run runs a Ceph tool and returns its standard output; the error has
// its standard error.
func (c *Cluster) Run(tool string, args ...string) (string, error) {
	cmd := c.Command(tool, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", tool, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// Must runs a Ceph tool and fails t if it fails.
func (c *Cluster) Must(t testing.TB, tool string, args ...string) string {
	t.Helper()
	out, err := c.Run(tool, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Name returns a name unique in this cluster, for images and pools: test
// processes that share a cluster (ClusterEnv) never meet, even when a pid
// is reused.
func (c *Cluster) Name(prefix string) string {
	return fmt.Sprintf("%s-%d-%s-%d", prefix, os.Getpid(), procToken, c.seq.Add(1))
}

// procToken tells this process's names from those of an earlier process
// with the same pid.
var procToken = func() string {
	var b [3]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}()

// CreatePool creates a replicated pool of one copy for application app
// ("rbd": initialised for RBD images; "rados" for plain objects) and
// returns its name; the pool is deleted when t ends.
func (c *Cluster) CreatePool(t testing.TB, app string) string {
	t.Helper()
	name := c.Name("pool")
	c.Must(t, "ceph", "osd", "pool", "create", name, "8", "8")
	t.Cleanup(func() { c.Run("ceph", "osd", "pool", "delete", name, name, "--yes-i-really-really-mean-it") })
	c.Must(t, "ceph", "osd", "pool", "set", name, "size", "1", "--yes-i-really-mean-it")
	if app == "rbd" {
		c.Must(t, "rbd", "pool", "init", name)
	} else {
		c.Must(t, "ceph", "osd", "pool", "application", "enable", name, app)
	}
	return name
}

// CreateImage creates an image of size bytes in pool (with rbd create,
// the default features) and returns its rbd:POOL/IMAGE name; the image
// is removed when t ends.
func (c *Cluster) CreateImage(t testing.TB, pool string, size int64) string {
	t.Helper()
	name := c.Name("img")
	c.Must(t, "rbd", "create", "--size", strconv.FormatInt(size, 10)+"B", pool+"/"+name)
	t.Cleanup(func() {
		// Snapshots first; the image may be gone already.
		c.Run("rbd", "snap", "purge", pool+"/"+name)
		c.Run("rbd", "rm", "--no-progress", pool+"/"+name)
	})
	return "rbd:" + pool + "/" + name
}

// Export returns an image's content as rbd export reads it (spec is
// POOL/IMAGE[@SNAP], with or without the rbd: prefix).
func (c *Cluster) Export(t testing.TB, spec string) []byte {
	t.Helper()
	spec = strings.TrimPrefix(spec, "rbd:")
	f := filepath.Join(t.TempDir(), "export")
	c.Must(t, "rbd", "export", "--no-progress", spec, f)
	data, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// AddClient creates client.ID with the given caps (pairs such as "mon",
// "profile rbd") and returns a keyring file holding its key.
func (c *Cluster) AddClient(t testing.TB, id string, caps ...string) string {
	t.Helper()
	if len(caps)%2 != 0 {
		t.Fatalf("AddClient %s: caps come in pairs", id)
	}
	kr := filepath.Join(t.TempDir(), "client."+id+".keyring")
	c.Must(t, "ceph", append([]string{"auth", "get-or-create", "client." + id, "-o", kr}, caps...)...)
	t.Cleanup(func() { c.Run("ceph", "auth", "del", "client."+id) })
	return kr
}
