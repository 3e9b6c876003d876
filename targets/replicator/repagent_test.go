package replicator

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// cutProxy forwards TCP connections to a hub; cut closes them all and
// refuses new ones until heal.
type cutProxy struct {
	ln    net.Listener
	to    string
	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{}
}

func newCutProxy(t *testing.T, to string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, to: to, conns: map[net.Conn]struct{}{}}
	t.Cleanup(func() { ln.Close(); p.setCut(true) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

func (p *cutProxy) serve(c net.Conn) {
	p.mu.Lock()
	if p.cut {
		p.mu.Unlock()
		c.Close()
		return
	}
	p.mu.Unlock()
	u, err := net.Dial("tcp", p.to)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.cut {
		p.mu.Unlock()
		c.Close()
		u.Close()
		return
	}
	p.conns[c], p.conns[u] = struct{}{}, struct{}{}
	p.mu.Unlock()
	go func() { io.Copy(u, c); u.Close(); c.Close() }()
	go func() { io.Copy(c, u); u.Close(); c.Close() }()
}

// setCut cuts (closing every connection) or heals the link.
func (p *cutProxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for c := range p.conns {
			c.Close()
		}
		clear(p.conns)
	}
}

// Geometry of the consistency test: 4 KiB blocks on two 512 KiB disks.
const (
	cgBlock  = 4096
	cgBlocks = devBytes / cgBlock
)

// cgBlockOf returns where the i-th write of disk d (0 or 1) goes: the
// disks' writes hop around at different strides.
func cgBlockOf(d int, i uint64) int64 {
	stride := []uint64{37, 53}[d]
	return int64(i * stride % cgBlocks)
}

// cgData is the content of write i to disk d: i (on disk B, the sequence
// of disk A's last write, which completed before it was issued), the
// disk, and bytes derived from both.
func cgData(d int, i uint64) []byte {
	b := make([]byte, cgBlock)
	binary.LittleEndian.PutUint64(b, i)
	b[8] = byte('A' + d)
	for k := 9; k < len(b); k++ {
		b[k] = byte(uint64(k)*31 + i*7 + uint64(d)*101)
	}
	return b
}

// cgModel returns disk d's image after its writes 1..n.
func cgModel(d int, n uint64) []byte {
	img := make([]byte, devBytes)
	for i := uint64(1); i <= n; i++ {
		copy(img[cgBlockOf(d, i)*cgBlock:], cgData(d, i))
	}
	return img
}

// cgLast returns the highest write number found on an image of disk d.
func cgLast(d int, img []byte) (uint64, error) {
	var last uint64
	for o := 0; o+cgBlock <= len(img); o += cgBlock {
		if i := binary.LittleEndian.Uint64(img[o:]); i > 0 {
			if img[o+8] != byte('A'+d) {
				return 0, fmt.Errorf("disk %c block %d holds a write of disk %c", 'A'+d, o/cgBlock, img[o+8])
			}
			last = max(last, i)
		}
	}
	return last, nil
}

// writeOrder checks that images a and b of the two disks are a prefix of
// the write order A1 B1 A2 B2 ...: B's last write is A's last or the one
// before, and each disk is exactly its model at that point. It returns
// the number of writes in the prefix.
func writeOrder(a, b []byte) (uint64, error) {
	la, err := cgLast(0, a)
	if err != nil {
		return 0, err
	}
	lb, err := cgLast(1, b)
	if err != nil {
		return 0, err
	}
	if lb != la && lb+1 != la {
		return 0, fmt.Errorf("disk A's replica holds writes through %d, disk B's through %d: not a prefix of the write order", la, lb)
	}
	if !bytes.Equal(a, cgModel(0, la)) {
		return 0, fmt.Errorf("disk A's replica is not exactly its writes 1..%d", la)
	}
	if !bytes.Equal(b, cgModel(1, lb)) {
		return 0, fmt.Errorf("disk B's replica is not exactly its writes 1..%d (A's through %d)", lb, la)
	}
	return la + lb, nil
}

// TestRepagentSiteLink replicates two replicator-dev devices of one log
// (one VM's disks) to an in-process repagent hub through a repagent site
// link, while a writer alternates between them (A's write i, then B's
// write i, each after the other completed). Failover test points taken
// while writes run — connected, with the link cut, and after it healed and
// the site resynchronised — are write-order consistent across both disks;
// at the end the hub's replicas are identical to the primaries.
func TestRepagentSiteLink(t *testing.T) {
	quiet := slog.New(slog.DiscardHandler)
	h, addr := reptest.ServeHub(t, hub.Config{Store: t.TempDir(), Name: "hub", Logger: quiet,
		Heartbeat: 200 * time.Millisecond, CheckpointInterval: 10 * time.Millisecond})
	px := newCutProxy(t, addr)

	w := newWorld(t)
	SetRepagentSettings(w.m, RepagentSettings{VM: "vm1", Logger: quiet, Tune: func(c *agent.Config) {
		c.Heartbeat, c.MinBackoff, c.MaxBackoff = 200*time.Millisecond, 20*time.Millisecond, 200*time.Millisecond
	}})
	rep := w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0 repagent 3 1 "+px.addr()+" async")
	disks := []*mapper.Device{
		w.create("da", "0 1024 replicator-dev /dev/mapper/rep 1 0 1 la nolog 0 1 1 vda core 1 64"),
		w.create("db", "0 1024 replicator-dev /dev/mapper/rep 2 0 1 lb nolog 0 1 1 vdb core 1 64"),
	}
	if got, want := status(rep, mapper.StatusTable), "ringbuffer 4 log 0 auto 2048 blockdev 1 0 repagent 3 1 "+px.addr()+" async"; got != want {
		t.Errorf("replicator TABLE\n got %q\nwant %q", got, want)
	}

	// The writer: A's write i, then B's write i.
	var done atomic.Uint64 // pairs completed
	stop := make(chan struct{})
	werr := make(chan error, 1)
	go func() {
		defer close(werr)
		for i := uint64(1); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			for d, dev := range disks {
				if err := dev.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: uint64(cgBlockOf(d, i) * cgBlock / mapper.SectorSize),
					Sectors: cgBlock / mapper.SectorSize, Data: [][]byte{cgData(d, i)}}); err != nil {
					werr <- fmt.Errorf("write %d to disk %c: %w", i, 'A'+d, err)
					return
				}
			}
			done.Store(i)
			time.Sleep(500 * time.Microsecond)
		}
	}()
	stopWriter := func() {
		t.Helper()
		close(stop)
		if err := <-werr; err != nil {
			t.Fatal(err)
		}
	}

	vmStatus := func() hub.VMStatus {
		for _, s := range h.Status() {
			if s.VM == "vm1" {
				return s
			}
		}
		return hub.VMStatus{}
	}
	waitConsistent := func(what string, connected bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			s := vmStatus()
			ok := s.Group && s.GroupConsistent && s.Connected == connected && len(s.Volumes) == 2
			for _, v := range s.Volumes {
				ok = ok && (v.State == hub.StateProtecting || !connected && v.State == hub.StateDisconnected)
			}
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the hub does not report the group consistent: %+v (replicator: %s)", what, s, status(rep, mapper.StatusInfo))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// tryFailover takes a failover test point: refused is the hub's
	// refusal, err what is wrong with the point.
	tryFailover := func() (n uint64, refused, err error) {
		dir, err := os.MkdirTemp(t.TempDir(), "ft")
		if err != nil {
			return 0, nil, err
		}
		var xs []hub.TestVolume
		ferr := h.FailoverTest("vm1", dir, reptest.Runner(&xs))
		if ferr != nil {
			return 0, ferr, nil
		}
		// The hub materialises the point under dir/point.
		a, aerr := os.ReadFile(filepath.Join(dir, "point", "vda.img"))
		b, berr := os.ReadFile(filepath.Join(dir, "point", "vdb.img"))
		if err := errors.Join(aerr, berr, h.FailoverTestStop("vm1")); err != nil {
			return 0, nil, err
		}
		if len(xs) != 2 {
			return 0, nil, fmt.Errorf("failover test exports %+v, want vda and vdb", xs)
		}
		n, err = writeOrder(a, b)
		return n, nil, err
	}
	failoverPoint := func(what string) {
		t.Helper()
		before := done.Load()
		n, refused, err := tryFailover()
		if refused != nil || err != nil {
			t.Fatalf("%s: failover test point: %v", what, errors.Join(refused, err))
		}
		t.Logf("%s: failover point after %d writes (the writer had completed %d pairs before it)", what, n, before)
		if n == 0 {
			t.Fatalf("%s: the failover point holds no writes", what)
		}
	}
	// sample takes failover test points until stopped: every one the
	// hub grants must be write-order consistent.
	sample := func() (stop func() (granted, refused int)) {
		quit, out := make(chan struct{}), make(chan [2]int)
		errc := make(chan error, 1)
		go func() {
			var g, r int
			defer func() { out <- [2]int{g, r} }()
			for {
				select {
				case <-quit:
					return
				default:
				}
				_, refused, err := tryFailover()
				switch {
				case err != nil:
					errc <- err
					<-quit
					return
				case refused != nil:
					r++
				default:
					g++
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
		return func() (int, int) {
			t.Helper()
			close(quit)
			res := <-out
			select {
			case err := <-errc:
				t.Fatalf("a failover test point the hub granted is not write-order consistent: %v", err)
			default:
			}
			return res[0], res[1]
		}
	}
	waitPairs := func(n uint64) {
		t.Helper()
		target := done.Load() + n
		deadline := time.Now().Add(20 * time.Second)
		for done.Load() < target {
			if time.Now().After(deadline) {
				t.Fatalf("the writer is stuck at %d pairs", done.Load())
			}
			time.Sleep(time.Millisecond)
		}
	}

	smp := sample()
	waitPairs(50)
	waitConsistent("initial sync", true)
	waitPairs(50)
	g, r := smp()
	t.Logf("initial sync: %d failover points granted and consistent, %d refused", g, r)
	failoverPoint("connected, under writes")

	waitPairs(50)
	px.setCut(true)
	t.Logf("link cut after %d pairs; replicator: %s", done.Load(), status(rep, mapper.StatusInfo))
	w.waitEvent("slink-failed")
	waitPairs(200) // the site's dirty logs take these
	waitConsistent("cut", false)
	failoverPoint("link cut")
	smp = sample()
	// The source's resynchronisation is an open resync set in the hub's
	// journal: failover points stay at the last consistent point before
	// it (granted, never a mix).
	var sawResync atomic.Bool
	watchDone := make(chan struct{})
	stopWatch := make(chan struct{})
	go func() {
		defer close(watchDone)
		for {
			if j := vmStatus().Journal; j != nil && j.Resyncing {
				sawResync.Store(true)
			}
			select {
			case <-stopWatch:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	px.setCut(false)
	healed := time.Now()
	waitPairs(50)
	waitConsistent("healed and resynchronised", true)
	close(stopWatch)
	<-watchDone
	t.Logf("consistent again %v after the heal", time.Since(healed).Round(time.Millisecond))
	waitPairs(50)
	g, r = smp()
	t.Logf("from the heal on: %d failover points granted and consistent, %d refused (resynchronisation)", g, r)
	if !sawResync.Load() {
		t.Errorf("no resync set was open after the heal: the resynchronisation was not seen")
	}
	failoverPoint("healed, under writes")

	stopWriter()
	waitDrained(t, w.engine("rep"))
	// Drained at the source: the hub acknowledged the last checkpoint's
	// entries; wait for its replicas to equal the primaries.
	var st hub.VMStatus
	deadline := time.Now().Add(10 * time.Second)
	for {
		st = vmStatus()
		same := len(st.Volumes) == 2
		for i, v := range st.Volumes {
			img, err := os.ReadFile(v.Replica)
			same = same && err == nil && bytes.Equal(img, w.mems[[]string{"la", "lb"}[i]].Bytes())
		}
		if same {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the hub's replicas differ from the primaries after the writer stopped: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	a, b := w.mems["la"].Bytes(), w.mems["lb"].Bytes()
	n, err := writeOrder(a, b)
	if err != nil {
		t.Fatalf("primaries: %v", err)
	}
	if n != 2*done.Load() {
		t.Errorf("the primaries hold %d writes, the writer completed %d pairs", n, done.Load())
	}
	t.Logf("replicas identical to the primaries after %d writes; replicator: %s", n, status(rep, mapper.StatusInfo))
}

// TestRepagentLinkErrors checks the repagent site link's parameters and
// device parameters.
func TestRepagentLinkErrors(t *testing.T) {
	w := newWorld(t)
	for _, c := range []struct{ table, want string }{
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 repagent 1 1", "repagent: want <slink_nr> <hub address> [sync|async [ios|size|timeout <N>]], got 1 parameters"},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 repagent 4 1 127.0.0.1:1 async ios", "got 4 parameters"},
		{"0 8 replicator ringbuffer 2 log2 0 repagent 2 0 127.0.0.1:1", "slink 0 is the local site, it cannot be a hub"},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 repagent 3 1 127.0.0.1:1 maybe", `slink policy "maybe": not sync or async`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 repagent 5 1 127.0.0.1:1 sync ios 3", `fall-behind "ios": only async site links fall behind`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 repagent 2 1 hub.example:7420", "slink 1: repagent: hub"},
	} {
		_, err := w.m.CreateTable("bad", "", false, c.table)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s:\n got %v\nwant an error containing %q", c.table, err, c.want)
		}
	}
	SetRepagentSettings(w.m, RepagentSettings{VM: "vm2", Logger: slog.New(slog.DiscardHandler)})
	// A hub that is not there: the tables load, the site waits.
	w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0 repagent 2 1 127.0.0.1:1")
	for _, c := range []struct{ table, want string }{
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 1 a/b core 1 64", `volume name "a/b"`},
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 2 a b core 1 64", "slink 1: #dev_params 2, want 1"},
	} {
		_, err := w.m.CreateTable("bad", "", false, c.table)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s:\n got %v\nwant an error containing %q", c.table, err, c.want)
		}
	}
}
