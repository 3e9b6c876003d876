//go:build linux

// Command guestinit is the /init of the e2e test guest: a static Go program
// (CGO_ENABLED=0) packed by test/e2e/harness into an initramfs for Debian's
// kernel. It mounts devtmpfs, proc and sysfs, loads the virtio modules with
// finit_module in modules.dep order, waits for the virtio disks, runs the
// steps named on the kernel command line (vhostdm.test=info,verify@vda ...;
// see package proto for every parameter), prints one JSON result line per
// step between the markers of package proto on the console, and powers off.
//
// It never exits: a failure is a result line, a Go panic is caught and
// reported, and the machine is powered off either way.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/test/e2e/internal/kmod"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// console serialises lines to the console so that each is one write.
var console struct {
	mu sync.Mutex
	f  *os.File
}

// printLine writes marker+payload+"\n" with one write.
func printLine(marker string, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b = []byte(fmt.Sprintf(`{"error":%q}`, err.Error()))
	}
	line := append([]byte("\n"+marker), b...)
	line = append(line, '\n')
	console.mu.Lock()
	defer console.mu.Unlock()
	console.f.Write(line)
	progress.Store(time.Now().UnixNano())
}

// logf prints a human-readable progress line (not parsed by the host).
func logf(format string, args ...any) {
	console.mu.Lock()
	defer console.mu.Unlock()
	fmt.Fprintf(console.f, "guestinit: "+format+"\n", args...)
}

func main() {
	console.f = os.Stdout
	if f, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		console.f = f
	}
	failed := 0
	defer func() {
		if r := recover(); r != nil {
			buf := make([]byte, 8192)
			buf = buf[:runtime.Stack(buf, false)]
			printLine(proto.ResultMarker, proto.Result{Step: "init", Error: fmt.Sprintf("panic: %v\n%s", r, buf)})
			printLine(proto.EndMarker, proto.End{OK: false, Failed: failed + 1})
		}
		powerOff()
	}()

	if err := mountAll(); err != nil {
		fail("init", err)
		return
	}
	p := readParams()
	if err := loadModules(p.str(proto.ParamModules, "virtio_pci,virtio_blk")); err != nil {
		fail("modules", err)
		return
	}
	steps := splitList(p.str(proto.ParamTest, ""))
	interactive := len(steps) == 0 || (len(steps) == 1 && steps[0] == proto.StepShell)
	disks, err := waitDisks(int(p.int(proto.ParamDisks, 1)), 30*time.Second)
	if err != nil {
		fail("disks", err)
		return
	}
	if interactive {
		runShell(disks)
		return
	}
	printLine(proto.BeginMarker, proto.Begin{
		Kernel: kernelRelease(), UptimeMS: uptimeMS(), Disks: disks, Steps: steps, CPUs: runtime.NumCPU(),
	})
	if wd := p.int(proto.ParamWatchdog, 120); wd > 0 {
		go watchdog(time.Duration(wd)*time.Second, disks)
	}
	for _, s := range steps {
		name, disk, _ := strings.Cut(s, "@")
		if disk == "" {
			disk = p.str(proto.ParamDisk, "vda")
		}
		for _, r := range runOnDisks(name, disk, p) {
			if !r.OK {
				failed++
			}
		}
	}
	printLine(proto.EndMarker, proto.End{OK: failed == 0, Failed: failed})
}

// runOnDisks runs step name on disk, or on every disk of a list joined by
// "+" (writer@vda+vdb) at once, prints each result line as it comes and
// returns them all.
func runOnDisks(name, disk string, p params) []proto.Result {
	disks := strings.Split(disk, "+")
	var (
		mu  sync.Mutex
		all []proto.Result
		wg  sync.WaitGroup
	)
	for _, d := range disks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, r := range runStep(name, d, p) {
				printLine(proto.ResultMarker, r)
				mu.Lock()
				all = append(all, r)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return all
}

// fail reports a failure before any step could run.
func fail(step string, err error) {
	printLine(proto.BeginMarker, proto.Begin{Kernel: kernelRelease(), UptimeMS: uptimeMS()})
	printLine(proto.ResultMarker, proto.Result{Step: step, Error: err.Error()})
	printLine(proto.EndMarker, proto.End{OK: false, Failed: 1})
}

func powerOff() {
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	// Reboot only returns on failure; init must not exit.
	for {
		time.Sleep(time.Hour)
	}
}

func mountAll() error {
	for _, m := range []struct{ src, dir, fs string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.dir, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dir, m.fs, 0, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s on %s: %w", m.fs, m.dir, err)
		}
	}
	os.MkdirAll("/tmp", 0o1777)
	return nil
}

// params holds the vhostdm.* kernel command line parameters.
type params map[string]string

func readParams() params {
	p := params{}
	b, _ := os.ReadFile("/proc/cmdline")
	for _, f := range strings.Fields(string(b)) {
		k, v, _ := strings.Cut(f, "=")
		if name, ok := strings.CutPrefix(k, proto.ParamPrefix); ok {
			p[name] = v
		}
	}
	return p
}

func (p params) str(k, def string) string {
	if v, ok := p[k]; ok {
		return v
	}
	return def
}

func (p params) int(k string, def int64) int64 {
	if v, ok := p[k]; ok {
		if n, err := strconv.ParseInt(v, 0, 64); err == nil {
			return n
		}
		logf("bad parameter %s%s=%q, using %d", proto.ParamPrefix, k, v, def)
	}
	return def
}

func (p params) uint(k string, def uint64) uint64 {
	if v, ok := p[k]; ok {
		if n, err := strconv.ParseUint(v, 0, 64); err == nil {
			return n
		}
		logf("bad parameter %s%s=%q, using %d", proto.ParamPrefix, k, v, def)
	}
	return def
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// loadModules loads the wanted modules and their dependencies, in the order
// of /lib/modules/<release>/modules.dep. Modules already loaded or built in
// are fine.
func loadModules(wanted string) error {
	dir := filepath.Join("/lib/modules", kernelRelease())
	dep, err := os.Open(filepath.Join(dir, "modules.dep"))
	if err != nil {
		return fmt.Errorf("no modules for kernel %s in the initramfs: %w", kernelRelease(), err)
	}
	defer dep.Close()
	var builtin *os.File
	if f, err := os.Open(filepath.Join(dir, "modules.builtin")); err == nil {
		builtin = f
		defer f.Close()
	}
	var d *kmod.Deps
	if builtin != nil {
		d, err = kmod.Parse(dep, builtin)
	} else {
		d, err = kmod.Parse(dep, nil)
	}
	if err != nil {
		return err
	}
	order, err := d.Order(splitList(wanted))
	if err != nil {
		return err
	}
	for _, rel := range order {
		if err := loadModule(filepath.Join(dir, rel)); err != nil {
			return err
		}
	}
	return nil
}

// moduleInitCompressedFile is finit_module's MODULE_INIT_COMPRESSED_FILE:
// the kernel decompresses the file itself (kernels with MODULE_DECOMPRESS).
const moduleInitCompressedFile = 4

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("load module: %w", err)
	}
	defer f.Close()
	flags := 0
	if !strings.HasSuffix(path, ".ko") {
		flags = moduleInitCompressedFile
	}
	err = unix.FinitModule(int(f.Fd()), "", flags)
	if err == unix.EEXIST {
		return nil
	}
	if err != nil {
		return fmt.Errorf("finit_module %s: %w", path, err)
	}
	return nil
}

// waitDisks waits until at least n virtio disks exist with their /dev
// nodes, and returns their names in order.
func waitDisks(n int, timeout time.Duration) ([]string, error) {
	deadline := time.Now().Add(timeout)
	for {
		var ds []string
		ents, _ := os.ReadDir("/sys/block")
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), "vd") {
				if _, err := os.Stat("/dev/" + e.Name()); err == nil {
					ds = append(ds, e.Name())
				}
			}
		}
		sort.Slice(ds, func(i, j int) bool {
			if len(ds[i]) != len(ds[j]) {
				return len(ds[i]) < len(ds[j])
			}
			return ds[i] < ds[j]
		})
		if len(ds) >= n {
			return ds, nil
		}
		if time.Now().After(deadline) {
			return ds, fmt.Errorf("found %d virtio disks %v after %v, want %d: is the back end serving and the vhost-user-blk-pci device attached?", len(ds), ds, timeout, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func uptimeMS() int64 {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	s, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return int64(s * 1000)
}

// runShell runs busybox's shell on the console for interactive use.
func runShell(disks []string) {
	logf("virtio disks: %v; starting /bin/sh (exit to power off)", disks)
	if _, err := os.Stat("/bin/sh"); err != nil {
		logf("no /bin/sh in the initramfs (the harness adds busybox for interactive runs): %v", err)
		return
	}
	os.Setenv("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
	os.Setenv("HOME", "/")
	os.Setenv("TERM", "linux")
	attr := &os.ProcAttr{
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		Sys:   &unix.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0},
	}
	tty, err := os.OpenFile("/dev/ttyS0", os.O_RDWR, 0)
	if err == nil {
		attr.Files = []*os.File{tty, tty, tty}
	}
	proc, err := os.StartProcess("/bin/sh", []string{"-sh"}, attr)
	if err != nil {
		logf("start shell: %v", err)
		return
	}
	proc.Wait()
}

// readLines returns the lines of a small file, or nil.
func readLines(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if t := strings.TrimSpace(sc.Text()); t != "" {
			out = append(out, t)
		}
	}
	return out
}
