package vhost

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// soakDuration is how long TestIsolationSoak churns: 20 s in the normal
// test run, or VHOSTDM_SOAK (a Go duration, e.g. 30m) for a manual soak
// (docs/OPERATIONS.md, "Soak").
func soakDuration(t *testing.T) time.Duration {
	s := os.Getenv("VHOSTDM_SOAK")
	if s == "" {
		return 20 * time.Second
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("VHOSTDM_SOAK=%q: %v", s, err)
	}
	return d
}

// TestIsolationSoak connects and disconnects hostile and healthy front ends
// to one export of a `vhostdm serve` child process in a loop, with queue
// churn (SET_VRING_CALL re-sent as QEMU does when interrupt affinity moves,
// queues disabled and enabled, stopped with GET_VRING_BASE and started
// again), memory faults, blocked eventfds and half negotiations, while a
// healthy front end on the second export does verified I/O without pause.
// At the end the daemon's goroutines and fds are back to their baseline,
// its RSS stayed bounded, the healthy export saw no error and its latency
// stayed within bounds of its quiet baseline, and no interrupt was lost
// (vhostdm_export_lost_interrupts_total 0). It runs 20 s; VHOSTDM_SOAK
// sets the duration for a manual soak.
func TestIsolationSoak(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	d := startDaemonWith(t, fmt.Sprintf("\n[metrics]\nlisten = %q\n", addr))
	metric := func(name string) float64 {
		t.Helper()
		return scrapeMetric(t, addr, name)
	}
	fds := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}

	// The healthy export's front end: verified writes and reads on both
	// queues, timed, until the soak ends.
	w := startSoakWorker(t, d.healthy)
	defer w.stop()
	time.Sleep(3 * time.Second)
	quiet := w.take()

	cycles := []struct {
		name string
		run  func(t *testing.T, d *daemon)
	}{
		{"healthy front end", soakHealthy},
		{"queue churn", soakQueueChurn},
		{"no negotiation", func(t *testing.T, d *daemon) { dialHostile(t, d.hostile).rc.Close() }},
		{"blocked full call fd", soakBlockedCall},
		{"truncated memory", soakFault},
		{"garbage", soakGarbage},
	}
	// One round first, so that what the daemon keeps after the first use
	// of each path (pools, timers) is in the baseline.
	for _, c := range cycles {
		t.Run(c.name, func(t *testing.T) { c.run(t, d) })
	}
	settle := func(what string, cur func() float64, base float64, slack float64) float64 {
		deadline := time.Now().Add(15 * time.Second)
		v := cur()
		for v > base+slack && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
			v = cur()
		}
		if v > base+slack {
			t.Errorf("%s: %v after the soak, baseline %v", what, v, base)
		}
		return v
	}
	baseG := metric("go_goroutines")
	baseFD := fds()
	baseRSS := d.rss()
	w.take()

	end := time.Now().Add(soakDuration(t))
	var n int
	var peakRSS uint64
	for time.Now().Before(end) && !t.Failed() {
		c := cycles[n%len(cycles)]
		t.Run(fmt.Sprintf("%s %d", c.name, n), func(t *testing.T) { c.run(t, d) })
		n++
		if n%len(cycles) == 0 {
			d.alive()
			peakRSS = max(peakRSS, d.rss())
		}
	}
	churn := w.take()
	d.alive()
	g := settle("goroutines", func() float64 { return metric("go_goroutines") }, baseG, 2)
	f := settle("open fds", func() float64 { return float64(fds()) }, float64(baseFD), 0)
	lost := metric(`vhostdm_export_lost_interrupts_total{export="healthy"}`) + metric(`vhostdm_export_lost_interrupts_total{export="hostile"}`)
	t.Logf("%d cycles; goroutines %v -> %v, fds %d -> %v, RSS %d MiB -> peak %d MiB; lost interrupts %v",
		n, baseG, g, baseFD, f, baseRSS>>20, peakRSS>>20, lost)
	t.Logf("healthy export: quiet %s; during the churn %s", quiet, churn)
	if lost != 0 {
		t.Errorf("%v lost interrupts counted", lost)
	}
	// RSS: the hostile rings are small (16 entries); 64 MiB is room for
	// the Go heap's slack, far below a leak of one ring a cycle.
	if peakRSS > baseRSS+64<<20 {
		t.Errorf("RSS rose from %d to %d MiB", baseRSS>>20, peakRSS>>20)
	}
	if churn.errs > 0 || quiet.errs > 0 {
		t.Errorf("healthy export: %d errors", churn.errs+quiet.errs)
	}
	if churn.n == 0 {
		t.Fatal("healthy export: no I/O during the churn")
	}
	// On a shared 2-core machine the hostile cycles take CPU from the
	// healthy front end, so the bound is loose: what it catches is the
	// healthy export waiting for the hostile one (a stall of seconds).
	if lim := 10*quiet.p99 + 200*time.Millisecond; churn.p99 > lim || churn.max > 3*time.Second {
		t.Errorf("healthy export latency during the churn: p99 %v, max %v (quiet p99 %v)", churn.p99, churn.max, quiet.p99)
	}
	w.stop()
	d.stop()
}

// scrapeMetric returns the value of the sample named name (with its
// labels, as printed) at http://addr/metrics, 0 if absent.
func scrapeMetric(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			return f
		}
	}
	return 0
}

// soakWorker does verified I/O on an export and records its latencies.
type soakWorker struct {
	t    *testing.T
	mu   sync.Mutex
	lat  []time.Duration
	errs int
	quit chan struct{}
	done chan struct{}
}

type soakStats struct {
	n        int
	errs     int
	p50, p99 time.Duration
	max      time.Duration
}

func (s soakStats) String() string {
	return fmt.Sprintf("%d ops, p50 %v, p99 %v, max %v", s.n, s.p50, s.p99, s.max)
}

func startSoakWorker(t *testing.T, socket string) *soakWorker {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	c, err := frontend.Dial(ctx, frontend.Config{Socket: socket, NumQueues: 2, MemSize: 4 << 20})
	cancel()
	if err != nil {
		t.Fatalf("healthy export: %v", err)
	}
	w := &soakWorker{t: t, quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		defer c.Close()
		got := make([]byte, 16<<10)
		for i := 0; ; i++ {
			select {
			case <-w.quit:
				return
			default:
			}
			want := pattern(uint64(i), 4096*(1+i%4))
			sector := uint64(i * 61 % (isolationDiskSectors - 32))
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			err := c.WriteAt(ctx, i%2, want, sector)
			if err == nil {
				err = c.ReadAt(ctx, (i+1)%2, got[:len(want)], sector)
			}
			cancel()
			el := time.Since(start)
			w.mu.Lock()
			if err != nil || !bytes.Equal(got[:len(want)], want) {
				w.errs++
				w.t.Errorf("healthy export: op %d: %v", i, err)
			}
			w.lat = append(w.lat, el)
			w.mu.Unlock()
		}
	}()
	return w
}

// take returns the statistics since the last take and resets them.
func (w *soakWorker) take() soakStats {
	w.mu.Lock()
	lat, errs := w.lat, w.errs
	w.lat, w.errs = nil, 0
	w.mu.Unlock()
	s := soakStats{n: len(lat), errs: errs}
	if len(lat) == 0 {
		return s
	}
	slices.Sort(lat)
	s.p50, s.p99, s.max = lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
	return s
}

func (w *soakWorker) stop() {
	select {
	case <-w.quit:
	default:
		close(w.quit)
	}
	<-w.done
}

// soakHealthy: a well-behaved front end on the hostile export.
func soakHealthy(t *testing.T, d *daemon) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := frontend.Dial(ctx, frontend.Config{Socket: d.hostile, MemSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	want := pattern(3, 8192)
	got := make([]byte, len(want))
	if err := c.WriteAt(ctx, 0, want, 128); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, 0, got, 128); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back: %v", err)
	}
}

// soakRead submits one read at head and waits for its completion.
func soakRead(t *testing.T, a *hregion, ring *hring, head uint16) {
	t.Helper()
	o := ringEnd(ring.num, 0) + 4096 + uint64(head)*8192
	putHeader(a.mem[o:], virtio.BlkTypeIn, uint64(head)*8)
	a.mem[o+64] = 0xff
	ring.request(head, o, o+4096, 4096, o+64, true)
	want := ring.usedIdx() + 1
	ring.push(head)
	ring.doKick()
	deadline := time.Now().Add(10 * time.Second)
	for ring.usedIdx() != want {
		if time.Now().After(deadline) {
			t.Fatalf("request at head %d not completed", head)
		}
		time.Sleep(time.Millisecond)
	}
	if a.mem[o+64] != virtio.BlkStatusOK {
		t.Fatalf("request at head %d: status %d", head, a.mem[o+64])
	}
}

// soakQueueChurn: what QEMU does to a queue while the guest moves its
// interrupt affinity or resets: SET_VRING_CALL with new eventfds, the ring
// disabled and enabled, stopped with GET_VRING_BASE and started again from
// the base it returned; I/O between each step.
func soakQueueChurn(t *testing.T, d *daemon) {
	h := dialHostile(t, d.hostile)
	h.negotiate(0, 0)
	a := newHRegion(t, 0, 1<<20)
	h.memTable(a)
	ring := newRing(t, 16, a, 0, a, ringEnd(16, 0))
	h.setup(ring, true)
	for j := range 3 {
		soakRead(t, a, ring, 0)
		for range 3 {
			fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
			if err != nil {
				t.Fatal(err)
			}
			h.must(wire.ReqSetVringCall, wire.VringFD{Index: 0}, []int{fd})
			unix.Close(ring.call)
			ring.call = fd
		}
		soakRead(t, a, ring, 3)
		h.must(wire.ReqSetVringEnable, wire.VringState{Index: 0, Num: 0}, nil)
		h.must(wire.ReqSetVringEnable, wire.VringState{Index: 0, Num: 1}, nil)
		soakRead(t, a, ring, 6)
		rp := h.must(wire.ReqGetVringBase, wire.VringState{Index: 0}, nil)
		st, err := parseVringState(rp)
		if err != nil {
			t.Fatal(err)
		}
		if uint16(st.Num) != ring.availIdx {
			t.Fatalf("round %d: GET_VRING_BASE %d, avail idx %d", j, st.Num, ring.availIdx)
		}
		h.must(wire.ReqSetVringNum, wire.VringState{Index: 0, Num: uint32(ring.num)}, nil)
		h.must(wire.ReqSetVringBase, wire.VringState{Index: 0, Num: st.Num}, nil)
		h.must(wire.ReqSetVringAddr, wire.VringAddr{Index: 0, Desc: hostileUser + ring.dGPA, Avail: hostileUser + ring.aGPA, Used: hostileUser + ring.uGPA}, nil)
		h.must(wire.ReqSetVringKick, wire.VringFD{Index: 0}, []int{ring.kick})
		h.must(wire.ReqSetVringEnable, wire.VringState{Index: 0, Num: 1}, nil)
	}
	soakRead(t, a, ring, 9)
}

// parseVringState decodes the payload of a GET_VRING_BASE reply.
func parseVringState(p []byte) (wire.VringState, error) {
	if len(p) != 8 {
		return wire.VringState{}, fmt.Errorf("vring state of %d bytes", len(p))
	}
	return wire.VringState{Index: le.Uint32(p), Num: le.Uint32(p[4:])}, nil
}

// soakBlockedCall: the call fd made blocking and kept full while requests
// complete; then the front end goes away.
func soakBlockedCall(t *testing.T, d *daemon) {
	h := dialHostile(t, d.hostile)
	h.negotiate(0, 0)
	a := newHRegion(t, 0, 1<<20)
	h.memTable(a)
	ring := newRing(t, 16, a, 0, a, ringEnd(16, 0))
	h.setup(ring, true)
	blockingFullEventfd(t, ring.call, false)
	soakRead(t, a, ring, 0)
	soakRead(t, a, ring, 3)
}

// soakFault: guest memory truncated under a running queue.
func soakFault(t *testing.T, d *daemon) {
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
	ring.push(0)
	ring.doKick()
	h.waitClosed(10 * time.Second)
}

// soakGarbage: an unknown request (refused, the connection lives on), then
// a header announcing a payload beyond the protocol's maximum (the
// connection is closed).
func soakGarbage(t *testing.T, d *daemon) {
	h := dialHostile(t, d.hostile)
	h.negotiate(0, 0)
	if err := h.rc.Send(append(wire.Header{Code: 9999, Flags: wire.FlagVersion, Size: 4}.AppendTo(nil), 1, 2, 3, 4), nil); err != nil {
		t.Fatal(err)
	}
	h.must(wire.ReqGetFeatures, wire.NoPayload{}, nil)
	if err := h.rc.Send(wire.Header{Code: wire.ReqSetFeatures, Flags: wire.FlagVersion, Size: 1 << 30}.AppendTo(nil), nil); err != nil {
		t.Fatal(err)
	}
	h.waitClosed(10 * time.Second)
}
