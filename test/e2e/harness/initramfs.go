package harness

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"

	"github.com/vhostdm/vhostdm/test/e2e/internal/kmod"
)

// GuestModules are the modules the guest loads, with their dependencies
// from modules.dep.
var GuestModules = []string{"virtio_pci", "virtio_blk"}

// Part is a piece of the initramfs. The kernel unpacks concatenated gzip
// cpio archives in order, so a guest's initrd is the base part followed by
// the optional ones it needs; each part is built once per process.
type Part string

// Initramfs parts.
const (
	PartBase    Part = "base"    // /init (guestinit), the virtio modules, /dev/console
	PartFio     Part = "fio"     // fio and its shared libraries (large: only for fio runs)
	PartBusybox Part = "busybox" // busybox and its applet links, for interactive shells
)

var parts struct {
	mu    sync.Mutex
	files map[string]string // key: parts joined by "+"
}

// Initrd returns the path of an initrd made of the base part and the
// given extra parts, building what is missing.
func (e *Env) Initrd(extra ...Part) (string, error) {
	list := append([]Part{PartBase}, extra...)
	var names []string
	for _, p := range list {
		names = append(names, string(p))
	}
	key := strings.Join(names, "+")
	parts.mu.Lock()
	defer parts.mu.Unlock()
	if parts.files == nil {
		parts.files = map[string]string{}
	}
	if f, ok := parts.files[key]; ok {
		return f, nil
	}
	dir, err := WorkDir()
	if err != nil {
		return "", err
	}
	var all []byte
	for _, p := range list {
		f := filepath.Join(dir, "part-"+string(p)+".cpio.gz")
		if _, ok := parts.files[string(p)]; !ok {
			if err := e.buildPart(p, f); err != nil {
				return "", fmt.Errorf("initramfs part %s: %w", p, err)
			}
			parts.files[string(p)] = f
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		all = append(all, b...)
	}
	out := filepath.Join(dir, "initrd-"+key+".img")
	if err := os.WriteFile(out, all, 0o644); err != nil {
		return "", err
	}
	parts.files[key] = out
	return out, nil
}

func (e *Env) buildPart(p Part, out string) error {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	if err != nil {
		return err
	}
	c := newCpio(zw)
	switch p {
	case PartBase:
		err = e.addBase(c)
	case PartFio:
		err = e.addFio(c)
	case PartBusybox:
		err = e.addBusybox(c)
	default:
		err = fmt.Errorf("unknown part")
	}
	if err != nil {
		return err
	}
	if err := c.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return os.WriteFile(out, buf.Bytes(), 0o644)
}

func (e *Env) addBase(c *cpioWriter) error {
	init, err := e.GoBuild("./test/e2e/guestinit", "guestinit", true)
	if err != nil {
		return fmt.Errorf("build the guest's /init: %w", err)
	}
	b, err := os.ReadFile(init)
	if err != nil {
		return err
	}
	for _, d := range []string{"dev", "proc", "sys", "tmp", "etc/vhostdm", "bin", "sbin", "usr/bin"} {
		c.Dir(d, 0o755)
	}
	c.CharDev("dev/console", 0o600, 5, 1)
	c.CharDev("dev/null", 0o666, 1, 3)
	c.File("init", 0o755, b)

	dep, err := os.Open(filepath.Join(e.ModulesDir, "modules.dep"))
	if err != nil {
		return fmt.Errorf("%w (install linux-image-amd64: %s)", err, SetupHint)
	}
	defer dep.Close()
	var d *kmod.Deps
	if bi, err := os.Open(filepath.Join(e.ModulesDir, "modules.builtin")); err == nil {
		defer bi.Close()
		d, err = kmod.Parse(dep, bi)
		if err != nil {
			return err
		}
	} else if d, err = kmod.Parse(dep, nil); err != nil {
		return err
	}
	order, err := d.Order(GuestModules)
	if err != nil {
		return fmt.Errorf("kernel %s: %w", e.KernelRelease, err)
	}
	mdir := "lib/modules/" + e.KernelRelease
	for _, rel := range order {
		b, err := os.ReadFile(filepath.Join(e.ModulesDir, rel))
		if err != nil {
			return err
		}
		c.File(mdir+"/"+rel, 0o644, b)
	}
	c.File(mdir+"/modules.dep", 0o644, []byte(d.Lines(order)))
	if b, err := os.ReadFile(filepath.Join(e.ModulesDir, "modules.builtin")); err == nil {
		c.File(mdir+"/modules.builtin", 0o644, b)
	}
	return nil
}

// lddPathRE finds the absolute paths in ldd's output.
var lddPathRE = regexp.MustCompile(`(?m)(?:=>\s*|^\s*)(/\S+)\s+\(0x`)

func (e *Env) addFio(c *cpioWriter) error {
	if e.Fio == "" {
		return fmt.Errorf("fio not found in PATH: %s", SetupHint)
	}
	libs, err := sharedLibs(e.Fio)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(e.Fio)
	if err != nil {
		return err
	}
	c.File("usr/bin/fio", 0o755, b)
	dirs := map[string]bool{}
	for _, l := range libs {
		b, err := os.ReadFile(l) // follows symlinks: the file lands under the name ldd printed
		if err != nil {
			return err
		}
		c.File(l, 0o755, b)
		dirs[filepath.Dir(l)] = true
	}
	var ds []string
	for d := range dirs {
		ds = append(ds, d)
	}
	sort.Strings(ds)
	c.File("etc/vhostdm/fio-ld-path", 0o644, []byte(strings.Join(ds, "\n")+"\n"))
	return nil
}

// sharedLibs lists the shared libraries (and the dynamic loader) a binary
// needs, as ldd prints them.
func sharedLibs(bin string) ([]string, error) {
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %v", bin, err)
	}
	var libs []string
	for _, m := range lddPathRE.FindAllStringSubmatch(string(out), -1) {
		libs = append(libs, m[1])
	}
	if len(libs) == 0 {
		return nil, fmt.Errorf("ldd %s: no libraries in %q", bin, out)
	}
	return libs, nil
}

func (e *Env) addBusybox(c *cpioWriter) error {
	if e.Busybox == "" {
		return fmt.Errorf("busybox not found in PATH: %s", SetupHint)
	}
	b, err := os.ReadFile(e.Busybox)
	if err != nil {
		return err
	}
	if bytes.Contains(b[:min(len(b), 4096)], []byte("ld-linux")) {
		return fmt.Errorf("%s is dynamically linked: install busybox-static (%s)", e.Busybox, SetupHint)
	}
	c.File("bin/busybox", 0o755, b)
	out, err := exec.Command(e.Busybox, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		a := strings.TrimSpace(sc.Text())
		if a == "" || a == "busybox" || a == "init" || strings.Contains(a, "/") {
			continue
		}
		c.Symlink("bin/"+a, "busybox")
	}
	return nil
}
