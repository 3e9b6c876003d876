package vhost

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// The isolation tests (issue 21) attack one export of a real `vhostdm
// serve` child process with a hostile front end and check after each
// attack that the daemon is alive, that a second export serves a verified
// read/write run, and that SIGTERM stops the daemon within 5 s with exit
// status 0.

// daemonBin is the vhostdm binary, built once per test process.
var daemonBin struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func buildDaemon(t *testing.T) string {
	t.Helper()
	daemonBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "vhostdm-isolation-")
		if err != nil {
			daemonBin.err = err
			return
		}
		daemonBin.dir = dir
		daemonBin.path = filepath.Join(dir, "vhostdm")
		cmd := exec.Command("go", "build", "-o", daemonBin.path, "github.com/vhostdm/vhostdm/cmd/vhostdm")
		if b, err := cmd.CombinedOutput(); err != nil {
			daemonBin.err = fmt.Errorf("go build cmd/vhostdm: %v\n%s", err, b)
		}
	})
	if daemonBin.err != nil {
		t.Fatal(daemonBin.err)
	}
	return daemonBin.path
}

// daemon is a running `vhostdm serve` with two exports: "hostile" (attacked)
// and "healthy" (checked after each attack).
type daemon struct {
	t       *testing.T
	dir     string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error
	hostile string // socket paths
	healthy string
	round   int
}

const isolationDiskSectors = 16384 // 8 MiB

func startDaemon(t *testing.T) *daemon { t.Helper(); return startDaemonWith(t, "") }

// startDaemonWith starts the daemon with extra TOML appended to its
// configuration.
func startDaemonWith(t *testing.T, extra string) *daemon {
	t.Helper()
	bin := buildDaemon(t)
	// Socket paths must fit in sun_path: a short directory of our own.
	dir, err := os.MkdirTemp("", "vdi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, n := range []string{"hostile.img", "healthy.img"} {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(filepath.Join(dir, n), isolationDiskSectors*512); err != nil {
			t.Fatal(err)
		}
	}
	cfg := fmt.Sprintf(`
[[device]]
name = "hostile"
table = "0 %[1]d linear hostile.img 0"

[[device]]
name = "healthy"
table = "0 %[1]d linear healthy.img 0"

[[export]]
id = "hostile"
device = "hostile"
socket = "hostile.sock"
writable = true
negotiation-timeout = "1s"

[[export]]
id = "healthy"
device = "healthy"
socket = "healthy.sock"
writable = true
num-queues = 2
`, isolationDiskSectors) + extra
	cfgPath := filepath.Join(dir, "vm.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, dir: dir, logPath: filepath.Join(dir, "daemon.log"), exited: make(chan struct{}),
		hostile: filepath.Join(dir, "hostile.sock"), healthy: filepath.Join(dir, "healthy.sock")}
	logf, err := os.Create(d.logPath)
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command(bin, "serve", "-c", cfgPath)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	go func() {
		d.waitErr = d.cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			d.cmd.Process.Kill()
			<-d.exited
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.log())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for _, s := range []string{d.hostile, d.healthy} {
		for {
			if _, err := os.Stat(s); err == nil {
				break
			}
			d.alive()
			if time.Now().After(deadline) {
				t.Fatalf("daemon did not create %s", s)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return d
}

func (d *daemon) log() string {
	b, _ := os.ReadFile(d.logPath)
	return string(b)
}

// alive fails the test if the daemon exited.
func (d *daemon) alive() {
	d.t.Helper()
	select {
	case <-d.exited:
		d.t.Fatalf("daemon exited: %v\n%s", d.waitErr, d.log())
	default:
	}
}

// logLen returns the length of the log so far, for waitLogAfter.
func (d *daemon) logLen() int { return len(d.log()) }

// waitLog waits for a log line containing s.
func (d *daemon) waitLog(s string) { d.t.Helper(); d.waitLogAfter(0, s) }

// waitLogAfter waits for s in the log after its first off bytes.
func (d *daemon) waitLogAfter(off int, s string) {
	d.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for l := d.log(); len(l) < off || !strings.Contains(l[off:], s); l = d.log() {
		if time.Now().After(deadline) {
			d.t.Fatalf("daemon never logged %q", s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkHealthy asserts that the daemon is alive and that the healthy export
// serves a verified read/write run on both its queues.
func (d *daemon) checkHealthy() {
	d.t.Helper()
	d.alive()
	d.round++
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := frontend.Dial(ctx, frontend.Config{Socket: d.healthy, NumQueues: 2, MemSize: 4 << 20})
	if err != nil {
		d.t.Fatalf("healthy export: %v", err)
	}
	defer c.Close()
	for i := range 8 {
		want := pattern(uint64(d.round*100+i), 16<<10)
		sector := uint64(i * 997 % (isolationDiskSectors - 32))
		if err := c.WriteAt(ctx, i%2, want, sector); err != nil {
			d.t.Fatalf("healthy export: write: %v", err)
		}
		got := make([]byte, len(want))
		if err := c.ReadAt(ctx, (i+1)%2, got, sector); err != nil {
			d.t.Fatalf("healthy export: read: %v", err)
		}
		if !bytes.Equal(got, want) {
			d.t.Fatalf("healthy export: data read back differs at sector %d", sector)
		}
	}
	if err := c.Flush(ctx, 0); err != nil {
		d.t.Fatalf("healthy export: flush: %v", err)
	}
}

// stop sends SIGTERM and asserts a clean exit within 5 s.
func (d *daemon) stop() {
	d.t.Helper()
	d.alive()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		d.t.Fatal(err)
	}
	select {
	case <-d.exited:
	case <-time.After(5 * time.Second):
		d.cmd.Process.Signal(syscall.SIGQUIT) // goroutine dump into the log
		time.Sleep(500 * time.Millisecond)
		d.t.Fatalf("daemon did not stop within 5 s of SIGTERM")
	}
	if d.waitErr != nil {
		d.t.Fatalf("daemon exit: %v", d.waitErr)
	}
}

// rss returns the daemon's resident set size in bytes.
func (d *daemon) rss() uint64 {
	d.t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if err != nil {
		d.t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			return kb << 10
		}
	}
	d.t.Fatal("no VmRSS")
	return 0
}

// hregion is a memfd region of the hostile front end's guest memory.
type hregion struct {
	fd   int
	mem  []byte
	gpa  uint64
	size uint64
}

func newHRegion(t *testing.T, gpa, size uint64) *hregion {
	t.Helper()
	fd, err := unix.MemfdCreate("hostile", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	r := &hregion{fd: fd, mem: m, gpa: gpa, size: size}
	t.Cleanup(func() {
		unix.Munmap(r.mem)
		unix.Close(r.fd)
	})
	return r
}

func (r *hregion) desc() wire.MemRegion {
	return wire.MemRegion{GPA: r.gpa, Size: r.size, UserAddr: hostileUser + r.gpa}
}

// truncate shrinks the memfd to 0; the test must not touch r.mem after.
func (r *hregion) truncate(t *testing.T) {
	t.Helper()
	if err := unix.Ftruncate(r.fd, 0); err != nil {
		t.Fatal(err)
	}
}

// hostileUser is the front-end user address of guest address 0.
const hostileUser = 0x7f0000000000

// hostileFE is a hand-driven vhost-user front end.
type hostileFE struct {
	t      *testing.T
	rc     *frontend.RawConn
	closed bool
}

func dialHostile(t *testing.T, socket string) *hostileFE {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rc, err := frontend.DialRaw(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close() })
	return &hostileFE{t: t, rc: rc}
}

// call sends a request with NEED_REPLY (REPLY_ACK must be negotiated, or
// the request must have a reply) and returns the reply payload; closed is
// true if the back end closed the connection instead.
func (h *hostileFE) call(code wire.ReqCode, pl wire.Payload, fds []int) (reply []byte, closed bool) {
	h.t.Helper()
	p := pl.AppendTo(nil)
	msg := append(wire.Header{Code: code, Flags: wire.FlagVersion | wire.FlagNeedReply, Size: uint32(len(p))}.AppendTo(nil), p...)
	if err := h.rc.Send(msg, fds); err != nil {
		h.closed = true
		return nil, true
	}
	_, rp, rfds, err := h.rc.Recv(10 * time.Second)
	wire.CloseFDs(rfds)
	if errors.Is(err, io.EOF) || isReset(err) {
		h.closed = true
		return nil, true
	}
	if err != nil {
		h.t.Fatalf("%s: %v", code, err)
	}
	return rp, false
}

// must sends a request that has to succeed.
func (h *hostileFE) must(code wire.ReqCode, pl wire.Payload, fds []int) []byte {
	h.t.Helper()
	rp, closed := h.call(code, pl, fds)
	if closed {
		h.t.Fatalf("%s: back end closed the connection", code)
	}
	if code != wire.ReqGetFeatures && code != wire.ReqGetProtocolFeatures && code != wire.ReqSetLogBase && code != wire.ReqGetVringBase &&
		(len(rp) != 8 || le.Uint64(rp) != 0) {
		h.t.Fatalf("%s: failed (reply %x)", code, rp)
	}
	return rp
}

// refused sends a request that the back end must refuse: with an error
// reply or by closing the connection.
func (h *hostileFE) refused(code wire.ReqCode, pl wire.Payload, fds []int) {
	h.t.Helper()
	rp, closed := h.call(code, pl, fds)
	if !closed && len(rp) == 8 && le.Uint64(rp) == 0 {
		h.t.Fatalf("%s: accepted", code)
	}
}

// waitClosed waits for the back end to close the connection.
func (h *hostileFE) waitClosed(within time.Duration) {
	h.t.Helper()
	if h.closed {
		return
	}
	_, _, fds, err := h.rc.Recv(within)
	wire.CloseFDs(fds)
	if !errors.Is(err, io.EOF) && !isReset(err) {
		h.t.Fatalf("connection not closed by the back end: %v", err)
	}
	h.closed = true
}

// negotiate does the handshake with the given extra virtio and protocol
// features (REPLY_ACK is always on).
func (h *hostileFE) negotiate(features, protocol uint64) {
	h.t.Helper()
	h.must(wire.ReqGetFeatures, wire.NoPayload{}, nil)
	// SET_PROTOCOL_FEATURES has no reply before REPLY_ACK is on.
	p := wire.U64(protocol | wire.ProtocolReplyAck).AppendTo(nil)
	if err := h.rc.Send(append(wire.Header{Code: wire.ReqSetProtocolFeatures, Flags: wire.FlagVersion, Size: 8}.AppendTo(nil), p...), nil); err != nil {
		h.t.Fatal(err)
	}
	h.must(wire.ReqSetOwner, wire.NoPayload{}, nil)
	h.must(wire.ReqSetFeatures, wire.U64(virtio.FeatureVersion1|virtio.FeatureProtocolFeatures|features), nil)
}

func (h *hostileFE) memTable(regs ...*hregion) {
	h.t.Helper()
	var t wire.MemTable
	var fds []int
	for _, r := range regs {
		t.Regions = append(t.Regions, r.desc())
		fds = append(fds, r.fd)
	}
	h.must(wire.ReqSetMemTable, t, fds)
}

// hring is the driver side of one split ring whose parts lie in hostile
// regions.
type hring struct {
	num          uint16
	desc, avail  []byte
	used         []byte
	dGPA, aGPA   uint64
	uGPA         uint64
	call, kick   int
	availIdx     uint16
	usedInRegion *hregion
}

// newRing lays out a ring of num entries: descriptors and avail ring at
// off in region a, the used ring at uoff in region u.
func newRing(t *testing.T, num uint16, a *hregion, off uint64, u *hregion, uoff uint64) *hring {
	t.Helper()
	dn, an, un := virtio.RingSizes(int(num))
	r := &hring{num: num, dGPA: a.gpa + off, aGPA: a.gpa + off + alignUp(uint64(dn), 4096), uGPA: u.gpa + uoff, usedInRegion: u}
	r.desc = a.mem[off : off+uint64(dn)]
	ao := off + alignUp(uint64(dn), 4096)
	r.avail = a.mem[ao : ao+uint64(an)]
	r.used = u.mem[uoff : uoff+uint64(un)]
	var err error
	if r.call, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	if r.kick, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Close(r.call)
		unix.Close(r.kick)
	})
	return r
}

// ringEnd returns the first offset after a ring laid out at off.
func ringEnd(num uint16, off uint64) uint64 {
	dn, an, _ := virtio.RingSizes(int(num))
	return off + alignUp(uint64(dn), 4096) + alignUp(uint64(an), 4096)
}

// setup sends the vring messages of queue 0; enable false leaves the ring
// disabled.
func (h *hostileFE) setup(r *hring, enable bool) {
	h.t.Helper()
	h.must(wire.ReqSetVringCall, wire.VringFD{Index: 0}, []int{r.call})
	h.must(wire.ReqSetVringNum, wire.VringState{Index: 0, Num: uint32(r.num)}, nil)
	h.must(wire.ReqSetVringBase, wire.VringState{Index: 0, Num: 0}, nil)
	h.must(wire.ReqSetVringAddr, wire.VringAddr{Index: 0, Desc: hostileUser + r.dGPA, Avail: hostileUser + r.aGPA, Used: hostileUser + r.uGPA}, nil)
	h.must(wire.ReqSetVringKick, wire.VringFD{Index: 0}, []int{r.kick})
	if enable {
		h.must(wire.ReqSetVringEnable, wire.VringState{Index: 0, Num: 1}, nil)
	}
}

// push makes head available (no kick).
func (r *hring) push(head uint16) {
	le.PutUint16(r.avail[4+2*int(r.availIdx%r.num):], head)
	r.availIdx++
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&r.avail[0])), uint32(r.availIdx)<<16)
}

func (r *hring) doKick() {
	unix.Write(r.kick, le.AppendUint64(nil, 1))
}

func (r *hring) usedIdx() uint16 {
	return uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&r.used[0]))) >> 16)
}

// request writes a 3-descriptor virtio-blk request at head (header at hdr,
// data of n bytes at data, status at st; all guest addresses).
func (r *hring) request(head uint16, hdr, data uint64, n uint32, st uint64, dataWritable bool) {
	f := uint16(virtio.DescFlagNext)
	if dataWritable {
		f |= virtio.DescFlagWrite
	}
	virtio.WriteDesc(r.desc[int(head)*16:], virtio.Desc{Addr: hdr, Len: 16, Flags: virtio.DescFlagNext, Next: head + 1})
	virtio.WriteDesc(r.desc[int(head+1)*16:], virtio.Desc{Addr: data, Len: n, Flags: f, Next: head + 2})
	virtio.WriteDesc(r.desc[int(head+2)*16:], virtio.Desc{Addr: st, Len: 1, Flags: virtio.DescFlagWrite})
}

func putHeader(b []byte, typ uint32, sector uint64) {
	le.PutUint32(b, typ)
	le.PutUint32(b[4:], 0)
	le.PutUint64(b[8:], sector)
}

// TestIsolationShortMemory is finding 1: memory shorter than declared is
// refused when mapped; memory truncated after it was mapped faults on the
// connection goroutine (queue start) or the ring goroutine (first pop), and
// either fault disconnects that front end alone; an inflight fd that is not
// sealed against shrinking is refused.
func TestIsolationShortMemory(t *testing.T) {
	d := startDaemon(t)
	d.checkHealthy()

	t.Run("region shorter than declared", func(t *testing.T) {
		h := dialHostile(t, d.hostile)
		h.negotiate(0, 0)
		r := newHRegion(t, 0, 1<<20)
		if err := unix.Ftruncate(r.fd, 64<<10); err != nil {
			t.Fatal(err)
		}
		h.refused(wire.ReqSetMemTable, wire.MemTable{Regions: []wire.MemRegion{r.desc()}}, []int{r.fd})
		d.waitLog("shorter than offset")
		d.checkHealthy()
	})
	for _, tc := range []struct {
		name   string
		before wire.ReqCode // truncate before this message
	}{{"truncated before queue start", wire.ReqSetVringKick}, {"truncated before ring enable", wire.ReqSetVringEnable}} {
		t.Run(tc.name, func(t *testing.T) {
			off := d.logLen()
			h := dialHostile(t, d.hostile)
			h.negotiate(0, 0)
			a := newHRegion(t, 0, 1<<20)
			h.memTable(a)
			ring := newRing(t, 16, a, 0, a, ringEnd(16, 0))
			buf := ringEnd(16, 0) + 4096
			putHeader(a.mem[buf:], virtio.BlkTypeIn, 0)
			ring.request(0, buf, buf+4096, 4096, buf+64, true)
			ring.push(0)
			h.must(wire.ReqSetVringCall, wire.VringFD{Index: 0}, []int{ring.call})
			h.must(wire.ReqSetVringNum, wire.VringState{Index: 0, Num: 16}, nil)
			h.must(wire.ReqSetVringBase, wire.VringState{Index: 0, Num: 0}, nil)
			h.must(wire.ReqSetVringAddr, wire.VringAddr{Index: 0, Desc: hostileUser + ring.dGPA, Avail: hostileUser + ring.aGPA, Used: hostileUser + ring.uGPA}, nil)
			if tc.before == wire.ReqSetVringKick {
				a.truncate(t)
				h.refused(wire.ReqSetVringKick, wire.VringFD{Index: 0}, []int{ring.kick})
			} else {
				h.must(wire.ReqSetVringKick, wire.VringFD{Index: 0}, []int{ring.kick})
				a.truncate(t)
				h.call(wire.ReqSetVringEnable, wire.VringState{Index: 0, Num: 1}, nil)
				ring.doKick()
			}
			h.waitClosed(10 * time.Second)
			d.waitLogAfter(off, "fault on memory the front end shares")
			d.checkHealthy()
		})
	}
	t.Run("unsealed inflight fd", func(t *testing.T) {
		h := dialHostile(t, d.hostile)
		h.negotiate(0, wire.ProtocolInflightSHMFD)
		a := newHRegion(t, 0, 1<<20)
		h.memTable(a)
		h.refused(wire.ReqSetInflightFD, wire.InflightDesc{MmapSize: inflightQueueBytes(16), NumQueues: 1, QueueSize: 16}, []int{a.fd})
		d.waitLog("not sealed against shrinking")
		d.checkHealthy()
	})
	d.stop()
}

// TestIsolationFaultInCompletion is finding 2: a request whose status byte
// (and data) lie in memory the front end truncated faults when it
// completes; so does marking a dirty log truncated after it was mapped. The
// recovery does not touch that memory again: the front end is disconnected
// and the daemon lives. A log shorter than declared is refused.
func TestIsolationFaultInCompletion(t *testing.T) {
	d := startDaemon(t)
	t.Run("status in truncated memory", func(t *testing.T) {
		h := dialHostile(t, d.hostile)
		h.negotiate(0, 0)
		a := newHRegion(t, 0, 1<<20)
		b := newHRegion(t, 1<<30, 1<<20)
		h.memTable(a, b)
		ring := newRing(t, 16, a, 0, a, ringEnd(16, 0))
		h.setup(ring, true)
		hdr := ringEnd(16, 0) + 4096
		putHeader(a.mem[hdr:], virtio.BlkTypeOut, 0)
		ring.request(0, hdr, b.gpa, 4096, b.gpa+8192, false)
		b.truncate(t)
		off := d.logLen()
		ring.push(0)
		ring.doKick()
		h.waitClosed(10 * time.Second)
		d.waitLogAfter(off, "fault on memory the front end shares")
		d.checkHealthy()
	})
	t.Run("dirty log truncated", func(t *testing.T) {
		h := dialHostile(t, d.hostile)
		h.negotiate(virtio.FeatureLogAll, wire.ProtocolLogSHMFD)
		a := newHRegion(t, 0, 1<<20)
		h.memTable(a)
		ring := newRing(t, 16, a, 0, a, ringEnd(16, 0))
		h.setup(ring, true)
		lg := newHRegion(t, 0, 4096)
		short := newHRegion(t, 0, 4096)
		h.refused(wire.ReqSetLogBase, wire.LogDesc{Size: 8192}, []int{short.fd})
		d.waitLog("log of 8192 bytes at 0")
		if rp := h.must(wire.ReqSetLogBase, wire.LogDesc{Size: 4096}, []int{lg.fd}); len(rp) != 8 || le.Uint64(rp) != 0 {
			t.Fatalf("SET_LOG_BASE: %x", rp)
		}
		lg.truncate(t)
		hdr := ringEnd(16, 0) + 4096
		putHeader(a.mem[hdr:], virtio.BlkTypeIn, 0)
		ring.request(0, hdr, hdr+4096, 4096, hdr+64, true)
		off := d.logLen()
		ring.push(0)
		ring.doKick()
		h.waitClosed(10 * time.Second)
		d.waitLogAfter(off, "fault on memory the front end shares")
		d.checkHealthy()
	})
	d.stop()
}

// TestIsolationFaultUnderUsedLock is finding 3: the used ring lies in
// memory truncated while the queue runs, so completions fault while the
// queue's used lock is held. The lock is released, the connection tears
// down (GET_VRING_BASE would be answered; the export serves the next front
// end), and SIGTERM still stops the daemon.
func TestIsolationFaultUnderUsedLock(t *testing.T) {
	d := startDaemon(t)
	h := dialHostile(t, d.hostile)
	h.negotiate(0, 0)
	a := newHRegion(t, 0, 1<<20)
	u := newHRegion(t, 1<<30, 1<<16)
	h.memTable(a, u)
	ring := newRing(t, 16, a, 0, u, 0)
	h.setup(ring, true)
	hdr := ringEnd(16, 0) + 4096
	for i := uint16(0); i < 5; i++ {
		o := hdr + uint64(i)*8192
		putHeader(a.mem[o:], virtio.BlkTypeIn, uint64(i)*8)
		ring.request(3*i, o, o+4096, 4096, o+64, true)
	}
	u.truncate(t)
	for i := uint16(0); i < 5; i++ {
		ring.push(3 * i)
	}
	ring.doKick()
	h.waitClosed(10 * time.Second)
	d.waitLog("fault on memory the front end shares")
	d.checkHealthy()
	// The hostile export is free again and serves a well-behaved front end.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := frontend.Dial(ctx, frontend.Config{Socket: d.hostile, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, 0, pattern(5, 4096), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	d.stop()
}

// TestIsolationNotEventfd is finding 4: a call, error or kick fd that is
// not an eventfd is refused; an eventfd whose counter is full does not
// block completions, SET_VRING_CALL, or shutdown.
func TestIsolationNotEventfd(t *testing.T) {
	d := startDaemon(t)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	// Fill the pipe: a blocking writer would never return.
	unix.SetNonblock(p[1], true)
	for {
		if _, err := unix.Write(p[1], make([]byte, 4096)); err != nil {
			break
		}
	}
	for _, code := range []wire.ReqCode{wire.ReqSetVringCall, wire.ReqSetVringErr, wire.ReqSetVringKick} {
		t.Run(code.String(), func(t *testing.T) {
			h := dialHostile(t, d.hostile)
			h.negotiate(0, 0)
			h.refused(code, wire.VringFD{Index: 0}, []int{p[1]})
			d.waitLog("not an eventfd")
			d.checkHealthy()
		})
	}
	t.Run("kick fd made blocking", func(t *testing.T) {
		// O_NONBLOCK belongs to the file description the front end
		// shares: cleared, a plain read of the kick fd would block in
		// the kernel where no stop request reaches it.
		h := dialHostile(t, d.hostile)
		h.negotiate(0, 0)
		a := newHRegion(t, 0, 1<<20)
		h.memTable(a)
		ring := newRing(t, 16, a, 0, a, ringEnd(16, 0))
		h.setup(ring, true)
		if err := unix.SetNonblock(ring.kick, false); err != nil {
			t.Fatal(err)
		}
		ring.doKick()
		time.Sleep(200 * time.Millisecond)
		done := make(chan struct{})
		go func() {
			defer close(done)
			h.must(wire.ReqGetVringBase, wire.VringState{Index: 0}, nil)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("GET_VRING_BASE not answered: the queue is stuck reading its kick fd")
		}
		d.checkHealthy()
	})
	t.Run("full eventfd", func(t *testing.T) {
		h := dialHostile(t, d.hostile)
		h.negotiate(0, 0)
		a := newHRegion(t, 0, 1<<20)
		h.memTable(a)
		ring := newRing(t, 16, a, 0, a, ringEnd(16, 0))
		full := func() int {
			fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { unix.Close(fd) })
			if _, err := unix.Write(fd, le.AppendUint64(nil, 0xfffffffffffffffe)); err != nil {
				t.Fatal(err)
			}
			return fd
		}
		ring.call = full()
		h.setup(ring, true)
		h.must(wire.ReqSetVringErr, wire.VringFD{Index: 0}, []int{full()})
		hdr := ringEnd(16, 0) + 4096
		putHeader(a.mem[hdr:], virtio.BlkTypeIn, 0)
		ring.request(0, hdr, hdr+4096, 4096, hdr+64, true)
		ring.push(0)
		ring.doKick()
		deadline := time.Now().Add(10 * time.Second)
		for ring.usedIdx() != 1 {
			if time.Now().After(deadline) {
				t.Fatal("request not completed with a full call eventfd")
			}
			time.Sleep(10 * time.Millisecond)
		}
		// Replacing the call fd signals the new one: full too.
		h.must(wire.ReqSetVringCall, wire.VringFD{Index: 0}, []int{full()})
		d.checkHealthy()
		// The daemon stops with this front end still connected.
	})
	d.stop()
}

// TestIsolationAmplification is finding 5: 32768 ring entries each naming
// a 1024-descriptor indirect table. The daemon's memory stays within the
// documented per-queue bound (docs/REFERENCE.md, "Limits") while the
// attack runs and is released after the front end disconnects.
func TestIsolationAmplification(t *testing.T) {
	d := startDaemon(t)
	d.checkHealthy()
	base := d.rss()
	const num = virtio.MaxQueueSize
	h := dialHostile(t, d.hostile)
	h.negotiate(virtio.FeatureIndirectDesc, 0)
	a := newHRegion(t, 0, 2<<20)
	h.memTable(a)
	ring := newRing(t, num, a, 0, a, ringEnd(num, 0))
	_, _, un := virtio.RingSizes(num)
	tab := alignUp(ringEnd(num, 0)+uint64(un), 4096)
	hdr, data, st := tab+maxSegments*16, tab+maxSegments*16+4096, tab+maxSegments*16+64
	// A request of an unknown type: the back end walks the whole chain
	// (1024 segments), then answers UNSUPP without I/O.
	putHeader(a.mem[hdr:], 99, 0)
	virtio.WriteDesc(a.mem[tab:], virtio.Desc{Addr: hdr, Len: 16, Flags: virtio.DescFlagNext, Next: 1})
	for i := 1; i < maxSegments-1; i++ {
		virtio.WriteDesc(a.mem[tab+uint64(i)*16:], virtio.Desc{Addr: data, Len: 512, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: uint16(i + 1)})
	}
	virtio.WriteDesc(a.mem[tab+(maxSegments-1)*16:], virtio.Desc{Addr: st, Len: 1, Flags: virtio.DescFlagWrite})
	for i := range num {
		virtio.WriteDesc(ring.desc[i*16:], virtio.Desc{Addr: tab, Len: maxSegments * 16, Flags: virtio.DescFlagIndirect})
	}
	h.setup(ring, true)
	for i := range num {
		ring.push(uint16(i))
	}
	ring.doKick()
	var peak uint64
	deadline := time.Now().Add(3 * time.Minute)
	for ring.usedIdx() != uint16(num) {
		d.alive()
		peak = max(peak, d.rss())
		if time.Now().After(deadline) {
			t.Fatalf("attack requests not completed: used index %d", ring.usedIdx())
		}
		time.Sleep(50 * time.Millisecond)
	}
	peak = max(peak, d.rss())
	if a.mem[st] != virtio.BlkStatusUnsupp {
		t.Fatalf("status %d, want UNSUPP", a.mem[st])
	}
	// The documented bound: 216 B per ring entry plus 256 chain buffers of
	// at most 64 KiB per queue; twice that for the Go heap's collection
	// slack.
	bound := 2 * (num*216 + maxChainBufs*(64<<10+304))
	t.Logf("RSS before %d MiB, peak during the attack %d MiB (bound +%d MiB)", base>>20, peak>>20, bound>>20)
	if peak > base+uint64(bound) {
		t.Fatalf("RSS rose from %d to %d MiB under the attack, beyond the bound of +%d MiB", base>>20, peak>>20, bound>>20)
	}
	off := d.logLen()
	h.rc.Close()
	d.waitLogAfter(off, "front end disconnected")
	deadline = time.Now().Add(20 * time.Second)
	after := d.rss()
	for after > base+8<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("RSS %d MiB after the disconnect, was %d MiB before the attack", after>>20, base>>20)
		}
		time.Sleep(200 * time.Millisecond)
		after = d.rss()
	}
	t.Logf("RSS after the disconnect %d MiB", after>>20)
	d.checkHealthy()
	d.stop()
}

// TestIsolationOneFrontEnd is finding 6: a connection that does not
// negotiate is closed after the export's negotiation timeout (1 s here); a
// second front end is refused, with a log line, while one is served; the
// export serves the next one after the first leaves.
func TestIsolationOneFrontEnd(t *testing.T) {
	d := startDaemon(t)
	t.Run("idle connection", func(t *testing.T) {
		h := dialHostile(t, d.hostile)
		start := time.Now()
		h.waitClosed(10 * time.Second)
		if el := time.Since(start); el > 5*time.Second {
			t.Fatalf("idle connection closed after %v, want about 1 s", el)
		}
		d.waitLog("negotiation not completed")
		d.checkHealthy()
	})
	t.Run("half a message", func(t *testing.T) {
		h := dialHostile(t, d.hostile)
		h.negotiate(0, 0)
		// A header announcing 8 payload bytes that never come.
		if err := h.rc.Send(wire.Header{Code: wire.ReqSetFeatures, Flags: wire.FlagVersion, Size: 8}.AppendTo(nil), nil); err != nil {
			t.Fatal(err)
		}
		h.waitClosed(10 * time.Second)
		d.checkHealthy()
	})
	t.Run("second front end", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		first, err := frontend.Dial(ctx, frontend.Config{Socket: d.hostile, MemSize: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		second := dialHostile(t, d.hostile)
		second.waitClosed(10 * time.Second)
		d.waitLog("refusing a second front end")
		want := pattern(77, 8192)
		if err := first.WriteAt(ctx, 0, want, 64); err != nil {
			t.Fatal(err)
		}
		first.Close()
		third, err := frontend.Dial(ctx, frontend.Config{Socket: d.hostile, MemSize: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		if err := third.ReadAt(ctx, 0, got, 64); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("next front end: %v", err)
		}
		third.Close()
		d.checkHealthy()
	})
	d.stop()
}
