package harness

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vhostdm/vhostdm/internal/procstat"
)

// Process is a back-end daemon (vhostdm serve or qemu-storage-daemon).
type Process struct {
	Name    string
	Path    string
	Args    []string
	Sockets []string // vhost-user sockets it serves: ready when all exist

	cmd     *exec.Cmd
	mu      sync.Mutex
	log     bytes.Buffer // stdout and stderr of every incarnation
	exited  chan struct{}
	exitErr error
}

// lockedWriter appends to a buffer under the process's mutex.
type lockedWriter struct{ p *Process }

// Write implements io.Writer.
func (w lockedWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.p.log.Write(b)
}

// StartProcess starts a back end and waits until every socket in sockets
// has been (re)created, at most timeout.
func StartProcess(name, path string, args, sockets []string, timeout time.Duration) (*Process, error) {
	p := &Process{Name: name, Path: path, Args: args, Sockets: sockets}
	return p, p.Start(timeout)
}

// Start starts (or restarts) the process and waits for its sockets.
func (p *Process) Start(timeout time.Duration) error {
	// A restart must create new sockets; inode numbers are reused at once
	// on some file systems, so the change time tells them apart too.
	old := map[string]sockID{}
	for _, s := range p.Sockets {
		if id, ok := socketID(s); ok {
			old[s] = id
		}
	}
	cmd := exec.Command(p.Path, p.Args...)
	cmd.Stdout, cmd.Stderr = lockedWriter{p}, lockedWriter{p}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(lockedWriter{p}, "=== harness: start %s %s\n", p.Path, strings.Join(p.Args, " "))
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	exited := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.exited, p.exitErr = cmd, exited, nil
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.exitErr = err
		p.mu.Unlock()
		fmt.Fprintf(lockedWriter{p}, "=== harness: %s exited: %v\n", p.Name, err)
		close(exited)
	}()
	deadline := time.Now().Add(timeout)
	for {
		ready := true
		for _, s := range p.Sockets {
			id, ok := socketID(s)
			if prev, had := old[s]; !ok || (had && prev == id) {
				ready = false
				break
			}
		}
		if ready {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s exited before serving %v: %v\n%s", p.Name, p.Sockets, p.ExitErr(), p.Log())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Kill()
			return fmt.Errorf("%s did not create %v within %v (killed)\n%s", p.Name, p.Sockets, timeout, p.Log())
		}
	}
}

// sockID identifies one incarnation of a socket file.
type sockID struct {
	dev, ino uint64
	ctime    syscall.Timespec
}

// socketID returns the identity of path if it is a socket.
func socketID(path string) (sockID, bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFSOCK {
		return sockID{}, false
	}
	return sockID{dev: st.Dev, ino: st.Ino, ctime: st.Ctim}, true
}

// Alive reports whether the current incarnation is running.
func (p *Process) Alive() bool {
	p.mu.Lock()
	ch := p.exited
	p.mu.Unlock()
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return false
	default:
		return true
	}
}

// ExitErr returns how the current incarnation exited.
func (p *Process) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitErr
}

// Kill sends SIGKILL and waits for the exit.
func (p *Process) Kill() { p.signal(syscall.SIGKILL, 10*time.Second) }

// Stop sends SIGTERM, waits up to 10 s, then kills.
func (p *Process) Stop() {
	if !p.signal(syscall.SIGTERM, 10*time.Second) {
		p.Kill()
	}
}

func (p *Process) signal(sig syscall.Signal, wait time.Duration) bool {
	p.mu.Lock()
	cmd, ch := p.cmd, p.exited
	p.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return true
	}
	cmd.Process.Signal(sig)
	select {
	case <-ch:
		return true
	case <-time.After(wait):
		return false
	}
}

// Log returns what the process printed, all incarnations.
func (p *Process) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// QSDExport is one vhost-user-blk export of qemu-storage-daemon over a raw
// image file.
type QSDExport struct {
	ID        string
	Image     string
	Socket    string
	NumQueues int
	Writable  bool
	// LogicalBlockSize, if non-zero, is passed to the export.
	LogicalBlockSize int
	// AIO is the file driver's aio mode ("threads", "io_uring", "native");
	// empty leaves QEMU's default (threads). A comparison of speed or CPU
	// uses QSD's best buffered mode, "io_uring".
	AIO string
}

// StartQSD starts qemu-storage-daemon with the exports and, if qmpSocket is
// not empty, a QMP monitor there. Discards unmap (punch holes), as
// vhostdm's file backend does.
func (e *Env) StartQSD(exports []QSDExport, qmpSocket string) (*Process, error) {
	var args, socks []string
	for i, x := range exports {
		node := fmt.Sprintf("f%d", i)
		ro := ""
		if !x.Writable {
			ro = ",read-only=on"
		}
		aio := ""
		if x.AIO != "" {
			aio = ",aio=" + x.AIO
		}
		args = append(args, "--blockdev",
			fmt.Sprintf("driver=file,node-name=%s,filename=%s,discard=unmap%s%s", node, x.Image, ro, aio))
		exp := fmt.Sprintf("type=vhost-user-blk,id=%s,node-name=%s,addr.type=unix,addr.path=%s,writable=%s,num-queues=%d",
			x.ID, node, x.Socket, onOff(x.Writable), max(x.NumQueues, 1))
		if x.LogicalBlockSize > 0 {
			exp += fmt.Sprintf(",logical-block-size=%d", x.LogicalBlockSize)
		}
		args = append(args, "--export", exp)
		socks = append(socks, x.Socket)
	}
	if qmpSocket != "" {
		args = append(args, "--chardev", "socket,id=qmp0,path="+qmpSocket+",server=on,wait=off",
			"--monitor", "chardev=qmp0")
	}
	return StartProcess("qemu-storage-daemon", e.QSD, args, socks, 15*time.Second)
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// ReferenceBackendEnv names the environment variable that, set to "qsd",
// makes StartVhostdm serve the configuration with qemu-storage-daemon
// instead (tables of one linear line only). It tells a failing e2e test's
// own mistakes from vhostdm's: what fails on the reference back end too is
// the test's (or QSD lacks the feature, e.g. a configurable serial).
const ReferenceBackendEnv = "VHOSTDM_E2E_BACKEND"

// StartVhostdm builds vhostdm (once per process) and starts
// `vhostdm serve -c config`, waiting for the export sockets the config
// names.
func (e *Env) StartVhostdm(config string) (*Process, error) {
	cfg, err := LoadConfig(config)
	if err != nil {
		return nil, err
	}
	if os.Getenv(ReferenceBackendEnv) == "qsd" {
		return e.startQSDForConfig(cfg)
	}
	bin, err := e.Vhostdm()
	if err != nil {
		return nil, err
	}
	var socks []string
	for _, x := range cfg.Exports {
		socks = append(socks, x.Socket)
	}
	p, err := StartProcess("vhostdm", bin, []string{"serve", "-c", config}, socks, 15*time.Second)
	if err != nil {
		return p, fmt.Errorf("vhostdm serve -c %s: %w", config, err)
	}
	return p, nil
}

// startQSDForConfig serves a configuration whose devices are single linear
// lines over files with qemu-storage-daemon (raw driver with offset and
// size), as the reference back end.
func (e *Env) startQSDForConfig(cfg *Config) (*Process, error) {
	var args, socks []string
	for i, x := range cfg.Exports {
		d, err := cfg.Device(x.Device)
		if err != nil {
			return nil, err
		}
		segs, err := ParseTable(d.Table)
		if err != nil {
			return nil, err
		}
		if len(segs) != 1 || segs[0].Target != "linear" || len(segs[0].Args) != 2 {
			return nil, fmt.Errorf("%s=qsd serves only devices of one linear line; device %s has %q", ReferenceBackendEnv, d.Name, d.Table)
		}
		off, err := strconv.ParseInt(segs[0].Args[1], 10, 64)
		if err != nil {
			return nil, err
		}
		ro := ""
		if !x.Writable {
			ro = ",read-only=on"
		}
		args = append(args,
			"--blockdev", fmt.Sprintf("driver=file,node-name=f%d,filename=%s,discard=unmap%s", i, cfg.Path(segs[0].Args[0]), ro),
			"--blockdev", fmt.Sprintf("driver=raw,node-name=r%d,file=f%d,offset=%d,size=%d,discard=unmap%s", i, i, off*512, segs[0].Len*512, ro),
			"--export", fmt.Sprintf("type=vhost-user-blk,id=%s,node-name=r%d,addr.type=unix,addr.path=%s,writable=%s,num-queues=%d",
				x.ID, i, cfg.Path(x.Socket), onOff(x.Writable), max(x.NumQueues, 1)))
		socks = append(socks, cfg.Path(x.Socket))
	}
	return StartProcess("qemu-storage-daemon (reference for vhostdm)", e.QSD, args, socks, 15*time.Second)
}

// Pid returns the process id of the current incarnation, or 0.
func (p *Process) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// CPUTime returns the host CPU time (user plus system) the current
// incarnation has used so far, all its threads together (those that have
// exited included, and io_uring's io-wq workers, which are threads of the
// process), from /proc/PID/stat, in 10 ms ticks.
func (p *Process) CPUTime() (time.Duration, error) {
	pid := p.Pid()
	if pid == 0 {
		return 0, fmt.Errorf("%s is not running", p.Name)
	}
	return procstat.CPUTime(pid)
}

// LoadAvg returns the host's 1-, 5- and 15-minute load averages from
// /proc/loadavg.
func LoadAvg() ([3]float64, error) {
	var l [3]float64
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return l, fmt.Errorf("load average: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return l, fmt.Errorf("load average: malformed %q", b)
	}
	for i := range l {
		if l[i], err = strconv.ParseFloat(f[i], 64); err != nil {
			return l, fmt.Errorf("load average: %w", err)
		}
	}
	return l, nil
}
