// Package copier copies sector ranges from one backend to one or more
// others in the background: the kernel's kcopyd (Documentation
// admin-guide/device-mapper/kcopyd.rst), shared by the snapshot merge, the
// mirror's resync and later targets.
//
// # Model
//
// A [Copier] owns a fixed pool of buffers of [Options.PieceBytes] each,
// [Options.MemoryBytes] in all: that pool is the whole of its memory, however
// many copies are queued. A copy ([Copier.Copy]) is cut into pieces of at most
// one buffer; each piece is read once from the source and written to every
// destination. Up to [Options.Workers] pieces are in flight at once across
// all copies (never more than the pool holds). When every piece is done, the
// copy's callback runs once with a [Result]: the first read error, and one
// write error per destination (nil where that destination took every piece).
// A read error stops the copy: no later piece is read, and destinations are
// not written with data that was not read. A write error on one destination
// does not stop the others.
//
// Units: regions are in 512-byte sectors, as everywhere in the mapper.
//
// # Concurrency
//
// Copy, Zero and CopySync may be called from any goroutine. Callbacks run on
// a copier goroutine, one at a time per copy, and may start new copies. Close
// waits for queued copies to finish; copies started after Close fail.
package copier

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// Region is a range of a backend, in sectors.
type Region struct {
	Dev     mapper.Backend
	Sector  uint64
	Sectors uint64
}

func (r Region) String() string {
	return fmt.Sprintf("%s %d+%d", r.Dev.Name(), r.Sector, r.Sectors)
}

// Result is the outcome of one copy: kcopyd's read_err and write_err bitmap.
type Result struct {
	// ReadErr is the first error reading the source (nil for Zero).
	ReadErr error
	// WriteErrs has one entry per destination, in the order given: the
	// first error writing that destination, or nil.
	WriteErrs []error
}

// Err returns ReadErr and the write errors joined, or nil when the copy
// succeeded everywhere.
func (r Result) Err() error {
	errs := []error{r.ReadErr}
	errs = append(errs, r.WriteErrs...)
	return errors.Join(errs...)
}

// Failed reports whether destination i was not fully written.
func (r Result) Failed(i int) bool { return r.ReadErr != nil || r.WriteErrs[i] != nil }

// Options configure a Copier. Zero values pick the defaults.
type Options struct {
	// MemoryBytes bounds the buffer memory (default 4 MiB).
	MemoryBytes int
	// PieceBytes is the size of one buffer and the largest single read
	// or write (default 256 KiB; a multiple of 512).
	PieceBytes int
	// Workers bounds the pieces in flight (default and maximum: the
	// number of buffers).
	Workers int
	// BytesPerSecond throttles reads to this rate when positive (the
	// mirror's resync throttle); 0 means unthrottled.
	BytesPerSecond int64
}

// Default option values.
const (
	DefaultMemoryBytes = 4 << 20
	DefaultPieceBytes  = 256 << 10
)

// ErrClosed is the read error of copies started after Close.
var ErrClosed = errors.New("copier: closed")

// Copier runs copies with bounded memory; see the package documentation.
type Copier struct {
	// Immutable.
	piece int
	rate  int64

	bufs chan []byte   // the buffer pool
	sem  chan struct{} // worker slots

	// Guarded by mu.
	mu       sync.Mutex
	closed   bool
	inflight sync.WaitGroup
	next     time.Time // throttle: earliest start of the next read
}

// New returns a Copier.
func New(o Options) *Copier {
	if o.PieceBytes <= 0 {
		o.PieceBytes = DefaultPieceBytes
	}
	o.PieceBytes = (o.PieceBytes + mapper.SectorSize - 1) &^ (mapper.SectorSize - 1)
	if o.MemoryBytes <= 0 {
		o.MemoryBytes = DefaultMemoryBytes
	}
	n := max(1, o.MemoryBytes/o.PieceBytes)
	if o.Workers <= 0 || o.Workers > n {
		o.Workers = n
	}
	c := &Copier{piece: o.PieceBytes, rate: o.BytesPerSecond,
		bufs: make(chan []byte, n), sem: make(chan struct{}, o.Workers)}
	for range n {
		c.bufs <- nil // allocated lazily, at most n
	}
	return c
}

// job is one copy in progress.
type job struct {
	c    *Copier
	src  Region // Dev nil: zero the destinations
	dsts []Region
	done func(Result)

	mu      sync.Mutex
	res     Result
	pending int    // pieces issued and not yet finished
	next    uint64 // first sector not yet issued
	failed  bool   // a read failed: issue no more pieces
	issued  bool   // no more pieces will be issued
}

// Copy copies src to every destination in the background and calls done
// with the result. Every destination must be at least src.Sectors long;
// only the first src.Sectors of each are written. done may be nil.
func (c *Copier) Copy(src Region, dsts []Region, done func(Result)) {
	c.start(&job{c: c, src: src, dsts: dsts, done: done})
}

// Zero writes zeros to every destination (kcopyd's dm_kcopyd_zero).
func (c *Copier) Zero(dsts []Region, done func(Result)) {
	if len(dsts) == 0 {
		if done != nil {
			done(Result{})
		}
		return
	}
	c.start(&job{c: c, src: Region{Sectors: dsts[0].Sectors}, dsts: dsts, done: done})
}

// CopySync copies and waits for the result.
func (c *Copier) CopySync(src Region, dsts []Region) Result {
	ch := make(chan Result, 1)
	c.Copy(src, dsts, func(r Result) { ch <- r })
	return <-ch
}

func (c *Copier) start(j *job) {
	j.res.WriteErrs = make([]error, len(j.dsts))
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		j.res.ReadErr = ErrClosed
		if j.done != nil {
			j.done(j.res)
		}
		return
	}
	c.inflight.Add(1)
	c.mu.Unlock()
	for i, d := range j.dsts {
		if d.Sectors < j.src.Sectors {
			j.res.WriteErrs[i] = fmt.Errorf("copy to %s: destination shorter than the %d-sector source", d, j.src.Sectors)
		}
	}
	if j.src.Sectors == 0 || len(j.dsts) == 0 || j.res.Err() != nil {
		go j.finish()
		return
	}
	go j.run()
}

// run issues the pieces of j, each on a worker, as buffers and worker slots
// become free.
func (j *job) run() {
	c := j.c
	pieceSectors := uint64(c.piece >> mapper.SectorShift)
	for {
		j.mu.Lock()
		if j.failed || j.next >= j.src.Sectors {
			j.issued = true
			last := j.pending == 0
			j.mu.Unlock()
			if last {
				j.finish()
			}
			return
		}
		off := j.next
		n := min(pieceSectors, j.src.Sectors-off)
		j.next += n
		j.pending++
		j.mu.Unlock()

		c.sem <- struct{}{}
		buf := <-c.bufs
		if buf == nil {
			buf = make([]byte, c.piece)
		}
		go func() {
			j.piece(buf[:n<<mapper.SectorShift], off)
			c.bufs <- buf
			<-c.sem
			j.mu.Lock()
			j.pending--
			last := j.pending == 0 && j.issued
			j.mu.Unlock()
			if last {
				j.finish()
			}
		}()
	}
}

// piece copies sectors [off, off+len(buf)/512) of the job.
func (j *job) piece(buf []byte, off uint64) {
	bytes := int64(len(buf))
	if j.src.Dev != nil {
		j.c.throttle(bytes)
		err := j.src.Dev.ReadAt([][]byte{buf}, int64(j.src.Sector+off)<<mapper.SectorShift)
		if err != nil {
			j.mu.Lock()
			if j.res.ReadErr == nil {
				j.res.ReadErr = err
			}
			j.failed = true
			j.mu.Unlock()
			return
		}
	}
	var wg sync.WaitGroup
	for i, d := range j.dsts {
		j.mu.Lock()
		skip := j.res.WriteErrs[i] != nil
		j.mu.Unlock()
		if skip {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			at := int64(d.Sector+off) << mapper.SectorShift
			var err error
			if j.src.Dev == nil {
				err = d.Dev.WriteZeroes(at, bytes, false)
			} else {
				err = d.Dev.WriteAt([][]byte{buf}, at)
			}
			if err != nil {
				j.mu.Lock()
				if j.res.WriteErrs[i] == nil {
					j.res.WriteErrs[i] = err
				}
				j.mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

func (j *job) finish() {
	if j.done != nil {
		j.done(j.res)
	}
	j.c.inflight.Done()
}

// throttle waits until a read of n bytes fits the configured rate.
func (c *Copier) throttle(n int64) {
	if c.rate <= 0 {
		return
	}
	c.mu.Lock()
	now := time.Now()
	start := c.next
	if start.Before(now) {
		start = now
	}
	c.next = start.Add(time.Duration(n * int64(time.Second) / c.rate))
	c.mu.Unlock()
	if d := time.Until(start); d > 0 {
		time.Sleep(d)
	}
}

// Close waits for every started copy to finish; later copies fail with
// ErrClosed.
func (c *Copier) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.inflight.Wait()
	return nil
}
