// Package reptest is the test rig of the repagent packages and the hub's
// command: a hub and an agent on loopback with volumes exported over
// vhost-user and driven by in-process guests, and an in-process
// certificate authority. Only tests import it.
package reptest

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
	_ "github.com/vhostdm/vhostdm/targets" // linear, for the volumes
	"github.com/vhostdm/vhostdm/vhost"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// Logger logs to stderr when REPAGENT_TEST_LOG is set, nowhere otherwise.
func Logger() *slog.Logger {
	if os.Getenv("REPAGENT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// Rig is a hub and an agent (VM "vm1") on loopback with volumes exported
// over vhost-user and driven by vhost clients (the guests). Tests may
// change HubCfg and AgentCfg before starting the hub and the agent.
type Rig struct {
	T        testing.TB
	Dir      string // the test's directory: backing files, sockets, the hub's store
	HubCfg   hub.Config
	Hub      *hub.Hub // the running hub, nil after KillHub
	Addr     string   // the hub's address (a fresh port the first time)
	AgentCfg agent.Config
	Agent    *agent.Agent // the running agent
	M        *mapper.Manager
	Vols     []*Vol

	hubDone chan error
	runDone chan error
	mu      sync.Mutex
	conns   []net.Conn // agent-side connections, for cutting the link
	block   bool       // refuse to dial (link down)
}

// Vol is one exported volume and its guest.
type Vol struct {
	Name    string
	Backing string // the source's backing file
	Size    int64
	Dev     *mapper.Device
	Wrapped agent.Device     // Dev as the agent wraps it
	Exp     *vhost.Export    // the export of Wrapped
	Client  *frontend.Client // the guest
	expDone chan error

	Mu    sync.Mutex // guards Model
	Model []byte     // what the guest wrote
}

// New returns a rig whose hub and agent are not started yet; everything
// stops when the test ends.
func New(t testing.TB) *Rig {
	t.Helper()
	r := &Rig{T: t, Dir: t.TempDir()}
	r.HubCfg = hub.Config{Store: filepath.Join(r.Dir, "store"), Logger: Logger(), Heartbeat: 100 * time.Millisecond, Name: "hub"}
	r.AgentCfg = agent.Config{VM: "vm1", UUID: "6c1d7d0e-3b1f-4d2a-9a51-0c5f2d1e7a10", Logger: Logger(),
		Heartbeat: 50 * time.Millisecond, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		DrainTimeout: 20 * time.Second}
	r.M = mapper.NewManager(mapper.ManagerOptions{Logger: Logger()})
	t.Cleanup(func() {
		for _, v := range r.Vols {
			if v.Client != nil {
				v.Client.Close()
			}
			if v.Exp != nil {
				v.Exp.Close()
				<-v.expDone
			}
		}
		if r.Agent != nil {
			r.Agent.Abort()
		}
		if r.Hub != nil {
			r.Hub.Close()
		}
		r.M.Close()
	})
	return r
}

// StartHub starts (or restarts) the hub on r.Addr (a fresh port the
// first time).
func (r *Rig) StartHub() {
	r.T.Helper()
	h, err := hub.New(r.HubCfg)
	if err != nil {
		r.T.Fatal(err)
	}
	addr := r.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	for i := 0; ; i++ {
		ln, err = h.Listen(addr, false)
		if err == nil || i > 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		r.T.Fatal(err)
	}
	r.mu.Lock()
	r.Addr = ln.Addr().String()
	r.mu.Unlock()
	r.Hub = h
	r.hubDone = make(chan error, 1)
	go func() { r.hubDone <- h.Serve(context.Background(), ln) }()
}

// KillHub stops the hub as a crash would: no last checkpoint.
func (r *Rig) KillHub() {
	r.Hub.Abort()
	<-r.hubDone
	r.Hub = nil
}

// AddVolume creates a file-backed device of size bytes; StartAgent
// attaches and exports it and connects its guest.
func (r *Rig) AddVolume(name string, size int64) *Vol {
	r.T.Helper()
	v := &Vol{Name: name, Size: size, Backing: filepath.Join(r.Dir, name+".img"), Model: make([]byte, size)}
	f, err := os.Create(v.Backing)
	if err != nil {
		r.T.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	v.Dev, err = r.M.CreateTable(name, "", false, fmt.Sprintf("0 %d linear %s 0", size/512, v.Backing))
	if err != nil {
		r.T.Fatal(err)
	}
	r.Vols = append(r.Vols, v)
	return v
}

// Attach attaches v to the agent with o, exports it and connects its guest.
func (r *Rig) Attach(v *Vol, o agent.VolumeOptions) {
	r.T.Helper()
	w, err := r.Agent.Attach(v.Name, v.Dev, o)
	if err != nil {
		r.T.Fatal(err)
	}
	v.Wrapped = w
	sock := filepath.Join(r.Dir, v.Name+".sock")
	v.Exp, err = vhost.NewExport(vhost.ExportConfig{ID: v.Name, Socket: sock, Writable: true, Logger: Logger()}, w)
	if err != nil {
		r.T.Fatal(err)
	}
	v.expDone = make(chan error, 1)
	go func() { v.expDone <- v.Exp.Serve(context.Background()) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v.Client, err = frontend.Dial(ctx, frontend.Config{Socket: sock, MemSize: 16 << 20})
	if err != nil {
		r.T.Fatal(err)
	}
}

// StartAgent creates the agent, attaches volumes and runs it.
func (r *Rig) StartAgent(vols map[*Vol]agent.VolumeOptions) {
	r.T.Helper()
	cfg := r.AgentCfg
	r.mu.Lock()
	if len(cfg.Hubs) == 0 {
		cfg.Hub = r.Addr
	}
	r.mu.Unlock()
	cfg.Dial = func(ctx context.Context, to string) (net.Conn, error) {
		r.mu.Lock()
		block := r.block
		addr := r.Addr
		r.mu.Unlock()
		if len(cfg.Hubs) > 0 {
			addr = to // the agent's choice among its hubs
		}
		if block {
			return nil, fmt.Errorf("link down (test)")
		}
		var d net.Dialer
		nc, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			r.mu.Lock()
			r.conns = append(r.conns, nc)
			r.mu.Unlock()
		}
		return nc, err
	}
	a, err := agent.New(cfg)
	if err != nil {
		r.T.Fatal(err)
	}
	r.Agent = a
	for _, v := range r.Vols {
		if o, ok := vols[v]; ok {
			if v.Client != nil {
				// Re-attach after an agent restart: new export.
				v.Client.Close()
				v.Exp.Close()
				<-v.expDone
			}
			r.Attach(v, o)
		}
	}
	done := make(chan error, 1)
	r.runDone = done
	go func() { done <- a.Run(context.Background()) }()
}

// CutLink closes the agent's connections and keeps new ones from being
// made for d.
func (r *Rig) CutLink(d time.Duration) {
	r.mu.Lock()
	r.block = true
	for _, c := range r.conns {
		c.Close()
	}
	r.conns = nil
	r.mu.Unlock()
	time.Sleep(d)
	r.mu.Lock()
	r.block = false
	r.mu.Unlock()
}

// Writer writes verified data to v's sectors [lo, hi) until ctx is done,
// reading back now and then.
func (v *Vol) Writer(ctx context.Context, t testing.TB, seed uint64, lo, hi uint64, pause time.Duration) (writes int) {
	rng := rand.New(rand.NewPCG(seed, 7))
	gen := uint64(0)
	for ctx.Err() == nil {
		if pause > 0 {
			time.Sleep(pause)
		}
		n := uint64(8 * (1 + rng.IntN(16))) // 4 KiB to 64 KiB
		s := lo + uint64(rng.IntN(int((hi-lo)/8)))*8
		if s+n > hi {
			n = hi - s
		}
		gen++
		data := Pattern(seed<<32|gen, int(n)*512)
		wctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := v.Client.WriteAt(wctx, 0, data, s)
		cancel()
		if err != nil {
			t.Errorf("%s: guest write at %d: %v", v.Name, s, err)
			return writes
		}
		v.Mu.Lock()
		copy(v.Model[s*512:], data)
		v.Mu.Unlock()
		writes++
		if writes%16 == 0 {
			got := make([]byte, n*512)
			rctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			err := v.Client.ReadAt(rctx, 0, got, s)
			cancel()
			if err != nil {
				t.Errorf("%s: guest read at %d: %v", v.Name, s, err)
				return writes
			}
			v.Mu.Lock()
			ok := bytes.Equal(got, v.Model[s*512:(s+n)*512])
			v.Mu.Unlock()
			if !ok {
				t.Errorf("%s: guest read at %d differs from what was written", v.Name, s)
				return writes
			}
		}
	}
	return writes
}

// RunWriters runs two writers per volume (disjoint halves) until stop is
// closed, and returns the total number of writes.
func (r *Rig) RunWriters(stop <-chan struct{}, vols ...*Vol) func() int {
	return r.RunWritersPaced(stop, 0, vols...)
}

// RunWritersPaced is RunWriters with a pause before each write.
func (r *Rig) RunWritersPaced(stop <-chan struct{}, pause time.Duration, vols ...*Vol) func() int {
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-stop; cancel() }()
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	for i, v := range vols {
		half := uint64(v.Size / 512 / 2)
		for k := uint64(0); k < 2; k++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				n := v.Writer(ctx, r.T, uint64(i*2)+k+1, k*half, (k+1)*half, pause)
				mu.Lock()
				total += n
				mu.Unlock()
			}()
		}
	}
	return func() int { wg.Wait(); return total }
}

// WaitProtected waits until every volume is protecting on the hub with no
// backlog on either side.
func (r *Rig) WaitProtected(timeout time.Duration, vols ...*Vol) {
	r.T.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, why := r.Protected(vols)
		if ok {
			return
		}
		if time.Now().After(deadline) {
			r.T.Fatalf("not protected after %v: %s\nhub: %+v\nagent: %+v", timeout, why, r.Hub.Status(), r.Agent.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Protected reports whether every one of vols is protecting on the hub
// with no backlog on either side, and if not, why.
func (r *Rig) Protected(vols []*Vol) (bool, string) {
	as := r.Agent.Status()
	if !as.Connected {
		return false, "agent not connected"
	}
	for _, v := range as.Volumes {
		if v.Protect && (!v.Mirroring || v.BacklogIOs != 0 || v.DirtyRegions != 0) {
			return false, fmt.Sprintf("agent volume %s: mirroring %v backlog %d dirty %d", v.Name, v.Mirroring, v.BacklogIOs, v.DirtyRegions)
		}
	}
	st := r.HubVolumes()
	for _, v := range vols {
		s, ok := st[v.Name]
		if !ok {
			return false, "hub does not know " + v.Name
		}
		if s.State != hub.StateProtecting || s.BacklogIOs != 0 || s.ResyncBytes != 0 {
			return false, fmt.Sprintf("hub volume %s: %s backlog %d resync %d", v.Name, s.State, s.BacklogIOs, s.ResyncBytes)
		}
	}
	return true, ""
}

// HubVolumes returns the hub's status of each volume by name.
func (r *Rig) HubVolumes() map[string]hub.VolumeStatus {
	out := map[string]hub.VolumeStatus{}
	for _, vm := range r.Hub.Status() {
		for _, v := range vm.Volumes {
			out[v.Volume] = v
		}
	}
	return out
}

// CheckIdentical compares each source with its replica and with the
// guest's model.
func (r *Rig) CheckIdentical(vols ...*Vol) {
	r.T.Helper()
	// The replica images are the journal's base images: apply what is
	// journaled before comparing.
	if err := r.Hub.ApplyNow("vm1"); err != nil {
		r.T.Errorf("apply the journal: %v", err)
	}
	for _, v := range vols {
		if err := SameFiles(v.Backing, filepath.Join(r.HubCfg.Store, "vm1", v.Name+".img"), v.Size); err != nil {
			r.T.Errorf("%s: replica differs from source: %v", v.Name, err)
		}
		src, err := os.ReadFile(v.Backing)
		if err != nil {
			r.T.Fatal(err)
		}
		v.Mu.Lock()
		ok := bytes.Equal(src, v.Model)
		v.Mu.Unlock()
		if !ok {
			r.T.Errorf("%s: source differs from what the guest wrote", v.Name)
		}
	}
}

// SameFiles compares two files of size bytes, as cmp does.
func SameFiles(a, b string, size int64) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	if st, err := fb.Stat(); err != nil || st.Size() != size {
		return fmt.Errorf("%s: size %d, want %d (%v)", b, st.Size(), size, err)
	}
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(ba)) {
		n := min(int64(len(ba)), size-off)
		if _, err := fa.ReadAt(ba[:n], off); err != nil {
			return err
		}
		if _, err := fb.ReadAt(bb[:n], off); err != nil {
			return err
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			for i := int64(0); i < n; i += 512 {
				if !bytes.Equal(ba[i:i+512], bb[i:i+512]) {
					return fmt.Errorf("first difference at sector %d", (off+i)/512)
				}
			}
		}
	}
	return nil
}

// Pattern returns n bytes that depend on seed.
func Pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	x := seed*0x9e3779b97f4a7c15 + 1
	for i := 0; i+8 <= n; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
	return b
}

// ProtectAll returns options that protect every one of vols.
func ProtectAll(vols ...*Vol) map[*Vol]agent.VolumeOptions {
	m := map[*Vol]agent.VolumeOptions{}
	for _, v := range vols {
		m[v] = agent.VolumeOptions{Protect: true}
	}
	return m
}

// Context returns a context that ends after 30 s or with the test.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// RemoteBytes returns what the hub read with remote IO from v since it
// started.
func (r *Rig) RemoteBytes(v *Vol) uint64 { return r.HubVolumes()[v.Name].RemoteReadBytes }

// Runner returns a failover test runner that records the volumes it is
// handed in got and serves nothing.
func Runner(got *[]hub.TestVolume) hub.TestRunner {
	return func(_ string, vols []hub.TestVolume) (io.Closer, error) {
		*got = vols
		return io.NopCloser(nil), nil
	}
}

// ServeHub runs a hub with cfg on a loopback port until the test ends and
// returns it with its address.
func ServeHub(t testing.TB, cfg hub.Config) (*hub.Hub, string) {
	t.Helper()
	h, err := hub.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := h.Listen("127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { defer close(served); h.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); h.Close(); <-served })
	return h, ln.Addr().String()
}
