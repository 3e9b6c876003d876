package replicator

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

func init() {
	retryInterval = 100 * time.Millisecond
	checkpointInterval = 20 * time.Millisecond
	tickInterval = 5 * time.Millisecond
}

// fake is a memory backend that tests can slow, block, cut and kill.
type fake struct {
	*mappertest.Mem
	dead *atomic.Bool // the process using it was killed

	mu    sync.Mutex
	cut   bool
	delay time.Duration
	gate  chan struct{} // writes wait until it is closed
}

func (f *fake) before() error {
	f.mu.Lock()
	cut, delay, gate := f.cut, f.delay, f.gate
	f.mu.Unlock()
	if gate != nil {
		<-gate
	}
	if delay > 0 {
		time.Sleep(delay)
	}
	if f.dead.Load() {
		return fmt.Errorf("%s: process killed: %w", f.Name(), mapper.ErrIO)
	}
	if cut {
		return fmt.Errorf("%s: link cut: %w", f.Name(), mapper.ErrIO)
	}
	return nil
}

func (f *fake) ReadAt(bufs [][]byte, off int64) error {
	if f.dead.Load() {
		return fmt.Errorf("%s: process killed: %w", f.Name(), mapper.ErrIO)
	}
	return f.Mem.ReadAt(bufs, off)
}

func (f *fake) WriteAt(bufs [][]byte, off int64) error {
	if err := f.before(); err != nil {
		return err
	}
	return f.Mem.WriteAt(bufs, off)
}

func (f *fake) WriteZeroes(off, n int64, unmap bool) error {
	if err := f.before(); err != nil {
		return err
	}
	return f.Mem.WriteZeroes(off, n, unmap)
}

func (f *fake) Discard(off, n int64) error {
	if err := f.before(); err != nil {
		return err
	}
	return f.Mem.Discard(off, n)
}

func (f *fake) Flush() error {
	if err := f.before(); err != nil {
		return err
	}
	return f.Mem.Flush()
}

func (f *fake) setCut(v bool) {
	f.mu.Lock()
	f.cut = v
	f.mu.Unlock()
}

func (f *fake) setDelay(d time.Duration) {
	f.mu.Lock()
	f.delay = d
	f.mu.Unlock()
}

// block makes writes wait until the returned function is called.
func (f *fake) block() (release func()) {
	g := make(chan struct{})
	f.mu.Lock()
	f.gate = g
	f.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			f.mu.Lock()
			f.gate = nil
			f.mu.Unlock()
			close(g)
		})
	}
}

// world is the storage of one test: memory backends that survive
// "process" restarts, and the manager of the current process.
type world struct {
	t     *testing.T
	mems  map[string]*mappertest.Mem
	sizes map[string]int
	mu    sync.Mutex
	fakes map[string]*fake
	dead  *atomic.Bool
	m     *mapper.Manager

	evMu   sync.Mutex
	events []mapper.Event
}

const (
	devBytes = 512 << 10 // each replicated device
	logBytes = 1 << 20
)

func newWorld(t *testing.T) *world {
	w := &world{t: t, mems: map[string]*mappertest.Mem{}, sizes: map[string]int{}}
	w.start()
	return w
}

// start begins a "process": a new manager over the same storage.
func (w *world) start() {
	w.mu.Lock()
	w.fakes = map[string]*fake{}
	w.dead = new(atomic.Bool)
	w.mu.Unlock()
	w.m = mapper.NewManager(mapper.ManagerOptions{Open: w.open, Logger: slog.New(slog.DiscardHandler), Events: func(e mapper.Event) {
		w.evMu.Lock()
		w.events = append(w.events, e)
		w.evMu.Unlock()
	}})
	m := w.m
	w.t.Cleanup(func() { m.Close() })
}

// kill ends the current process as kill -9 would, then drops what the
// backends had not flushed (the harsher power-cut model).
func (w *world) kill() {
	w.dead.Store(true)
	time.Sleep(20 * time.Millisecond)
	for _, m := range w.mems {
		m.Crash()
	}
	w.start()
}

func (w *world) open(name string, readOnly bool) (mapper.Backend, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if f := w.fakes[name]; f != nil {
		return f, nil
	}
	m := w.mems[name]
	if m == nil {
		size := devBytes
		if strings.HasPrefix(name, "log") {
			size = logBytes
		}
		if s, ok := w.sizes[name]; ok {
			size = s
		}
		m = mappertest.NewMem(name, size)
		w.mems[name] = m
	}
	f := &fake{Mem: m, dead: w.dead}
	w.fakes[name] = f
	return f, nil
}

func (w *world) fake(name string) *fake {
	w.open(name, false)
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.fakes[name]
}

func (w *world) create(name, table string) *mapper.Device {
	w.t.Helper()
	d, err := w.m.CreateTable(name, "", false, table)
	if err != nil {
		w.t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func (w *world) engine(name string) *engine {
	dir := w.m.Shared(directoryKey{}, func() any {
		return &directory{byKey: map[any]*engine{}, byName: map[string]*engine{}}
	}).(*directory)
	dir.mu.Lock()
	defer dir.mu.Unlock()
	return dir.byName[name]
}

func (w *world) eventKinds() []string {
	w.evMu.Lock()
	defer w.evMu.Unlock()
	var out []string
	for _, e := range w.events {
		out = append(out, e.Kind)
	}
	return out
}

func (w *world) waitEvent(kind string) {
	w.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, k := range w.eventKinds() {
			if k == kind {
				return
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	w.t.Fatalf("no %s event; got %v", kind, w.eventKinds())
}

func status(d *mapper.Device, kind mapper.StatusKind) string {
	ls := d.Status(kind, false)
	if len(ls) != 1 {
		return ""
	}
	return ls[0].Params
}

func write(t *testing.T, d *mapper.Device, sector uint64, data []byte) {
	t.Helper()
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: sector, Sectors: uint64(len(data)) / mapper.SectorSize, Data: [][]byte{data}}); err != nil {
		t.Fatalf("write %s at %d: %v", d.Name(), sector, err)
	}
}

func readAll(t *testing.T, d *mapper.Device) []byte {
	t.Helper()
	buf := make([]byte, d.Size()*mapper.SectorSize)
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: d.Size(), Data: [][]byte{buf}}); err != nil {
		t.Fatalf("read %s: %v", d.Name(), err)
	}
	return buf
}

// drained reports whether every site has consumed the whole log, is in
// service and in sync.
func (e *engine) drained() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.localWM != e.nextSeq-1 {
		return false
	}
	for _, s := range e.sites {
		if s.applied != e.nextSeq-1 || s.dirty || s.state != siteActive {
			return false
		}
	}
	return true
}

func waitDrained(t *testing.T, e *engine) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !e.drained() {
		if time.Now().After(deadline) {
			t.Fatalf("log did not drain")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// sameAs fails unless the memory backends hold want.
func (w *world) sameAs(t *testing.T, want []byte, names ...string) {
	t.Helper()
	for _, n := range names {
		got := w.mems[n].Bytes()
		if !bytes.Equal(got, want) {
			i := 0
			for i < len(got) && got[i] == want[i] {
				i++
			}
			t.Errorf("%s differs from the primary at byte %d (sector %d)", n, i, i/mapper.SectorSize)
		}
	}
}
