package repagent

import (
	"bytes"
	"context"
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
	"github.com/vhostdm/vhostdm/vhost"
)

// testLogger logs to stderr when REPAGENT_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("REPAGENT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// rig is a hub and an agent on loopback with volumes exported over
// vhost-user and driven by vhost clients (the guests).
type rig struct {
	t        testing.TB
	dir      string
	hubCfg   HubConfig
	hub      *Hub
	addr     string
	hubDone  chan error
	agentCfg AgentConfig
	agent    *Agent
	runDone  chan error
	m        *mapper.Manager
	vols     []*rigVol

	mu    sync.Mutex
	conns []net.Conn // agent-side connections, for cutting the link
	block bool       // refuse to dial (link down)
}

// rigVol is one exported volume and its guest.
type rigVol struct {
	name    string
	backing string
	size    int64
	dev     *mapper.Device
	wrapped Device
	exp     *vhost.Export
	client  *vhost.Client
	expDone chan error

	mu    sync.Mutex
	model []byte
}

func newRig(t testing.TB) *rig {
	t.Helper()
	r := &rig{t: t, dir: t.TempDir()}
	r.hubCfg = HubConfig{Store: filepath.Join(r.dir, "store"), Logger: testLogger(), Heartbeat: 100 * time.Millisecond, Name: "hub"}
	r.agentCfg = AgentConfig{VM: "vm1", UUID: "6c1d7d0e-3b1f-4d2a-9a51-0c5f2d1e7a10", Logger: testLogger(),
		Heartbeat: 50 * time.Millisecond, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		DrainTimeout: 20 * time.Second}
	r.m = mapper.NewManager(mapper.ManagerOptions{Logger: testLogger()})
	t.Cleanup(func() {
		for _, v := range r.vols {
			if v.client != nil {
				v.client.Close()
			}
			if v.exp != nil {
				v.exp.Close()
				<-v.expDone
			}
		}
		if r.agent != nil {
			r.agent.abort()
		}
		if r.hub != nil {
			r.hub.Close()
		}
		r.m.Close()
	})
	return r
}

// startHub starts (or restarts) the hub on r.addr (a fresh port the
// first time).
func (r *rig) startHub() {
	r.t.Helper()
	h, err := NewHub(r.hubCfg)
	if err != nil {
		r.t.Fatal(err)
	}
	addr := r.addr
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
		r.t.Fatal(err)
	}
	r.mu.Lock()
	r.addr = ln.Addr().String()
	r.mu.Unlock()
	r.hub = h
	r.hubDone = make(chan error, 1)
	go func() { r.hubDone <- h.Serve(context.Background(), ln) }()
}

// killHub stops the hub as a crash would: no last checkpoint.
func (r *rig) killHub() {
	r.hub.abort()
	<-r.hubDone
	r.hub = nil
}

// addVolume creates a file-backed device of size bytes; startAgent
// attaches and exports it and connects its guest.
func (r *rig) addVolume(name string, size int64) *rigVol {
	r.t.Helper()
	v := &rigVol{name: name, size: size, backing: filepath.Join(r.dir, name+".img"), model: make([]byte, size)}
	f, err := os.Create(v.backing)
	if err != nil {
		r.t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	v.dev, err = r.m.CreateTable(name, "", false, fmt.Sprintf("0 %d linear %s 0", size/512, v.backing))
	if err != nil {
		r.t.Fatal(err)
	}
	r.vols = append(r.vols, v)
	return v
}

func (r *rig) attach(v *rigVol, o VolumeOptions) {
	r.t.Helper()
	w, err := r.agent.Attach(v.name, v.dev, o)
	if err != nil {
		r.t.Fatal(err)
	}
	v.wrapped = w
	sock := filepath.Join(r.dir, v.name+".sock")
	v.exp, err = vhost.NewExport(vhost.ExportConfig{ID: v.name, Socket: sock, Writable: true, Logger: testLogger()}, w)
	if err != nil {
		r.t.Fatal(err)
	}
	v.expDone = make(chan error, 1)
	go func() { v.expDone <- v.exp.Serve(context.Background()) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v.client, err = vhost.Dial(ctx, vhost.ClientConfig{Socket: sock, MemSize: 16 << 20})
	if err != nil {
		r.t.Fatal(err)
	}
}

// startAgent creates the agent, attaches volumes and runs it.
func (r *rig) startAgent(vols map[*rigVol]VolumeOptions) {
	r.t.Helper()
	cfg := r.agentCfg
	r.mu.Lock()
	cfg.Hub = r.addr
	r.mu.Unlock()
	cfg.dial = func(ctx context.Context, _ string) (net.Conn, error) {
		r.mu.Lock()
		block := r.block
		addr := r.addr
		r.mu.Unlock()
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
	a, err := NewAgent(cfg)
	if err != nil {
		r.t.Fatal(err)
	}
	r.agent = a
	for _, v := range r.vols {
		if o, ok := vols[v]; ok {
			if v.client != nil {
				// Re-attach after an agent restart: new export.
				v.client.Close()
				v.exp.Close()
				<-v.expDone
			}
			r.attach(v, o)
		}
	}
	done := make(chan error, 1)
	r.runDone = done
	go func() { done <- a.Run(context.Background()) }()
}

// cutLink closes the agent's connections and keeps new ones from being
// made for d.
func (r *rig) cutLink(d time.Duration) {
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

// writer writes verified data to v's sectors [lo, hi) until ctx is done,
// reading back now and then.
func (v *rigVol) writer(ctx context.Context, t testing.TB, seed uint64, lo, hi uint64, pause time.Duration) (writes int) {
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
		data := pattern(seed<<32|gen, int(n)*512)
		wctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := v.client.WriteAt(wctx, 0, data, s)
		cancel()
		if err != nil {
			t.Errorf("%s: guest write at %d: %v", v.name, s, err)
			return writes
		}
		v.mu.Lock()
		copy(v.model[s*512:], data)
		v.mu.Unlock()
		writes++
		if writes%16 == 0 {
			got := make([]byte, n*512)
			rctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			err := v.client.ReadAt(rctx, 0, got, s)
			cancel()
			if err != nil {
				t.Errorf("%s: guest read at %d: %v", v.name, s, err)
				return writes
			}
			v.mu.Lock()
			ok := bytes.Equal(got, v.model[s*512:(s+n)*512])
			v.mu.Unlock()
			if !ok {
				t.Errorf("%s: guest read at %d differs from what was written", v.name, s)
				return writes
			}
		}
	}
	return writes
}

// runWriters runs two writers per volume (disjoint halves) until stop is
// closed, and returns the total number of writes.
func (r *rig) runWriters(stop <-chan struct{}, vols ...*rigVol) func() int {
	return r.runWritersPaced(stop, 0, vols...)
}

// runWritersPaced is runWriters with a pause before each write.
func (r *rig) runWritersPaced(stop <-chan struct{}, pause time.Duration, vols ...*rigVol) func() int {
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-stop; cancel() }()
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	for i, v := range vols {
		half := uint64(v.size / 512 / 2)
		for k := uint64(0); k < 2; k++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				n := v.writer(ctx, r.t, uint64(i*2)+k+1, k*half, (k+1)*half, pause)
				mu.Lock()
				total += n
				mu.Unlock()
			}()
		}
	}
	return func() int { wg.Wait(); return total }
}

// waitProtected waits until every volume is protecting on the hub with no
// backlog on either side.
func (r *rig) waitProtected(timeout time.Duration, vols ...*rigVol) {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, why := r.protected(vols)
		if ok {
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("not protected after %v: %s\nhub: %+v\nagent: %+v", timeout, why, r.hub.Status(), r.agent.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *rig) protected(vols []*rigVol) (bool, string) {
	as := r.agent.Status()
	if !as.Connected {
		return false, "agent not connected"
	}
	for _, v := range as.Volumes {
		if v.Protect && (!v.Mirroring || v.BacklogIOs != 0 || v.DirtyRegions != 0) {
			return false, fmt.Sprintf("agent volume %s: mirroring %v backlog %d dirty %d", v.Name, v.Mirroring, v.BacklogIOs, v.DirtyRegions)
		}
	}
	st := r.hubVolumes()
	for _, v := range vols {
		s, ok := st[v.name]
		if !ok {
			return false, "hub does not know " + v.name
		}
		if s.State != StateProtecting || s.BacklogIOs != 0 || s.ResyncBytes != 0 {
			return false, fmt.Sprintf("hub volume %s: %s backlog %d resync %d", v.name, s.State, s.BacklogIOs, s.ResyncBytes)
		}
	}
	return true, ""
}

func (r *rig) hubVolumes() map[string]VolumeStatus {
	out := map[string]VolumeStatus{}
	for _, vm := range r.hub.Status() {
		for _, v := range vm.Volumes {
			out[v.Volume] = v
		}
	}
	return out
}

// checkIdentical compares each source with its replica and with the
// guest's model.
func (r *rig) checkIdentical(vols ...*rigVol) {
	r.t.Helper()
	for _, v := range vols {
		if err := sameFiles(v.backing, filepath.Join(r.hubCfg.Store, "vm1", v.name+".img"), v.size); err != nil {
			r.t.Errorf("%s: replica differs from source: %v", v.name, err)
		}
		src, err := os.ReadFile(v.backing)
		if err != nil {
			r.t.Fatal(err)
		}
		v.mu.Lock()
		ok := bytes.Equal(src, v.model)
		v.mu.Unlock()
		if !ok {
			r.t.Errorf("%s: source differs from what the guest wrote", v.name)
		}
	}
}

// sameFiles compares two files of size bytes, as cmp does.
func sameFiles(a, b string, size int64) error {
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

// pattern returns n bytes that depend on seed.
func pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	x := seed*0x9e3779b97f4a7c15 + 1
	for i := 0; i+8 <= n; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		le.PutUint64(b[i:], x)
	}
	return b
}
