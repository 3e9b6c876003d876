package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/bits"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhostdm/vhostdm/internal/procstat"
	"github.com/vhostdm/vhostdm/vhost"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

func init() { register("bench", "drive a vhost-user-blk back end", runBench) }

// benchResult is the --json output of vhostdm bench.
type benchResult struct {
	RW          string     `json:"rw"`
	BS          int        `json:"bs"`
	IODepth     int        `json:"iodepth"`
	Queues      int        `json:"queues"`
	DurationS   float64    `json:"duration_s"`
	Ops         uint64     `json:"ops"`
	IOPS        float64    `json:"iops"`
	BytesPerSec float64    `json:"bytes_per_sec"`
	LatUS       benchLatUS `json:"lat_us"`
	Errors      uint64     `json:"errors"`
	Verify      string     `json:"verify"`
	// Fsync and Flushes: with --fsync N, a FLUSH after every N writes of
	// each request slot, and how many were sent (not counted in ops).
	Fsync   int    `json:"fsync,omitempty"`
	Flushes uint64 `json:"flushes,omitempty"`
	// ThinkUS: with --think, each slot's wait after a completion, µs.
	ThinkUS int64 `json:"think_us,omitempty"`
	// With --pair: the back end's socket, the number of slices its
	// figures sum, and (with --cpu-pid) the server's CPU seconds during
	// them.
	Socket     string  `json:"socket,omitempty"`
	Slices     int     `json:"slices,omitempty"`
	ServerCPUS float64 `json:"server_cpu_s,omitempty"`
	// SliceIOPS are the IOPS of each slice, in order; SliceS the
	// seconds each lasted.
	SliceIOPS []float64 `json:"slice_iops,omitempty"`
	SliceS    []float64 `json:"slice_s,omitempty"`
	// With --rpo-qmp: the largest RPO query-repagent reported during the
	// run, in seconds, and how many samples it is the largest of.
	MaxRPOS    *float64 `json:"max_rpo_s,omitempty"`
	RPOSamples int      `json:"rpo_samples,omitempty"`
}

type benchLatUS struct {
	P50  float64 `json:"p50"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Max  float64 `json:"max"`
}

// runBench drives a vhost-user-blk back end (vhostdm or
// qemu-storage-daemon) with the vhost front-end client. iodepth is per
// queue, as fio's iodepth is per job.
func runBench(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "vhost-user-blk socket of the back end (required)")
	rw := fs.String("rw", "randread", "workload: read, write, randread, randwrite or randrw (50% reads)")
	bs := fs.Int("bs", 4096, "request size in bytes, a multiple of the device's block size")
	iodepth := fs.Int("iodepth", 1, "requests in flight per queue")
	queues := fs.Int("queues", 1, "virtqueues to drive, each with iodepth requests")
	duration := fs.Duration("duration", 10*time.Second, "how long to run")
	size := fs.Uint64("size", 0, "bytes of the device to use, from offset 0 (default: the whole device)")
	verify := fs.Bool("verify", false, "write self-identifying blocks (after a prefill pass) and check every read")
	packed := fs.Bool("packed", false, "use packed virtqueues (VIRTIO_F_RING_PACKED); fails if the back end does not offer them")
	think := fs.Duration("think", 0, "wait this long after each completion before the slot's next request, as fio's --thinktime: a guest that sends a request now and then (0: none)")
	fsync := fs.Int("fsync", 0, "send a FLUSH after every N writes of each request slot and wait for it, as fio's --fsync (0: never)")
	pair := fs.String("pair", "", "a second back end's `socket`, driven with the same workload in turns with --socket (slices of --slice, --duration each)")
	sliceD := fs.Duration("slice", 10*time.Millisecond, "with --pair: the length of each turn")
	cpuPID := fs.Int("cpu-pid", 0, "with --pair: the `pid` of the server process, whose CPU time during each turn counts to the turn's back end")
	rpoQMP := fs.String("rpo-qmp", "", "sample the RPO that query-repagent reports on this vhostdm QMP `socket` during the run, over one connection, and report the largest")
	rpoEvery := fs.Duration("rpo-interval", 100*time.Millisecond, "with --rpo-qmp: the sampling interval")
	jsonOut := fs.Bool("json", false, "print one JSON object (with --pair: one per back end, one a line)")
	report := fs.String("report", "", "print the comparison table of a `FILE` of tagged results (scripts/bench-vs-qsd.sh)")
	note := fs.String("note", "", "with --report: a line describing the machine and run")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: vhostdm bench --socket PATH [--rw read|write|randread|randwrite|randrw] [--bs BYTES]\n"+
			"       [--iodepth N] [--queues N] [--duration D] [--size BYTES] [--verify] [--packed] [--fsync N] [--think D] [--json]\n"+
			"       [--pair PATH [--slice D] [--cpu-pid PID]] [--rpo-qmp PATH [--rpo-interval D]]\n"+
			"       vhostdm bench --report FILE [--note TEXT] [--json]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "vhostdm bench: "+format+"\n", a...)
		return 1
	}
	if *report != "" {
		if err := benchReport(*report, *note, *jsonOut, stdout); err != nil {
			return fail("%v", err)
		}
		return 0
	}
	switch {
	case *socket == "":
		fmt.Fprintln(stderr, "vhostdm bench: --socket is required")
		fs.Usage()
		return 2
	case fs.NArg() != 0:
		return fail("unexpected argument %q", fs.Arg(0))
	case *rw != "read" && *rw != "write" && *rw != "randread" && *rw != "randwrite" && *rw != "randrw":
		return fail("--rw %q: want read, write, randread, randwrite or randrw", *rw)
	case *bs < 512 || *bs%512 != 0 || *bs > 4<<20:
		return fail("--bs %d: want a multiple of 512 up to 4 MiB", *bs)
	case *iodepth < 1 || *iodepth > 1024:
		return fail("--iodepth %d: want 1 to 1024", *iodepth)
	case *queues < 1 || *queues > vhost.MaxQueues:
		return fail("--queues %d: want 1 to %d", *queues, vhost.MaxQueues)
	case *duration <= 0:
		return fail("--duration %v: want a positive duration", *duration)
	case *fsync < 0:
		return fail("--fsync %d: want 0 (never) or a positive number of writes", *fsync)
	case *think < 0 || *think >= *duration:
		return fail("--think %v: want 0 (none) or a positive duration below --duration", *think)
	case *pair == "" && (*cpuPID != 0 || flagSet(fs, "slice")):
		return fail("--slice and --cpu-pid go with --pair")
	case *pair != "" && (*sliceD <= 0 || *sliceD > *duration):
		return fail("--slice %v: want a positive duration up to --duration", *sliceD)
	case *cpuPID < 0:
		return fail("--cpu-pid %d: want a process id", *cpuPID)
	case *rpoQMP != "" && *pair != "":
		return fail("--rpo-qmp does not go with --pair")
	case *rpoQMP == "" && *rpoEvery != 100*time.Millisecond:
		return fail("--rpo-interval goes with --rpo-qmp")
	case *rpoEvery < time.Millisecond || *rpoEvery > *duration:
		return fail("--rpo-interval %v: want 1ms up to --duration", *rpoEvery)
	}
	newBench := func() *bench {
		return &bench{rw: *rw, bs: *bs, iodepth: *iodepth, queues: *queues, verify: *verify, fsync: *fsync, packed: *packed, think: *think}
	}
	var results []*benchResult
	if *pair != "" {
		if *cpuPID > 0 {
			if _, err := processThreads(*cpuPID); err != nil {
				return fail("--cpu-pid %d: %v", *cpuPID, err)
			}
		}
		res, err := runPaired([2]*bench{newBench(), newBench()}, [2]string{*socket, *pair}, *duration, *sliceD, *size, *cpuPID, stderr)
		if err != nil {
			return fail("%v", err)
		}
		results = res[:]
	} else {
		var sampler *rpoSampler
		if *rpoQMP != "" {
			var err error
			if sampler, err = startRPOSampler(*rpoQMP, *rpoEvery); err != nil {
				return fail("%v", err)
			}
		}
		res, err := newBench().run(*socket, *duration, *size, stderr)
		if sampler != nil {
			maxRPO, n, serr := sampler.Stop()
			if err == nil && serr != nil {
				err = fmt.Errorf("--rpo-qmp: %w", serr)
			}
			if err == nil {
				res.MaxRPOS, res.RPOSamples = &maxRPO, n
			}
		}
		if err != nil {
			return fail("%v", err)
		}
		results = []*benchResult{res}
	}
	code := 0
	for _, res := range results {
		if *jsonOut {
			enc := json.NewEncoder(stdout)
			if err := enc.Encode(res); err != nil {
				return fail("%v", err)
			}
		} else {
			if res.Socket != "" {
				fmt.Fprintf(stdout, "%s: %d slices\n", res.Socket, res.Slices)
			}
			fmt.Fprintf(stdout, "%s bs=%d iodepth=%d queues=%d: %d ops in %.2fs\n", res.RW, res.BS, res.IODepth, res.Queues, res.Ops, res.DurationS)
			fmt.Fprintf(stdout, "  iops %.0f  bandwidth %.1f MiB/s\n", res.IOPS, res.BytesPerSec/(1<<20))
			fmt.Fprintf(stdout, "  latency us: p50 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n", res.LatUS.P50, res.LatUS.P99, res.LatUS.P999, res.LatUS.Max)
			fmt.Fprintf(stdout, "  errors %d  verify %s\n", res.Errors, res.Verify)
			if res.MaxRPOS != nil {
				fmt.Fprintf(stdout, "  max rpo %.3fs (%d samples)\n", *res.MaxRPOS, res.RPOSamples)
			}
			if *cpuPID > 0 {
				fmt.Fprintf(stdout, "  server CPU %.2fs, %.2f CPU-s per million requests\n", res.ServerCPUS, res.ServerCPUS/float64(max(res.Ops, 1))*1e6)
			}
		}
		if res.Errors > 0 || res.Verify == "failed" {
			code = 1
		}
	}
	return code
}

// flagSet reports whether the command line set flag name.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// bench is one run's state.
type bench struct {
	rw          string
	bs, iodepth int
	queues      int
	verify      bool
	packed      bool // packed virtqueues
	fsync       int  // a FLUSH after every fsync writes of a slot; 0 never
	// think: a slot waits this long after a completion before its next
	// request (on a timer's goroutine); 0 none.
	think       time.Duration
	flushes     atomic.Uint64
	c           *frontend.Client
	close       func() // ends the connection
	gone        chan error
	runStart    time.Time
	slots       [][]*slot
	elapsed     time.Duration // measured time of the slices since reset
	slices      int
	sliceIOPS   []float64 // of each slice since reset
	sliceS      []float64 // seconds of each slice since reset
	sliceOps    uint64    // ops at the end of the last slice
	blocks      uint64
	gens        []uint32      // verify: generation of each block's last completed write
	busy        []atomic.Bool // verify: one request per block at a time
	errors      atomic.Uint64
	mismatch    atomic.Uint64
	firstErr    atomic.Pointer[string]
	stopAt      time.Time
	hists       []*latHist
	ops         []uint64
	seq         []atomic.Uint64
	wg          sync.WaitGroup
	prefilling  atomic.Bool
	prefillNext atomic.Uint64
}

// slot is one request kept in flight.
type slot struct {
	q     int
	buf   []byte
	pcg   *rand.PCG // rng's source, reseeded by reseed
	rng   *rand.Rand
	block uint64
	write bool
	gen   uint32
	start time.Time
	// writes counts the slot's writes for --fsync; flushing: its
	// request in flight is a FLUSH.
	writes   int
	flushing bool
}

func (b *bench) run(socket string, d time.Duration, size uint64, stderr io.Writer) (*benchResult, error) {
	if err := b.open(socket, size, stderr); err != nil {
		return nil, err
	}
	defer b.close()
	if err := b.slice(d); err != nil {
		return nil, err
	}
	return b.result(stderr), nil
}

// open connects to the back end and prepares the request slots (and,
// with --verify, prefills the device).
func (b *bench) open(socket string, size uint64, stderr io.Writer) error {
	qs := 128
	for qs < 3*b.iodepth {
		qs *= 2
	}
	mem := uint64(b.queues*b.iodepth*b.bs) + 16<<20
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := frontend.Dial(ctx, frontend.Config{Socket: socket, NumQueues: b.queues, QueueSize: qs, Indirect: true, MemSize: mem, Packed: b.packed})
	if err != nil {
		return err
	}
	b.c = c
	// A back end that dies or drops the connection mid-run fails the run
	// at once: its requests in flight would never complete.
	wctx, wcancel := context.WithCancel(context.Background())
	b.gone = make(chan error, 1)
	go func() { b.gone <- c.WaitPeerGone(wctx) }()
	b.close = func() { wcancel(); c.Close() }
	b.runStart = time.Now()
	if err := b.setup(size, stderr); err != nil {
		b.close()
		return err
	}
	return nil
}

func (b *bench) setup(size uint64, stderr io.Writer) error {
	c := b.c
	cfg := c.Config()
	if cfg.BlkSize != 0 && b.bs%int(cfg.BlkSize) != 0 {
		return fmt.Errorf("--bs %d is not a multiple of the device's block size %d", b.bs, cfg.BlkSize)
	}
	devBytes := cfg.Capacity * 512
	if size == 0 || size > devBytes {
		size = devBytes
	}
	b.blocks = size / uint64(b.bs)
	if b.blocks == 0 {
		return fmt.Errorf("device of %d bytes is smaller than --bs %d", size, b.bs)
	}
	if (b.rw != "read" && b.rw != "randread" || b.verify) && c.Features()&frontend.BlkFeatureRO != 0 {
		return errors.New("the device is read-only")
	}
	if err := b.makeSlots(c.Buf); err != nil {
		return err
	}
	b.seq = make([]atomic.Uint64, b.queues)
	for q := range b.seq {
		b.seq[q].Store(uint64(q) * b.blocks / uint64(b.queues))
	}
	if b.verify {
		b.gens = make([]uint32, b.blocks)
		b.busy = make([]atomic.Bool, b.blocks)
		fmt.Fprintf(stderr, "vhostdm bench: prefilling %d blocks for --verify\n", b.blocks)
		b.prefilling.Store(true)
		b.start(b.slots)
		if err := b.wait(24*time.Hour, "prefill"); err != nil {
			return err
		}
		b.prefilling.Store(false)
		if b.errors.Load() > 0 {
			return fmt.Errorf("prefill failed: %s", *b.firstErr.Load())
		}
	}
	b.reset()
	return nil
}

// makeSlots makes the request slots, iodepth per queue, with buffers
// from buf.
func (b *bench) makeSlots(buf func(n int) ([]byte, error)) error {
	b.slots = make([][]*slot, b.queues)
	for q := range b.queues {
		for i := range b.iodepth {
			bb, err := buf(b.bs)
			if err != nil {
				return err
			}
			pcg := rand.NewPCG(uint64(q), uint64(i))
			b.slots[q] = append(b.slots[q], &slot{q: q, buf: bb, pcg: pcg, rng: rand.New(pcg)})
		}
	}
	return nil
}

// reset forgets what the slices so far measured (a warm-up's).
func (b *bench) reset() {
	b.hists = make([]*latHist, b.queues)
	b.ops = make([]uint64, b.queues)
	for q := range b.hists {
		b.hists[q] = &latHist{}
	}
	b.elapsed, b.slices, b.sliceIOPS, b.sliceS, b.sliceOps = 0, 0, nil, nil, 0
}

// reseed restarts every slot's random offsets from seed: two benches
// reseeded alike pick the same blocks, slot by slot.
func (b *bench) reseed(seed uint64) {
	for _, qs := range b.slots {
		for i, s := range qs {
			s.pcg.Seed(seed, uint64(s.q)<<32|uint64(i))
		}
	}
}

// wait waits for every slot to finish, for the back end to go (an error),
// or for limit.
func (b *bench) wait(limit time.Duration, what string) error {
	done := make(chan struct{})
	go func() { b.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case err := <-b.gone:
		return fmt.Errorf("%s: after %.1fs: %w", what, time.Since(b.runStart).Seconds(), err)
	case <-time.After(limit):
		return fmt.Errorf("%s: requests did not complete within 30s of the end of the run", what)
	}
}

// slice runs the workload for d (and until the requests in flight
// complete) and adds what it measured to the result.
func (b *bench) slice(d time.Duration) error {
	start := time.Now()
	b.stopAt = start.Add(d)
	b.start(b.slots)
	if err := b.wait(d+30*time.Second, "run"); err != nil {
		return err
	}
	took := time.Since(start)
	b.elapsed += took
	b.slices++
	var ops uint64
	for _, n := range b.ops {
		ops += n
	}
	b.sliceIOPS = append(b.sliceIOPS, round3(float64(ops-b.sliceOps)/took.Seconds()))
	b.sliceS = append(b.sliceS, took.Seconds())
	b.sliceOps = ops
	return nil
}

// result sums up the slices measured since the last reset.
func (b *bench) result(stderr io.Writer) *benchResult {
	elapsed := b.elapsed.Seconds()
	var all latHist
	var ops uint64
	for q := range b.hists {
		all.merge(b.hists[q])
		ops += b.ops[q]
	}
	res := &benchResult{RW: b.rw, BS: b.bs, IODepth: b.iodepth, Queues: b.queues, DurationS: round3(elapsed),
		Ops: ops, IOPS: round3(float64(ops) / elapsed), BytesPerSec: round3(float64(ops) * float64(b.bs) / elapsed),
		Errors: b.errors.Load(), Verify: "off", Fsync: b.fsync, Flushes: b.flushes.Load(), ThinkUS: b.think.Microseconds()}
	res.LatUS = benchLatUS{P50: all.quantileUS(0.5), P99: all.quantileUS(0.99), P999: all.quantileUS(0.999), Max: round3(float64(all.max) / 1e3)}
	if b.verify {
		res.Verify = "ok"
		if b.mismatch.Load() > 0 {
			res.Verify = "failed"
		}
	}
	if p := b.firstErr.Load(); p != nil {
		fmt.Fprintf(stderr, "vhostdm bench: first error: %s\n", *p)
	}
	return res
}

// runPaired drives two back ends with the same workload, in turns: one
// warm-up slice each (not counted, at least pairWarmUp), then n slices each of length slice,
// n = d/slice rounded up to an even number, in the order A B B A A B B A
// ...: n/2 quartets, each of which both back ends start in turn. Each
// pair of consecutive slices (A B, then B A) reads the same blocks: the
// slots of both are reseeded alike, so neither back end gets luckier
// offsets, and which of the two reads a block second (from warmer CPU
// caches) alternates. The result of each is the sum of its slices, with
// each slice's IOPS and length (the report's per-quartet ratios); with
// cpuPID, the server process's CPU time during each slice (the sum over
// its threads, to the nanosecond: procstat.Threads; /proc/PID/stat's
// 10 ms ticks are as long as a slice) counts to the back end of the
// slice, read once between two slices. Drift in the machine's load
// over the run then falls on both alike, where two runs one after the
// other would read it as a difference between the two.
func runPaired(benches [2]*bench, sockets [2]string, d, slice time.Duration, size uint64, cpuPID int, stderr io.Writer) ([2]*benchResult, error) {
	var res [2]*benchResult
	for i, b := range benches {
		if err := b.open(sockets[i], size, stderr); err != nil {
			return res, fmt.Errorf("%s: %w", sockets[i], err)
		}
		defer b.close()
	}
	warm := min(d, max(slice, pairWarmUp))
	for i, b := range benches {
		if err := b.slice(warm); err != nil {
			return res, fmt.Errorf("%s: warm-up: %w", sockets[i], err)
		}
		b.reset()
	}
	var cpu [2]time.Duration
	var t0 procstat.Threads
	if cpuPID > 0 {
		var err error
		if t0, err = processThreads(cpuPID); err != nil {
			return res, err
		}
	}
	n := int((d + slice - 1) / slice)
	n += n % 2
	for i := range 2 * n {
		k := (i ^ i>>1) & 1
		benches[k].reseed(uint64(i>>1) + 1)
		if err := benches[k].slice(slice); err != nil {
			return res, fmt.Errorf("%s: %w", sockets[k], err)
		}
		if cpuPID > 0 {
			t1, err := processThreads(cpuPID)
			if err != nil {
				return res, err
			}
			cpu[k] += t1.Since(t0)
			t0 = t1
		}
	}
	for i, b := range benches {
		res[i] = b.result(stderr)
		res[i].Socket, res[i].Slices, res[i].SliceIOPS, res[i].SliceS = sockets[i], b.slices, b.sliceIOPS, b.sliceS
		for j := range res[i].SliceS {
			res[i].SliceS[j] = round6(res[i].SliceS[j])
		}
		res[i].ServerCPUS = round6(cpu[i].Seconds())
	}
	return res, nil
}

// pairWarmUp is the least length of the warm-up slice of each back end
// of a --pair run.
const pairWarmUp = 250 * time.Millisecond

// processThreads reads the CPU time of each thread of the server process.
func processThreads(pid int) (procstat.Threads, error) {
	t, err := procstat.ReadThreads(pid)
	if err != nil {
		return nil, fmt.Errorf("server %w", err)
	}
	return t, nil
}

func round3(v float64) float64 { return math.Round(v*1000) / 1000 }

func round6(v float64) float64 { return math.Round(v*1e6) / 1e6 }

func (b *bench) start(slots [][]*slot) {
	for _, qs := range slots {
		for _, s := range qs {
			b.wg.Add(1)
			b.next(s)
		}
	}
}

func (b *bench) noteErr(format string, a ...any) {
	b.errors.Add(1)
	msg := fmt.Sprintf(format, a...)
	b.firstErr.CompareAndSwap(nil, &msg)
}

// next submits slot s's next request, or finishes the slot.
func (b *bench) next(s *slot) {
	if b.prefilling.Load() {
		blk := b.prefillNext.Add(1) - 1
		if blk >= b.blocks {
			b.wg.Done()
			return
		}
		s.block, s.write, s.gen = blk, true, 1
	} else {
		if !time.Now().Before(b.stopAt) {
			b.wg.Done()
			return
		}
		s.write = b.rw == "write" || b.rw == "randwrite" || b.rw == "randrw" && s.rng.IntN(2) == 0
		s.block = b.pick(s)
	}
	typ := uint32(frontend.BlkTypeIn)
	if s.write {
		typ = frontend.BlkTypeOut
		if b.verify {
			if !b.prefilling.Load() {
				s.gen = b.gens[s.block] + 1
			}
			fillBlock(s.buf, s.block, s.gen)
		}
	}
	s.start = time.Now()
	err := b.c.Submit(s.q, &frontend.BlkRequest{Type: typ, Sector: s.block * uint64(b.bs) / 512, Data: [][]byte{s.buf}}, func(r frontend.Result) { b.done(s, r) })
	if err != nil {
		b.noteErr("submit: %v", err)
		b.release(s)
		b.wg.Done()
	}
}

// pick chooses the next block; with --verify a block has one request at a
// time, so that every read knows what it must find.
func (b *bench) pick(s *slot) uint64 {
	for try := 0; ; try++ {
		var blk uint64
		if b.rw == "read" || b.rw == "write" {
			blk = b.seq[s.q].Add(1) % b.blocks
		} else {
			blk = s.rng.Uint64N(b.blocks)
		}
		if !b.verify || b.busy[blk].CompareAndSwap(false, true) {
			return blk
		}
		if try > 64 {
			for blk = range b.blocks {
				if b.busy[blk].CompareAndSwap(false, true) {
					return blk
				}
			}
		}
	}
}

func (b *bench) release(s *slot) {
	if b.verify && !b.prefilling.Load() {
		b.busy[s.block].Store(false)
	}
}

// done is the completion callback of slot s (on its queue's goroutine).
func (b *bench) done(s *slot, r frontend.Result) {
	lat := time.Since(s.start)
	ok := r.Err == nil && r.Status == frontend.BlkStatusOK
	if s.flushing {
		s.flushing = false
		if !ok {
			b.noteErr("flush: status %d err %v", r.Status, r.Err)
		}
		if r.Err != nil {
			b.wg.Done()
			return
		}
		b.next(s)
		return
	}
	if !ok {
		b.noteErr("block %d: status %d err %v", s.block, r.Status, r.Err)
	} else if b.verify {
		if s.write {
			b.gens[s.block] = s.gen
		} else if !checkBlock(s.buf, s.block, b.gens[s.block]) {
			if b.mismatch.Add(1) == 1 {
				msg := fmt.Sprintf("block %d: read does not match generation %d", s.block, b.gens[s.block])
				b.firstErr.CompareAndSwap(nil, &msg)
			}
		}
	}
	if !b.prefilling.Load() {
		b.hists[s.q].add(uint64(lat))
		b.ops[s.q]++
	}
	b.release(s)
	if r.Err != nil {
		b.wg.Done()
		return
	}
	if b.fsync > 0 && s.write && !b.prefilling.Load() {
		if s.writes++; s.writes%b.fsync == 0 {
			b.flush(s)
			return
		}
	}
	if b.think > 0 && !b.prefilling.Load() {
		time.AfterFunc(b.think, func() { b.next(s) })
		return
	}
	b.next(s)
}

// flush sends a FLUSH from slot s (--fsync); its completion submits the
// slot's next request.
func (b *bench) flush(s *slot) {
	s.flushing = true
	b.flushes.Add(1)
	err := b.c.Submit(s.q, &frontend.BlkRequest{Type: frontend.BlkTypeFlush}, func(r frontend.Result) { b.done(s, r) })
	if err != nil {
		s.flushing = false
		b.noteErr("submit flush: %v", err)
		b.wg.Done()
	}
}

// fillBlock writes the self-identifying content of block blk at generation
// gen: a header naming both, then bytes derived from them.
func fillBlock(buf []byte, blk uint64, gen uint32) {
	copy(buf, "VHDMBNCH")
	putU64(buf[8:], blk)
	putU64(buf[16:], uint64(gen))
	x := blk*0x9e3779b97f4a7c15 ^ uint64(gen)<<32 | 1
	for i := 24; i < len(buf); i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		buf[i] = byte(x)
	}
}

func checkBlock(buf []byte, blk uint64, gen uint32) bool {
	want := make([]byte, len(buf))
	fillBlock(want, blk, gen)
	return bytes.Equal(buf, want)
}

func putU64(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (8 * i))
	}
}

// latHist is a log-linear latency histogram in nanoseconds: 64 buckets per
// power of two, under 2% error.
type latHist struct {
	counts [64 * 64]uint64
	n      uint64
	max    uint64
}

func histIndex(v uint64) int {
	if v < 64 {
		return int(v)
	}
	e := bits.Len64(v) - 6 // v >> e is in [32, 64)
	return e*32 + int(v>>e)
}

func histValue(i int) uint64 {
	if i < 64 {
		return uint64(i)
	}
	e := i/32 - 1
	m := uint64(i%32 + 32)
	return m << e
}

func (h *latHist) add(v uint64) {
	i := histIndex(v)
	if i >= len(h.counts) {
		i = len(h.counts) - 1
	}
	h.counts[i]++
	h.n++
	h.max = max(h.max, v)
}

func (h *latHist) merge(o *latHist) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantileUS returns the q quantile in microseconds.
func (h *latHist) quantileUS(q float64) float64 {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank && c > 0 {
			return round3(float64(min(histValue(i), h.max)) / 1e3)
		}
	}
	return round3(float64(h.max) / 1e3)
}

// taggedResult is one line of the results file of scripts/bench-vs-qsd.sh:
// a vhostdm bench --json result tagged with its row, server and run.
type taggedResult struct {
	Row    string      `json:"row"`
	Server string      `json:"server"`
	Run    int         `json:"run"`
	Result benchResult `json:"result"`
	// CPUS is the CPU time (user and system) the server process used
	// during the measurement, from /proc/PID/stat; 0 if not measured.
	CPUS float64 `json:"cpu_s,omitempty"`
	// Load1 is the machine's one-minute load average at its end.
	Load1 float64 `json:"load1,omitempty"`
}

// reportServer is the medians of one server's runs of one row.
type reportServer struct {
	Server      string     `json:"server"`
	Runs        int        `json:"runs"`
	IOPS        float64    `json:"iops"`
	BytesPerSec float64    `json:"bytes_per_sec"`
	LatUS       benchLatUS `json:"lat_us"`
	// CPUPerMReq is the median over the runs of the server's CPU
	// seconds per million requests; 0 if not measured.
	CPUPerMReq float64 `json:"cpu_s_per_m_req,omitempty"`
	// Load1 is the highest one-minute load average seen at the end of
	// this server's runs.
	Load1 float64 `json:"load1,omitempty"`
	// Ratio is this server's median IOPS (and latencies, and CPU per
	// request) over the reference QSD's: the QSD configuration of the
	// row with the highest median IOPS (named in Ratio.Versus).
	Ratio *reportRatio `json:"ratio_vs_qsd,omitempty"`
}

type reportRatio struct {
	Versus string  `json:"versus"`
	IOPS   float64 `json:"iops"`
	// IOPSPaired is the median over the runs of the IOPS ratio within
	// each run (the two servers measured back to back), which drift in
	// the machine's load disturbs less than the ratio of medians.
	IOPSPaired float64 `json:"iops_paired"`
	P50        float64 `json:"p50"`
	P99        float64 `json:"p99"`
	P999       float64 `json:"p999"`
	CPU        float64 `json:"cpu_per_req,omitempty"`
}

type reportRow struct {
	Row      string         `json:"row"`
	Workload string         `json:"workload"`
	Servers  []reportServer `json:"servers"`
}

type benchReportOut struct {
	Note string `json:"note,omitempty"`
	// CPUs is the machine's CPU count; Loaded is set when a measurement
	// ended with the load average above it.
	CPUs   int         `json:"cpus"`
	Loaded bool        `json:"loaded"`
	Rows   []reportRow `json:"rows"`
	// Table1000 compares row 5's 1000-line table with its one-line
	// table; Control two identical one-line tables, measured the same
	// way, which shows the noise of the measurement in the same run.
	Table1000 *pairComparison `json:"table1000_vs_1line,omitempty"`
	Control   *pairComparison `json:"control_1line_vs_1line,omitempty"`
}

// table1000Pairs are the pairs of row-5 servers the report compares: the
// first of each is the reference.
var table1000Pairs = []struct {
	name    string
	servers [2]string
}{
	{"table1000", [2]string{"vhostdm", "vhostdm-1000"}},
	{"control", [2]string{"vhostdm-ctl", "vhostdm-ctl2"}},
}

// pairSums are the sums of one run's results of a pair of servers, and
// the IOPS and length of each one's slices.
type pairSums struct {
	ops, secs, cpu [2]float64
	paired         [2]bool
	sliceIOPS      [2][]float64
	sliceS         [2][]float64
}

func (ps *pairSums) add(j int, r benchResult, cpu float64) {
	ps.ops[j] += float64(r.Ops)
	ps.secs[j] += r.DurationS
	ps.cpu[j] += cpu
	ps.paired[j] = r.Slices > 0
	ps.sliceIOPS[j], ps.sliceS[j] = r.SliceIOPS, r.SliceS
}

// quartetLogRatios returns, for each quartet of slices of a paired run
// (A B B A or B A A B: slices 2k and 2k+1 of each server), the log of
// the second server's IOPS over the first's in it (each one's ops over
// its time in the quartet); nil if the slices do not form whole quartets.
func (ps *pairSums) quartetLogRatios() []float64 {
	n := len(ps.sliceIOPS[0])
	if n < 2 || n%2 != 0 {
		return nil
	}
	for j := range 2 {
		if len(ps.sliceIOPS[j]) != n || len(ps.sliceS[j]) != n {
			return nil
		}
	}
	var lr []float64
	for k := 0; k < n; k += 2 {
		var iops [2]float64
		for j := range 2 {
			io, sec := ps.sliceIOPS[j], ps.sliceS[j]
			if t := sec[k] + sec[k+1]; t > 0 {
				iops[j] = (io[k]*sec[k] + io[k+1]*sec[k+1]) / t
			}
		}
		if iops[0] <= 0 || iops[1] <= 0 {
			return nil // a quartet without requests: no ratio to take
		}
		lr = append(lr, math.Log(iops[1]/iops[0]))
	}
	return lr
}

// pairComparison is the comparison of two servers of row 5: the second's
// IOPS and CPU per request over the first's.
type pairComparison struct {
	// IOPS is the median over the quartets of slices of every run of
	// the quartet's IOPS ratio (see pairRun); without slices, the ratio
	// of the sums. IOPSSums is the ratio of the sums over every run (ops
	// over measured time of each); CPU the same of CPU seconds per
	// request.
	IOPS     float64 `json:"iops"`
	IOPSSums float64 `json:"iops_sums,omitempty"`
	Quartets int     `json:"quartets,omitempty"`
	CPU      float64 `json:"cpu_per_req,omitempty"`
	// Runs are the ratios of each run.
	Runs []pairRun `json:"runs,omitempty"`
	// Within says whether every run's IOPS ratio is within 3% of 1
	// (issue 22's goal for the 1000-line table: 0.97 to 1.03).
	Within *bool `json:"within_3pct,omitempty"`
}

// pairRun is one run's comparison of two servers of row 5.
type pairRun struct {
	Run int `json:"run"`
	// Paired is set when the two were measured in alternating slices of
	// one `vhostdm bench --pair` (else one after the other).
	Paired bool `json:"paired"`
	// IOPS is, for a paired run, the median over its quartets of slices
	// (A B B A) of the second server's IOPS over the first's within the
	// quartet (the geometric middle for an even count): a slice that
	// other tenants of the machine slowed moves it by one rank, not by
	// its weight, and both servers' quartets count alike. Otherwise it is
	// IOPSSums, the ratio of the sums (ops over measured time).
	IOPS     float64 `json:"iops"`
	IOPSSums float64 `json:"iops_sums,omitempty"`
	Quartets int     `json:"quartets,omitempty"`
	CPU      float64 `json:"cpu_per_req,omitempty"`
	// CPUPerMReq are the two servers' CPU-seconds per million requests,
	// the reference first.
	CPUPerMReq [2]float64 `json:"cpu_s_per_m_req,omitempty"`
}

// comparePair computes the ratios of each run and of the sums over all
// runs; nil without a run that measured both.
func comparePair(byRun map[int]*pairSums) *pairComparison {
	var runs []int
	for run := range byRun {
		runs = append(runs, run)
	}
	slices.Sort(runs)
	var all pairSums
	var allLR []float64
	quartets := true
	c := &pairComparison{}
	within := true
	for _, run := range runs {
		ps := byRun[run]
		if ps.secs[0] == 0 || ps.secs[1] == 0 || ps.ops[0] == 0 || ps.ops[1] == 0 {
			continue
		}
		pr := pairRun{Run: run, Paired: ps.paired[0] && ps.paired[1], IOPSSums: ratio(ps.ops[1]/ps.secs[1], ps.ops[0]/ps.secs[0])}
		pr.IOPS = pr.IOPSSums
		if lr := ps.quartetLogRatios(); pr.Paired && lr != nil {
			pr.IOPS, pr.Quartets = round3(math.Exp(median(lr))), len(lr)
			allLR = append(allLR, lr...)
		} else {
			quartets = false
		}
		if ps.cpu[0] > 0 && ps.cpu[1] > 0 {
			pr.CPUPerMReq = [2]float64{round3(ps.cpu[0] / ps.ops[0] * 1e6), round3(ps.cpu[1] / ps.ops[1] * 1e6)}
			pr.CPU = ratio(ps.cpu[1]/ps.ops[1], ps.cpu[0]/ps.ops[0])
		}
		within = within && math.Abs(pr.IOPS-1) <= table1000Tolerance+1e-9
		c.Runs = append(c.Runs, pr)
		for j := range 2 {
			all.ops[j] += ps.ops[j]
			all.secs[j] += ps.secs[j]
			all.cpu[j] += ps.cpu[j]
		}
	}
	if len(c.Runs) == 0 {
		return nil
	}
	c.IOPSSums = ratio(all.ops[1]/all.secs[1], all.ops[0]/all.secs[0])
	c.IOPS = c.IOPSSums
	if quartets {
		c.IOPS, c.Quartets = round3(math.Exp(median(allLR))), len(allLR)
	}
	if all.cpu[0] > 0 && all.cpu[1] > 0 {
		c.CPU = ratio(all.cpu[1]/all.ops[1], all.cpu[0]/all.ops[0])
	}
	c.Within = &within
	return c
}

// print writes the comparison's lines, each starting with what.
func (c *pairComparison) print(w io.Writer, what string) {
	if c == nil {
		return
	}
	for _, pr := range c.Runs {
		how := "one after the other"
		switch {
		case pr.Quartets > 0:
			how = fmt.Sprintf("paired, median of %d quartets; ratio of the sums %.3f", pr.Quartets, pr.IOPSSums)
		case pr.Paired:
			how = "paired"
		}
		fmt.Fprintf(w, "%s IOPS = %.3f (run %d, %s)", what, pr.IOPS, pr.Run, how)
		if pr.CPU > 0 {
			fmt.Fprintf(w, ", CPU per request = %.3f (%.2f / %.2f CPU-s/M req)", pr.CPU, pr.CPUPerMReq[1], pr.CPUPerMReq[0])
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "%s IOPS = %.3f (", what, c.IOPS)
	switch {
	case c.Quartets > 0:
		fmt.Fprintf(w, "all runs, median of %d quartets; ratio of the sums %.3f", c.Quartets, c.IOPSSums)
	case len(c.Runs) > 0:
		fmt.Fprint(w, "all runs, ratio of the sums")
	default:
		fmt.Fprint(w, "medians")
	}
	fmt.Fprint(w, ")")
	if c.CPU > 0 {
		fmt.Fprintf(w, ", CPU per request = %.3f", c.CPU)
	}
	fmt.Fprintln(w)
}

// table1000Tolerance is how far from 1 row 5's ratio of a 1000-line table
// to a one-line table may be in any run (issue 22: within 3%).
const table1000Tolerance = 0.03

// benchReport reads a results file and prints, per row and server, the
// median of every figure over the runs, and the ratios to QSD.
func benchReport(path, note string, jsonOut bool, w io.Writer) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	type key struct{ row, server string }
	var rows []string
	workload := map[string]string{}
	servers := map[string][]string{}
	byKey := map[key][]benchResult{}
	runIOPS := map[key]map[int]float64{}
	cpuPerM := map[key][]float64{}
	load := map[key]float64{}
	// Row 5's compared pairs, per run.
	pairs := map[string]map[int]*pairSums{}
	for i, line := range bytes.Split(data, []byte("\n")) {
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var t taggedResult
		if err := json.Unmarshal(line, &t); err != nil {
			return fmt.Errorf("%s:%d: %v", path, i+1, err)
		}
		if _, ok := workload[t.Row]; !ok {
			rows = append(rows, t.Row)
			r := t.Result
			workload[t.Row] = fmt.Sprintf("%s bs=%s QD%d %dq", r.RW, sizeName(r.BS), r.IODepth, r.Queues)
		}
		k := key{t.Row, t.Server}
		if _, ok := byKey[k]; !ok {
			servers[t.Row] = append(servers[t.Row], t.Server)
		}
		byKey[k] = append(byKey[k], t.Result)
		if runIOPS[k] == nil {
			runIOPS[k] = map[int]float64{}
		}
		runIOPS[k][t.Run] = t.Result.IOPS
		cpu := t.CPUS
		if cpu == 0 {
			cpu = t.Result.ServerCPUS // measured by bench --pair --cpu-pid
		}
		if cpu > 0 && t.Result.Ops > 0 {
			cpuPerM[k] = append(cpuPerM[k], cpu/float64(t.Result.Ops)*1e6)
		}
		for _, c := range table1000Pairs {
			for j, name := range c.servers {
				if t.Row != "5" || t.Server != name {
					continue
				}
				if pairs[c.name] == nil {
					pairs[c.name] = map[int]*pairSums{}
				}
				ps := pairs[c.name][t.Run]
				if ps == nil {
					ps = &pairSums{}
					pairs[c.name][t.Run] = ps
				}
				ps.add(j, t.Result, cpu)
			}
		}
		load[k] = max(load[k], t.Load1)
	}
	out := benchReportOut{Note: note, CPUs: runtime.NumCPU()}
	var one, thousand float64
	for _, row := range rows {
		rr := reportRow{Row: row, Workload: workload[row]}
		var qsd *reportServer
		for _, s := range servers[row] {
			rs := byKey[key{row, s}]
			med := func(f func(benchResult) float64) float64 {
				v := make([]float64, len(rs))
				for i, r := range rs {
					v[i] = f(r)
				}
				return round3(median(v))
			}
			rr.Servers = append(rr.Servers, reportServer{Server: s, Runs: len(rs),
				IOPS:        med(func(r benchResult) float64 { return r.IOPS }),
				BytesPerSec: med(func(r benchResult) float64 { return r.BytesPerSec }),
				LatUS: benchLatUS{P50: med(func(r benchResult) float64 { return r.LatUS.P50 }),
					P99:  med(func(r benchResult) float64 { return r.LatUS.P99 }),
					P999: med(func(r benchResult) float64 { return r.LatUS.P999 }),
					Max:  med(func(r benchResult) float64 { return r.LatUS.Max })},
				CPUPerMReq: round3(median(cpuPerM[key{row, s}])), Load1: load[key{row, s}]})
			if load[key{row, s}] > float64(out.CPUs) {
				out.Loaded = true
			}
		}
		// The reference is QSD's best configuration of the row.
		for i := range rr.Servers {
			if isQSD(rr.Servers[i].Server) && (qsd == nil || rr.Servers[i].IOPS > qsd.IOPS) {
				qsd = &rr.Servers[i]
			}
		}
		for i := range rr.Servers {
			s := &rr.Servers[i]
			if qsd != nil && !isQSD(s.Server) {
				var paired []float64
				for run, v := range runIOPS[key{row, s.Server}] {
					if q, ok := runIOPS[key{row, qsd.Server}][run]; ok && q > 0 {
						paired = append(paired, v/q)
					}
				}
				s.Ratio = &reportRatio{Versus: qsd.Server, IOPS: ratio(s.IOPS, qsd.IOPS), IOPSPaired: round3(median(paired)),
					P50: ratio(s.LatUS.P50, qsd.LatUS.P50), P99: ratio(s.LatUS.P99, qsd.LatUS.P99), P999: ratio(s.LatUS.P999, qsd.LatUS.P999)}
				if s.CPUPerMReq > 0 && qsd.CPUPerMReq > 0 {
					s.Ratio.CPU = ratio(s.CPUPerMReq, qsd.CPUPerMReq)
				}
			}
			if row == "5" && s.Server == "vhostdm" {
				one = s.IOPS
			}
			if row == "5" && s.Server == "vhostdm-1000" {
				thousand = s.IOPS
			}
		}
		out.Rows = append(out.Rows, rr)
	}
	// Row 5: the ratios of the sums, in each run and over all runs.
	for _, c := range table1000Pairs {
		cmp := comparePair(pairs[c.name])
		if c.name == "control" {
			out.Control = cmp
			continue
		}
		if cmp == nil && one > 0 && thousand > 0 {
			cmp = &pairComparison{IOPS: ratio(thousand, one)} // medians of runs one after the other
		}
		out.Table1000 = cmp
	}
	if jsonOut {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	if note != "" {
		fmt.Fprintf(w, "%s\n\n", note)
	}
	if out.Loaded {
		fmt.Fprintf(w, "LOADED: the load average exceeded the %d CPUs during the run; absolute figures are depressed, compare ratios and CPU per request.\n\n", out.CPUs)
	}
	fmt.Fprintln(w, "| row | workload | server | runs | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | CPU-s/M req | load | vs | IOPS ×QSD | paired | p99 ×QSD | CPU ×QSD |")
	fmt.Fprintln(w, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
	for _, rr := range out.Rows {
		for _, s := range rr.Servers {
			vs, ir, pair, pr, cr := "", "", "", "", ""
			if s.Ratio != nil {
				vs, ir, pair, pr = s.Ratio.Versus, fmt.Sprintf("**%.2f**", s.Ratio.IOPS), fmt.Sprintf("%.2f", s.Ratio.IOPSPaired), fmt.Sprintf("%.2f", s.Ratio.P99)
				if s.Ratio.CPU > 0 {
					cr = fmt.Sprintf("**%.2f**", s.Ratio.CPU)
				}
			}
			cpu := ""
			if s.CPUPerMReq > 0 {
				cpu = fmt.Sprintf("%.2f", s.CPUPerMReq)
			}
			fmt.Fprintf(w, "| %s | %s | %s | %d | %.0f | %.1f | %.1f | %.1f | %.1f | %s | %.1f | %s | %s | %s | %s | %s |\n", rr.Row, rr.Workload, s.Server, s.Runs,
				s.IOPS, s.BytesPerSec/(1<<20), s.LatUS.P50, s.LatUS.P99, s.LatUS.P999, cpu, s.Load1, vs, ir, pair, pr, cr)
		}
	}
	if out.Table1000 != nil || out.Control != nil {
		fmt.Fprintln(w)
	}
	out.Control.print(w, "row 5 control: a second one-line table / one-line table")
	out.Table1000.print(w, "row 5: 1000-line table / one-line table")
	if out.Table1000 != nil && out.Table1000.Within != nil {
		verdict := "met"
		if !*out.Table1000.Within {
			verdict = "MISSED"
		}
		fmt.Fprintf(w, "row 5: goal, every run's IOPS ratio within %.0f%% of 1 (%.2f to %.2f): %s", table1000Tolerance*100, 1-table1000Tolerance, 1+table1000Tolerance, verdict)
		if out.Control != nil && out.Control.Within != nil && !*out.Control.Within {
			fmt.Fprint(w, " (the control pair of two identical tables is not within it either: the machine's noise exceeds what the goal asks)")
		}
		fmt.Fprintln(w)
	}
	return nil
}

// isQSD reports whether a server tag of the results file names a
// qemu-storage-daemon configuration ("qsd", "qsd-uring", ...).
func isQSD(server string) bool { return strings.HasPrefix(server, "qsd") }

func sizeName(n int) string {
	switch {
	case n%(1<<20) == 0:
		return fmt.Sprintf("%dM", n>>20)
	case n%(1<<10) == 0:
		return fmt.Sprintf("%dk", n>>10)
	}
	return fmt.Sprint(n)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return math.Round(a/b*1000) / 1000
}
