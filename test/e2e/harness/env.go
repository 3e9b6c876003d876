// Package harness runs vhostdm's end-to-end tests: it builds the guest's
// initramfs (Debian's kernel modules, our static /init from
// test/e2e/guestinit, optionally fio and busybox), starts back ends
// (vhostdm serve or qemu-storage-daemon), boots QEMU guests whose disks are
// vhost-user-blk exports, parses the guest's result lines and checks the
// backing files on the host.
//
// Everything it builds goes into one temporary directory per process,
// removed by Cleanup; nothing is committed. Sizes and offsets are in bytes
// unless a name says sectors.
package harness

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// SetupHint tells how to install the programs the suite needs.
const SetupHint = "run scripts/setup.sh (as root or with sudo) to install QEMU 10 from bookworm-backports, " +
	"qemu-storage-daemon, Debian's kernel (linux-image-amd64), busybox-static, cpio and fio"

// Env is what the suite found on this machine.
type Env struct {
	QEMU          string // qemu-system-x86_64
	QEMUVersion   [3]int
	QSD           string // qemu-storage-daemon
	Kernel        string // /boot/vmlinuz-<release>
	KernelRelease string
	ModulesDir    string // /lib/modules/<release>
	Fio           string // may be empty: only the fio step needs it
	Busybox       string // may be empty: only interactive shells need it
	RepoRoot      string // the directory of vhostdm's go.mod
}

var (
	envOnce sync.Once
	envVal  *Env
	envErr  error
)

// FindEnv finds QEMU, qemu-storage-daemon, the kernel and its modules, fio
// and busybox, and the repository root. Its error says how to install what
// is missing. Set VHOSTDM_E2E_KERNEL to a vmlinuz path to choose a kernel.
func FindEnv() (*Env, error) {
	envOnce.Do(func() { envVal, envErr = findEnv() })
	return envVal, envErr
}

func findEnv() (*Env, error) {
	e := &Env{}
	var errs []error
	var err error
	if e.QEMU, err = exec.LookPath("qemu-system-x86_64"); err != nil {
		errs = append(errs, fmt.Errorf("qemu-system-x86_64 not found in PATH"))
	} else if e.QEMUVersion, err = qemuVersion(e.QEMU); err != nil {
		errs = append(errs, err)
	}
	if e.QSD, err = exec.LookPath("qemu-storage-daemon"); err != nil {
		errs = append(errs, fmt.Errorf("qemu-storage-daemon not found in PATH"))
	}
	if e.Kernel, e.KernelRelease, err = findKernel(); err != nil {
		errs = append(errs, err)
	} else {
		e.ModulesDir = filepath.Join("/lib/modules", e.KernelRelease)
	}
	e.Fio, _ = exec.LookPath("fio")
	if p, err := exec.LookPath("busybox"); err == nil {
		e.Busybox = p
	}
	if e.RepoRoot, err = findRepoRoot(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w\nto fix: %s", errors.Join(errs...), SetupHint)
	}
	return e, nil
}

var qemuVersionRE = regexp.MustCompile(`version (\d+)\.(\d+)(?:\.(\d+))?`)

func qemuVersion(bin string) ([3]int, error) {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return [3]int{}, fmt.Errorf("%s --version: %v", bin, err)
	}
	m := qemuVersionRE.FindStringSubmatch(string(out))
	if m == nil {
		return [3]int{}, fmt.Errorf("%s --version: cannot read a version in %q", bin, strings.TrimSpace(string(out)))
	}
	var v [3]int
	for i := 0; i < 3; i++ {
		v[i], _ = strconv.Atoi(m[i+1])
	}
	return v, nil
}

// AtLeast reports whether QEMU is at least major.minor.
func (e *Env) AtLeast(major, minor int) bool {
	return e.QEMUVersion[0] > major || (e.QEMUVersion[0] == major && e.QEMUVersion[1] >= minor)
}

// findKernel picks VHOSTDM_E2E_KERNEL or the newest /boot/vmlinuz-* whose
// modules are installed.
func findKernel() (string, string, error) {
	if k := os.Getenv("VHOSTDM_E2E_KERNEL"); k != "" {
		rel := strings.TrimPrefix(filepath.Base(k), "vmlinuz-")
		if err := checkKernel(k, rel); err != nil {
			return "", "", fmt.Errorf("VHOSTDM_E2E_KERNEL=%s: %w", k, err)
		}
		return k, rel, nil
	}
	ks, _ := filepath.Glob("/boot/vmlinuz-*")
	sort.Sort(sort.Reverse(sort.StringSlice(ks)))
	var why []string
	for _, k := range ks {
		rel := strings.TrimPrefix(filepath.Base(k), "vmlinuz-")
		if err := checkKernel(k, rel); err != nil {
			why = append(why, err.Error())
			continue
		}
		return k, rel, nil
	}
	if len(ks) == 0 {
		return "", "", fmt.Errorf("no kernel /boot/vmlinuz-* (Debian's linux-image-amd64)")
	}
	return "", "", fmt.Errorf("no usable kernel: %s", strings.Join(why, "; "))
}

func checkKernel(k, rel string) error {
	f, err := os.Open(k)
	if err != nil {
		return fmt.Errorf("kernel %s unreadable (Debian installs it mode 0600: run as root or chmod a+r it): %w", k, err)
	}
	f.Close()
	if _, err := os.Stat(filepath.Join("/lib/modules", rel, "modules.dep")); err != nil {
		return fmt.Errorf("kernel %s has no /lib/modules/%s/modules.dep", k, rel)
	}
	return nil
}

// findRepoRoot walks up from the working directory, then from this source
// file, to vhostdm's go.mod.
func findRepoRoot() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		starts = append(starts, filepath.Dir(file))
	}
	for _, d := range starts {
		for {
			b, err := os.ReadFile(filepath.Join(d, "go.mod"))
			if err == nil && strings.Contains(string(b), "module github.com/vhostdm/vhostdm\n") {
				return d, nil
			}
			parent := filepath.Dir(d)
			if parent == d {
				break
			}
			d = parent
		}
	}
	return "", fmt.Errorf("cannot find vhostdm's go.mod above %v: run from inside the repository", starts)
}

// work is the per-process directory for built artefacts.
var work struct {
	mu  sync.Mutex
	dir string
}

// WorkDir returns the per-process temporary directory, creating it.
func WorkDir() (string, error) {
	work.mu.Lock()
	defer work.mu.Unlock()
	if work.dir == "" {
		d, err := os.MkdirTemp("", "vhostdm-e2e-")
		if err != nil {
			return "", err
		}
		work.dir = d
	}
	return work.dir, nil
}

// Cleanup removes the per-process directory (initramfs parts, binaries).
// Call it from TestMain after the tests.
func Cleanup() {
	work.mu.Lock()
	defer work.mu.Unlock()
	if work.dir != "" {
		os.RemoveAll(work.dir)
		work.dir = ""
	}
}

// built caches "go build" outputs by package.
var built struct {
	mu   sync.Mutex
	bins map[string]string
	errs map[string]error
}

// GoBuild builds a package of the repository (e.g. "./cmd/vhostdm") once per
// process and returns the binary's path. static builds with CGO_ENABLED=0.
func (e *Env) GoBuild(pkg, name string, static bool) (string, error) {
	built.mu.Lock()
	defer built.mu.Unlock()
	if built.bins == nil {
		built.bins, built.errs = map[string]string{}, map[string]error{}
	}
	if p, ok := built.bins[pkg]; ok {
		return p, built.errs[pkg]
	}
	dir, err := WorkDir()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, name)
	args := []string{"build", "-o", out}
	if buildTags != "" && !static {
		args = append(args, "-tags", buildTags)
	}
	cmd := exec.Command("go", append(args, pkg)...)
	cmd.Dir = e.RepoRoot
	cmd.Env = os.Environ()
	if static {
		cmd.Env = append(cmd.Env, "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		err = fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
		built.bins[pkg], built.errs[pkg] = out, err
		return out, err
	}
	built.bins[pkg] = out
	return out, nil
}

// Vhostdm builds cmd/vhostdm once per process and returns its path.
func (e *Env) Vhostdm() (string, error) {
	p, err := e.GoBuild("./cmd/vhostdm", "vhostdm", false)
	if err != nil {
		return "", fmt.Errorf("cannot build the vhostdm daemon (cmd/vhostdm must build and provide `vhostdm serve -c FILE`): %w", err)
	}
	return p, nil
}
