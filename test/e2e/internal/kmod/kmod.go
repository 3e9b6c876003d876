// Package kmod reads a kernel's modules.dep and modules.builtin and orders
// the modules to load for a set of wanted modules, dependencies first, as
// modprobe does. The host uses it to pick the files for the initramfs and
// the guest to load them.
package kmod

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"strings"
)

// Name returns the module name of a module path:
// "kernel/drivers/virtio/virtio_pci.ko.xz" -> "virtio_pci". Dashes become
// underscores, as the kernel treats them as the same.
func Name(p string) string {
	b := path.Base(p)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

// Deps is a parsed modules.dep: module path -> direct and indirect
// dependencies in the order the file lists them.
type Deps struct {
	paths map[string]string   // name -> path
	deps  map[string][]string // path -> dependency paths
	// Builtin holds names of modules built into the kernel.
	Builtin map[string]bool
}

// Parse reads modules.dep and, if builtin is not nil, modules.builtin.
func Parse(dep, builtin io.Reader) (*Deps, error) {
	d := &Deps{paths: map[string]string{}, deps: map[string][]string{}, Builtin: map[string]bool{}}
	sc := bufio.NewScanner(dep)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		t := strings.TrimSpace(sc.Text())
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		mod, rest, ok := strings.Cut(t, ":")
		if !ok {
			return nil, fmt.Errorf("modules.dep line %d: no colon", line)
		}
		d.paths[Name(mod)] = mod
		d.deps[mod] = strings.Fields(rest)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("modules.dep: %w", err)
	}
	if builtin != nil {
		sc := bufio.NewScanner(builtin)
		for sc.Scan() {
			if t := strings.TrimSpace(sc.Text()); t != "" {
				d.Builtin[Name(t)] = true
			}
		}
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("modules.builtin: %w", err)
		}
	}
	return d, nil
}

// Order returns the module paths (relative to /lib/modules/<version>) to
// load for the wanted module names, every module after its dependencies,
// each once. Built-in modules are left out; a name that is neither built in
// nor in modules.dep is an error.
func (d *Deps) Order(wanted []string) ([]string, error) {
	var out []string
	done := map[string]bool{}
	var visit func(p string, depth int) error
	visit = func(p string, depth int) error {
		if done[p] {
			return nil
		}
		if depth > 64 {
			return fmt.Errorf("dependency loop at %s", p)
		}
		deps := d.deps[p]
		// modprobe loads the list from its end: the last entry has no
		// dependencies among the others.
		for i := len(deps) - 1; i >= 0; i-- {
			if err := visit(deps[i], depth+1); err != nil {
				return err
			}
		}
		if !done[p] {
			done[p] = true
			out = append(out, p)
		}
		return nil
	}
	for _, w := range wanted {
		n := Name(w)
		p, ok := d.paths[n]
		if !ok {
			if d.Builtin[n] {
				continue
			}
			return nil, fmt.Errorf("module %s is neither in modules.dep nor built in", w)
		}
		if err := visit(p, 0); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Lines returns the modules.dep lines of the given module paths, to write
// a trimmed modules.dep into an initramfs.
func (d *Deps) Lines(paths []string) string {
	var b strings.Builder
	for _, p := range paths {
		b.WriteString(p)
		b.WriteString(":")
		for _, q := range d.deps[p] {
			b.WriteString(" ")
			b.WriteString(q)
		}
		b.WriteString("\n")
	}
	return b.String()
}
