package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestMain runs the hub's main when re-executed as the test's child hub
// process (REPAGENT_HUB_CHILD set): the test kills that process with
// SIGKILL, as an operator's crash would.
func TestMain(m *testing.M) {
	if os.Getenv("REPAGENT_HUB_CHILD") != "" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// hubProc is a repagent-hub serve child process.
type hubProc struct {
	t     *testing.T
	cmd   *exec.Cmd
	store string
	qmp   string
	addr  string
	log   *os.File
}

func startHubProc(t *testing.T, dir, addr string, n int, extra ...string) *hubProc {
	t.Helper()
	p := &hubProc{t: t, store: filepath.Join(dir, "store"), qmp: filepath.Join(dir, fmt.Sprintf("hub%d.qmp", n)), addr: addr}
	lf, err := os.Create(filepath.Join(dir, fmt.Sprintf("hub%d.log", n)))
	if err != nil {
		t.Fatal(err)
	}
	p.log = lf
	t.Cleanup(func() {
		// A failed test shows what the hub said (a panic, a store error).
		if t.Failed() {
			if b, err := os.ReadFile(lf.Name()); err == nil {
				t.Logf("%s:\n%s", filepath.Base(lf.Name()), tail(b, 64<<10))
			}
		}
	})
	args := append([]string{"serve", "--listen", addr, "--store", p.store, "--qmp", p.qmp, "--retain", "0"}, extra...)
	p.cmd = exec.Command(os.Args[0], args...)
	p.cmd.Env = append(os.Environ(), "REPAGENT_HUB_CHILD=1")
	p.cmd.Stdout, p.cmd.Stderr = lf, lf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", p.qmp); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hub child never served QMP")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return p
}

// tail is the last n bytes of b.
func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// kill sends SIGKILL and reaps the process.
func (p *hubProc) kill() {
	p.cmd.Process.Kill()
	p.cmd.Wait()
	p.log.Close()
}

func (p *hubProc) status() ([]hub.VMStatus, error) {
	mon, err := dialQMP(p.qmp)
	if err != nil {
		return nil, err
	}
	defer mon.Close()
	return queryRepagent(mon)
}

// proxy forwards TCP connections to a target and can cut them and refuse
// new ones, and throttle the agent-to-hub direction.
type proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	down   bool
	rate   atomic.Int64 // bytes per second agent → hub; 0 unlimited
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	t.Cleanup(func() { ln.Close(); p.cut() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			down := p.down
			p.mu.Unlock()
			if down {
				c.Close()
				continue
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			go p.pipe(u, c, true)
			go p.pipe(c, u, false)
		}
	}()
	return p
}

func (p *proxy) pipe(dst, src net.Conn, throttle bool) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if r := p.rate.Load(); throttle && r > 0 {
				time.Sleep(time.Duration(int64(n) * int64(time.Second) / r))
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *proxy) cut() {
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
	p.mu.Unlock()
}

func (p *proxy) setDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
	if down {
		p.cut()
	}
}

// history is the write order of one writer over several volumes: each
// sector written holds (write index, volume, sector) in its first bytes,
// so an image tells which write last wrote each sector.
type history struct {
	gate   sync.Mutex // held around each write; a test holds it to pause the writer
	mu     sync.Mutex
	writes []histWrite // index i+1 is writes[i]
}

type histWrite struct {
	vol           int
	sector, count uint64
}

func sectorData(idx uint64, vol int, sector uint64) []byte {
	b := make([]byte, 512)
	binary.LittleEndian.PutUint64(b[0:], idx)
	binary.LittleEndian.PutUint64(b[8:], uint64(vol))
	binary.LittleEndian.PutUint64(b[16:], sector)
	copy(b[24:], reptest.Pattern(idx<<24|sector, 488))
	return b
}

// len returns the number of writes so far.
func (h *history) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.writes)
}

// prefixOf returns k when imgs (one per volume) are the state after the
// first k writes of h, or an error naming the first sector that no
// prefix explains.
func (h *history) prefixOf(imgs [][]byte) (int, error) {
	h.mu.Lock()
	ws := append([]histWrite(nil), h.writes...)
	h.mu.Unlock()
	k := uint64(0)
	for _, img := range imgs {
		for off := 0; off+512 <= len(img); off += 512 {
			if idx := binary.LittleEndian.Uint64(img[off:]); idx > k {
				k = idx
			}
		}
	}
	if k > uint64(len(ws)) {
		return 0, fmt.Errorf("an image holds write %d of only %d", k, len(ws))
	}
	last := make([][]uint64, len(imgs))
	for i, img := range imgs {
		last[i] = make([]uint64, len(img)/512)
	}
	for i := uint64(0); i < k; i++ {
		w := ws[i]
		for s := w.sector; s < w.sector+w.count; s++ {
			last[w.vol][s] = i + 1
		}
	}
	zero := make([]byte, 512)
	for v, img := range imgs {
		for s := range last[v] {
			want := zero
			if idx := last[v][s]; idx != 0 {
				want = sectorData(idx, v, uint64(s))
			}
			if !bytes.Equal(img[s*512:(s+1)*512], want) {
				return 0, fmt.Errorf("volume %d sector %d holds write %d; after the first %d writes it holds write %d",
					v, s, binary.LittleEndian.Uint64(img[s*512:]), k, last[v][s])
			}
		}
	}
	return int(k), nil
}

// writer writes to vols in turn, one write at a time (so completion
// order is the agent's write order), recording the history.
func (h *history) writer(ctx context.Context, t *testing.T, vols []*reptest.Vol, pause time.Duration) {
	rng := rand.New(rand.NewPCG(1, 2))
	for ctx.Err() == nil {
		time.Sleep(pause)
		h.gate.Lock() // held around the write: a test takes it to freeze the history
		vi := rng.IntN(len(vols))
		v := vols[vi]
		sectors := uint64(v.Size / 512)
		n := uint64(8 * (1 + rng.IntN(4)))
		s := uint64(rng.IntN(int(sectors/8))) * 8
		n = min(n, sectors-s)
		h.mu.Lock()
		idx := uint64(len(h.writes) + 1)
		h.mu.Unlock()
		data := make([]byte, 0, n*512)
		for i := uint64(0); i < n; i++ {
			data = append(data, sectorData(idx, vi, s+i)...)
		}
		wctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := v.Client.WriteAt(wctx, 0, data, s)
		cancel()
		if err != nil {
			h.gate.Unlock()
			t.Errorf("%s: guest write: %v", v.Name, err)
			return
		}
		h.mu.Lock()
		h.writes = append(h.writes, histWrite{vol: vi, sector: s, count: n})
		h.mu.Unlock()
		h.gate.Unlock()
	}
}

func readImages(t *testing.T, paths []string) [][]byte {
	t.Helper()
	var out [][]byte
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// recoverCLI runs `repagent-hub recover` against the hub's QMP.
func recoverCLI(t *testing.T, args ...string) Recovered {
	t.Helper()
	var out, errb bytes.Buffer
	if code := run(append([]string{"recover"}, args...), &out, &errb); code != 0 {
		t.Fatalf("recover %v: exit %d: %s", args, code, errb.String())
	}
	var r Recovered
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("recover output %q: %v", out.String(), err)
	}
	return r
}

// TestHubKillAndLinkCut: an agent writes to 3 volumes through a cuttable
// TCP proxy to a repagent-hub child process. The hub is killed with
// SIGKILL three times under the writes and restarted, then the link is cut
// for 10 s. While the resync after the cut runs (slowed by the proxy), the
// last consistent point is recovered with `repagent-hub recover` and must be
// a prefix of the writer's history; after quiesce the replicas equal the
// sources byte for byte.
func TestHubKillAndLinkCut(t *testing.T) {
	dir := t.TempDir()
	hubAddr := freeAddr(t)
	hp := startHubProc(t, dir, hubAddr, 0)
	defer func() { hp.kill() }()
	px := newProxy(t, hubAddr)

	r := reptest.New(t)
	r.Addr = px.ln.Addr().String()
	vols := []*reptest.Vol{r.AddVolume("root", 4<<20), r.AddVolume("data", 4<<20), r.AddVolume("logs", 2<<20)}
	r.StartAgent(reptest.ProtectAll(vols...))
	dirtyMapped := func() uint64 { return dirtyMappedBytes(r) }
	agentRemote := func() uint64 { return remoteReadBytes(r) }
	waitProtected := func(why string) {
		t.Helper()
		waitHubProtected(t, hp, r, len(vols), 60*time.Second, why)
	}
	waitProtected("initial sync")

	var h history
	stop := startWriter(t, &h, vols, 2*time.Millisecond)
	defer stop()

	for i := 1; i <= 3; i++ {
		time.Sleep(400 * time.Millisecond)
		hp.kill()
		time.Sleep(100 * time.Millisecond)
		before, dirtyBefore := agentRemote(), dirtyMapped()
		hp = startHubProc(t, dir, hubAddr, i)
		waitProtected(fmt.Sprintf("after hub kill %d", i))
		t.Logf("hub kill -9 #%d: resync moved %d bytes (agent's dirty map: %d bytes of regions); %d writes so far",
			i, agentRemote()-before, dirtyMapped()-dirtyBefore, h.len())
	}

	// A 10 s link cut; the resync after it is slowed to 2 MiB/s so that
	// it is still running when its last consistent point is recovered.
	st, _ := hp.status()
	pointBefore := st[0].Journal.ConsistentSeq
	px.setDown(true)
	time.Sleep(10 * time.Second)
	// The age of the consistent point kept growing while the link was
	// down: it does not reset on disconnect.
	if st, err := hp.status(); err != nil || len(st) != 1 || st[0].Connected || st[0].Journal == nil || st[0].Journal.ConsistentAge < 9 {
		t.Errorf("after a 10 s link cut: %+v %v, want disconnected with a consistent point at least 9 s old", st, err)
	} else {
		t.Logf("after a 10 s link cut the consistent point is %.1f s old", st[0].Journal.ConsistentAge)
	}
	px.rate.Store(2 << 20)
	before, dirtyBefore := agentRemote(), dirtyMapped()
	px.setDown(false)
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := hp.status()
		if err == nil && len(st) == 1 && st[0].Journal != nil && st[0].Journal.Resyncing && st[0].Connected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no resync after the link cut: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	out := filepath.Join(dir, "mid-resync")
	rec := recoverCLI(t, "--qmp", hp.qmp, "--vm", "vm1", "--out", out)
	st, _ = hp.status()
	if !st[0].Journal.Resyncing {
		t.Logf("the resync completed while recovering (the point is still one before it)")
	}
	if rec.Seq < pointBefore {
		t.Errorf("recovered point seq %d is older than the consistent point %d before the cut", rec.Seq, pointBefore)
	}
	var paths []string
	for _, v := range vols {
		paths = append(paths, filepath.Join(out, v.Name+".img"))
	}
	k, err := h.prefixOf(readImages(t, paths))
	if err != nil {
		t.Fatalf("the point recovered mid-resync is not a prefix of the write order: %v", err)
	}
	t.Logf("recovered mid-resync (seq %d): the first %d of %d writes", rec.Seq, k, h.len())
	if _, err := os.Stat(rec.Config); err != nil {
		t.Errorf("no vhostdm configuration: %v", err)
	}
	px.rate.Store(0)

	stop()
	waitProtected("after the link cut")
	moved, planned := agentRemote()-before, dirtyMapped()-dirtyBefore
	t.Logf("link cut of 10 s: resync moved %d bytes for %d bytes of dirty regions; %d writes in all", moved, planned, h.len())
	// Writes into a region being read are journaled after its read:
	// no region is read twice in a pass.
	if moved > planned {
		t.Errorf("the resync read %d bytes for %d bytes of dirty regions: regions were read again", moved, planned)
	}
	// Quiesced: the applier brings the replicas to the sources.
	deadline = time.Now().Add(30 * time.Second)
	for {
		var bad []string
		for _, v := range vols {
			if err := reptest.SameFiles(v.Backing, filepath.Join(hp.store, "vm1", v.Name+".img"), v.Size); err != nil {
				bad = append(bad, v.Name+": "+err.Error())
			}
		}
		if len(bad) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replicas differ from the sources after quiesce: %s", strings.Join(bad, "; "))
		}
		time.Sleep(100 * time.Millisecond)
	}
	var src []string
	for _, v := range vols {
		src = append(src, v.Backing)
	}
	if k, err := h.prefixOf(readImages(t, src)); err != nil || k != h.len() {
		t.Errorf("the sources are not the whole history: %d of %d, %v", k, h.len(), err)
	}

	// Promote: the newest point becomes the sources; the agent is
	// refused from then on.
	pout := filepath.Join(dir, "promoted")
	var pstdout, pstderr bytes.Buffer
	if code := run([]string{"promote", "--qmp", hp.qmp, "--vm", "vm1", "--out", pout}, &pstdout, &pstderr); code != 0 {
		t.Fatalf("promote: %s", pstderr.String())
	}
	var ppaths []string
	for _, v := range vols {
		ppaths = append(ppaths, filepath.Join(pout, v.Name+".img"))
	}
	if k, err := h.prefixOf(readImages(t, ppaths)); err != nil || k != h.len() {
		t.Errorf("promoted volumes hold %d of %d writes: %v", k, h.len(), err)
	}
	time.Sleep(500 * time.Millisecond) // the agent retries meanwhile
	if st, err := hp.status(); err != nil || len(st) != 1 || !st[0].Promoted || st[0].Connected {
		t.Errorf("after promote: %+v %v", st, err)
	}
}
