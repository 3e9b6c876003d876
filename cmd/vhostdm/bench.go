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
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhostdm/vhostdm/vhost"
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
	jsonOut := fs.Bool("json", false, "print one JSON object")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: vhostdm bench --socket PATH [--rw read|write|randread|randwrite|randrw] [--bs BYTES]\n"+
			"       [--iodepth N] [--queues N] [--duration D] [--size BYTES] [--verify] [--json]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "vhostdm bench: "+format+"\n", a...)
		return 1
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
	}
	b := &bench{rw: *rw, bs: *bs, iodepth: *iodepth, queues: *queues, verify: *verify}
	res, err := b.run(*socket, *duration, *size, stderr)
	if err != nil {
		return fail("%v", err)
	}
	if *jsonOut {
		enc := json.NewEncoder(stdout)
		if err := enc.Encode(res); err != nil {
			return fail("%v", err)
		}
	} else {
		fmt.Fprintf(stdout, "%s bs=%d iodepth=%d queues=%d: %d ops in %.2fs\n", res.RW, res.BS, res.IODepth, res.Queues, res.Ops, res.DurationS)
		fmt.Fprintf(stdout, "  iops %.0f  bandwidth %.1f MiB/s\n", res.IOPS, res.BytesPerSec/(1<<20))
		fmt.Fprintf(stdout, "  latency us: p50 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n", res.LatUS.P50, res.LatUS.P99, res.LatUS.P999, res.LatUS.Max)
		fmt.Fprintf(stdout, "  errors %d  verify %s\n", res.Errors, res.Verify)
	}
	if res.Errors > 0 || res.Verify == "failed" {
		return 1
	}
	return 0
}

// bench is one run's state.
type bench struct {
	rw          string
	bs, iodepth int
	queues      int
	verify      bool
	c           *vhost.Client
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
	rng   *rand.Rand
	block uint64
	write bool
	gen   uint32
	start time.Time
}

func (b *bench) run(socket string, d time.Duration, size uint64, stderr io.Writer) (*benchResult, error) {
	qs := 128
	for qs < 3*b.iodepth {
		qs *= 2
	}
	mem := uint64(b.queues*b.iodepth*b.bs) + 16<<20
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := vhost.Dial(ctx, vhost.ClientConfig{Socket: socket, NumQueues: b.queues, QueueSize: qs, Indirect: true, MemSize: mem})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	b.c = c
	cfg := c.Config()
	if cfg.BlkSize != 0 && b.bs%int(cfg.BlkSize) != 0 {
		return nil, fmt.Errorf("--bs %d is not a multiple of the device's block size %d", b.bs, cfg.BlkSize)
	}
	devBytes := cfg.Capacity * 512
	if size == 0 || size > devBytes {
		size = devBytes
	}
	b.blocks = size / uint64(b.bs)
	if b.blocks == 0 {
		return nil, fmt.Errorf("device of %d bytes is smaller than --bs %d", size, b.bs)
	}
	if (b.rw != "read" && b.rw != "randread" || b.verify) && c.Features()&vhost.BlkFeatureRO != 0 {
		return nil, errors.New("the device is read-only")
	}
	slots := make([][]*slot, b.queues)
	for q := range b.queues {
		for i := range b.iodepth {
			buf, err := c.Buf(b.bs)
			if err != nil {
				return nil, err
			}
			slots[q] = append(slots[q], &slot{q: q, buf: buf, rng: rand.New(rand.NewPCG(uint64(q), uint64(i)))})
		}
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
		b.start(slots)
		b.wg.Wait()
		b.prefilling.Store(false)
		if b.errors.Load() > 0 {
			return nil, fmt.Errorf("prefill failed: %s", *b.firstErr.Load())
		}
	}
	b.hists = make([]*latHist, b.queues)
	b.ops = make([]uint64, b.queues)
	for q := range b.hists {
		b.hists[q] = &latHist{}
	}
	start := time.Now()
	b.stopAt = start.Add(d)
	b.start(slots)
	done := make(chan struct{})
	go func() { b.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d + 30*time.Second):
		return nil, errors.New("requests did not complete within 30s of the end of the run")
	}
	elapsed := time.Since(start).Seconds()
	var all latHist
	var ops uint64
	for q := range b.hists {
		all.merge(b.hists[q])
		ops += b.ops[q]
	}
	res := &benchResult{RW: b.rw, BS: b.bs, IODepth: b.iodepth, Queues: b.queues, DurationS: round3(elapsed),
		Ops: ops, IOPS: round3(float64(ops) / elapsed), BytesPerSec: round3(float64(ops) * float64(b.bs) / elapsed),
		Errors: b.errors.Load(), Verify: "off"}
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
	return res, nil
}

func round3(v float64) float64 { return math.Round(v*1000) / 1000 }

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
	typ := uint32(vhost.BlkTypeIn)
	if s.write {
		typ = vhost.BlkTypeOut
		if b.verify {
			if !b.prefilling.Load() {
				s.gen = b.gens[s.block] + 1
			}
			fillBlock(s.buf, s.block, s.gen)
		}
	}
	s.start = time.Now()
	err := b.c.Submit(s.q, &vhost.BlkRequest{Type: typ, Sector: s.block * uint64(b.bs) / 512, Data: [][]byte{s.buf}}, func(r vhost.Result) { b.done(s, r) })
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
func (b *bench) done(s *slot, r vhost.Result) {
	lat := time.Since(s.start)
	ok := r.Err == nil && r.Status == vhost.BlkStatusOK
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
	b.next(s)
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
