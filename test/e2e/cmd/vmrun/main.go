// Command vmrun is the Go half of examples/run-vm.sh: it prepares a
// vhostdm configuration's images and socket directories, and boots a QEMU
// guest with every export of the configuration attached, either with an
// interactive shell or running a guest workload of the e2e suite.
//
//	vmrun prepare -c CONFIG                  create missing sparse images and socket directories
//	vmrun qemu -c CONFIG [-test STEPS] [-cpus N] [-seed N] [-param k=v]...
//	vmrun cmdline -c CONFIG [-test STEPS]    print the QEMU command line
//
// STEPS are guest steps of package test/e2e/internal/proto, comma-separated,
// each optionally "@vdX": info, verify, readverify, flush, discard, zeroes,
// readonly, writer, writercheck, resize, fio, sleep. The exit status of
// "qemu -test" is 0 when every step passed, 1 when one failed and 2 when
// the guest could not run.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage:
  vmrun prepare -c CONFIG
  vmrun qemu    -c CONFIG [-test STEPS] [-cpus N] [-seed N] [-timeout D] [-param key=value]...
  vmrun cmdline -c CONFIG [-test STEPS] [-cpus N]`)
}

// paramList collects -param key=value flags.
type paramList map[string]string

// String implements flag.Value.
func (p paramList) String() string { return fmt.Sprint(map[string]string(p)) }

// Set implements flag.Value.
func (p paramList) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want key=value, got %q", s)
	}
	p[strings.TrimPrefix(k, proto.ParamPrefix)] = v
	return nil
}

func run(args []string) int {
	if len(args) == 0 {
		usage()
		return 2
	}
	cmd := args[0]
	fs := flag.NewFlagSet("vmrun "+cmd, flag.ContinueOnError)
	config := fs.String("c", "", "vhostdm configuration (TOML)")
	test := fs.String("test", "", "guest steps to run (default: interactive shell)")
	cpus := fs.Int("cpus", 0, "guest CPUs (default: the largest num-queues of the exports)")
	seed := fs.Uint64("seed", uint64(time.Now().UnixNano()%1000000), "seed of the guest's patterns")
	timeout := fs.Duration("timeout", 10*time.Minute, "bound on a -test run")
	params := paramList{}
	fs.Var(params, "param", "extra guest parameter key=value (repeatable), see package proto")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	if *config == "" {
		fmt.Fprintln(os.Stderr, "vmrun: -c CONFIG is required")
		usage()
		return 2
	}
	cfg, err := harness.LoadConfig(*config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmrun:", err)
		return 2
	}
	switch cmd {
	case "prepare":
		return prepare(cfg)
	case "qemu", "cmdline":
	default:
		usage()
		return 2
	}
	env, err := harness.FindEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmrun:", err)
		return 2
	}
	vc := harness.VMConfig{CPUs: *cpus, Params: map[string]string{proto.ParamSeed: fmt.Sprint(*seed)}}
	for _, x := range cfg.Exports {
		vc.Disks = append(vc.Disks, harness.Disk{Socket: cfg.Path(x.Socket), NumQueues: max(x.NumQueues, 1)})
		if *cpus == 0 {
			vc.CPUs = max(vc.CPUs, x.NumQueues)
		}
	}
	for k, v := range params {
		vc.Params[k] = v
	}
	if *test != "" {
		vc.Steps = strings.Split(*test, ",")
		vc.Fio = strings.Contains(*test, proto.StepFio)
	} else {
		vc.Interactive = true
	}
	if cmd == "cmdline" {
		var extra []harness.Part
		if vc.Fio {
			extra = append(extra, harness.PartFio)
		}
		if vc.Interactive {
			extra = append(extra, harness.PartBusybox)
		}
		initrd, err := env.Initrd(extra...)
		if err != nil {
			fmt.Fprintln(os.Stderr, "vmrun:", err)
			return 2
		}
		// The initrd lives in a directory removed at exit: keep a copy.
		keep := filepath.Join(os.TempDir(), "vhostdm-vmrun-"+filepath.Base(initrd))
		if b, err := os.ReadFile(initrd); err == nil {
			os.WriteFile(keep, b, 0o644)
		}
		fmt.Println(env.QEMU + " " + quote(env.QEMUArgs(vc, keep)))
		harness.Cleanup()
		return 0
	}
	defer harness.Cleanup()
	if err := waitSockets(cfg, 30*time.Second); err != nil {
		fmt.Fprintln(os.Stderr, "vmrun:", err)
		return 2
	}
	if vc.Interactive {
		fmt.Fprintf(os.Stderr, "vmrun: booting; the guest's disks are vda.. in export order; exit the shell to power off (or Ctrl-A x)\n")
	} else {
		vc.Console = os.Stdout
	}
	vm, err := env.StartVM(vc)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmrun:", err)
		return 2
	}
	if vc.Interactive {
		<-vm.Exited()
		return 0
	}
	res, err := vm.Wait(*timeout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmrun:", err)
		return 2
	}
	fmt.Printf("\nvmrun: boot %v, wall %v\n", res.BootTime.Round(time.Millisecond), res.Wall.Round(time.Millisecond))
	for _, r := range res.Results {
		status := "ok"
		if !r.OK {
			status = "FAILED: " + r.Error
		}
		fmt.Printf("vmrun: step %-11s %-4s %6d ms %s\n", r.Step, r.Disk, r.MS, status)
	}
	if f := res.Failed(); f != "" {
		return 1
	}
	return 0
}

// prepare creates the configuration's missing images (sparse) and the
// directories of its sockets, and removes stale sockets nobody listens on.
func prepare(cfg *harness.Config) int {
	made, err := cfg.CreateImages()
	for _, m := range made {
		fmt.Printf("vmrun: created sparse image %s\n", m)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmrun: create images:", err)
		return 1
	}
	socks := []string{cfg.QMP.Socket}
	for _, x := range cfg.Exports {
		socks = append(socks, x.Socket)
	}
	for _, s := range socks {
		if s == "" {
			continue
		}
		s = cfg.Path(s)
		if err := os.MkdirAll(filepath.Dir(s), 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "vmrun:", err)
			return 1
		}
		if fi, err := os.Stat(s); err == nil && fi.Mode()&os.ModeSocket != 0 {
			c, err := net.DialTimeout("unix", s, time.Second)
			if err == nil {
				c.Close()
				fmt.Fprintf(os.Stderr, "vmrun: %s is in use by another process\n", s)
				return 1
			}
			if errors.Is(err, syscall.ECONNREFUSED) {
				os.Remove(s)
			}
		}
	}
	return 0
}

// waitSockets waits until every export socket exists.
func waitSockets(cfg *harness.Config, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, x := range cfg.Exports {
		s := cfg.Path(x.Socket)
		for {
			if fi, err := os.Stat(s); err == nil && fi.Mode()&os.ModeSocket != 0 {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("export %s: no socket %s after %v: is `vhostdm serve -c ...` running?", x.ID, s, timeout)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

func quote(args []string) string {
	var q []string
	for _, a := range args {
		if strings.ContainsAny(a, " ,='\"") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q = append(q, a)
	}
	return strings.Join(q, " ")
}
