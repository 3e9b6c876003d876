package mapper

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
)

// Device is a mapper device: a name, an optional UUID, a live table that
// serves I/O and an inactive table waiting for resume. Its life cycle is
// dmsetup's: load puts a table in the inactive slot, suspend holds new I/O
// and waits for in-flight I/O (then flushes unless noflush), resume swaps the
// inactive table in and releases held I/O. A guest never sees an error
// because of a reload: its requests wait while the device is suspended.
type Device struct {
	// Immutable.
	name     string
	uuid     string
	readOnly bool
	cache    CacheMode
	locking  LockMode
	m        *Manager
	log      *slog.Logger

	// blockSize is the largest logical block size of the O_DIRECT
	// backends its tables have opened (512 without any).
	blockSize atomic.Int32
	// metaCache is the metadata cache option in bytes (0: the targets'
	// defaults), given to the tables it builds.
	metaCache atomic.Int64

	// I/O admission, lock-free on the fast path: Submit adds itself to
	// inflight, then checks suspended; suspend sets suspended, then waits
	// for inflight to drain. gateMu and gateCond are for the slow paths.
	inflight  atomic.Int64
	suspended atomic.Bool
	live      atomic.Pointer[Table]
	gateMu    sync.Mutex
	gateCond  *sync.Cond
	eventNr   atomic.Uint32
	openCount atomic.Int32
	swaps     atomic.Uint64 // tables made live
	bitmaps   bitmapSet     // dirty bitmaps, read lock-free by Submit

	// Guarded by mu: life-cycle operations run one at a time.
	mu       sync.Mutex
	inactive *Table
	removed  bool
	watchers map[int]func(oldSize, newSize uint64)
	reloads  map[int]func()
	nextW    int
}

func newDevice(m *Manager, name, uuid string, readOnly bool) *Device {
	d := &Device{name: name, uuid: uuid, readOnly: readOnly, m: m,
		log: m.log.With("device", name), watchers: map[int]func(uint64, uint64){}, reloads: map[int]func(){}}
	d.gateCond = sync.NewCond(&d.gateMu)
	return d
}

// Cache returns the device's cache mode.
func (d *Device) Cache() CacheMode { return d.cache }

// BlockSize returns the smallest logical block size the device can be
// exported with: the largest of its O_DIRECT backends' (the tables loaded
// so far), 512 for a device without any.
func (d *Device) BlockSize() int {
	return max(int(d.blockSize.Load()), 1<<SectorShift)
}

func (d *Device) noteBlockSize(n int) {
	for {
		old := d.blockSize.Load()
		if int32(n) <= old || d.blockSize.CompareAndSwap(old, int32(n)) {
			return
		}
	}
}

// Name returns the device's name.
func (d *Device) Name() string { return d.name }

// UUID returns the device's UUID, or "".
func (d *Device) UUID() string { return d.uuid }

// ReadOnly reports whether the device was created read-only.
func (d *Device) ReadOnly() bool { return d.readOnly }

// Size returns the size of the live table in sectors, 0 without one.
func (d *Device) Size() uint64 {
	if t := d.live.Load(); t != nil {
		return t.Size()
	}
	return 0
}

// enter admits one request and returns the live table; it blocks while the
// device is suspended.
func (d *Device) enter() *Table {
	for {
		d.inflight.Add(1)
		if !d.suspended.Load() {
			return d.live.Load()
		}
		d.exit()
		d.gateMu.Lock()
		for d.suspended.Load() {
			d.gateCond.Wait()
		}
		d.gateMu.Unlock()
	}
}

func (d *Device) exit() {
	if d.inflight.Add(-1) == 0 && d.suspended.Load() {
		d.gateMu.Lock()
		d.gateCond.Broadcast()
		d.gateMu.Unlock()
	}
}

// Submit performs r on the live table and returns when it is complete.
// r.Sector is relative to the device. While the device is suspended Submit
// waits, then runs on whatever table is live after resume. It may be called
// from many goroutines at once.
func (d *Device) Submit(r *Request) error {
	t := d.enter()
	defer d.exit()
	if t == nil {
		return fmt.Errorf("%s: %w", d.name, ErrNoTable)
	}
	if r.Op == OpFlush {
		return t.Map(r)
	}
	if err := d.check(t, r); err != nil {
		return err
	}
	if r.Op.IsWrite() {
		// Recorded even when Map fails: part of the range may have
		// changed. The range is taken before Map, which targets may
		// not change it.
		sector, sectors := r.Sector, r.Sectors
		err := t.Map(r)
		d.recordWrite(sector, sectors)
		return err
	}
	return t.Map(r)
}

// check validates a request other than a flush against table t: its
// operation, its range, its data length, and that a write goes to a
// writable device.
func (d *Device) check(t *Table, r *Request) error {
	if r.Op > OpWriteZeroes {
		return Errorf(ErrInvalid, "%s: unknown operation %d", d.name, r.Op)
	}
	size := t.Size()
	if r.Sectors == 0 || r.Sector >= size || r.Sectors > size-r.Sector {
		return Errorf(ErrInvalid, "%s: %s of %d sectors at %d: outside device of %d sectors", d.name, r.Op, r.Sectors, r.Sector, size)
	}
	if r.Op == OpRead || r.Op == OpWrite {
		if uint64(BufsLen(r.Data)) != r.Sectors<<SectorShift {
			return Errorf(ErrInvalid, "%s: %s of %d sectors with %d bytes of data", d.name, r.Op, r.Sectors, BufsLen(r.Data))
		}
	}
	if r.Op.IsWrite() && d.readOnly {
		return fmt.Errorf("%s: %w", d.name, ErrReadOnly)
	}
	return nil
}

// Load builds table text into the inactive slot, replacing any inactive
// table. The live table is untouched whatever happens; an error names the
// line and the reason.
func (d *Device) Load(text string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.removed {
		return fmt.Errorf("%s: %w", d.name, ErrNotFound)
	}
	t, err := BuildTable(text, TableOptions{Device: d.name, ReadOnly: d.readOnly, Opener: deviceOpener{d}, Event: d.targetEvent,
		Logger: d.log, Shared: d.m.Shared, MetadataCache: d.metaCache.Load()})
	if err != nil {
		return err
	}
	if d.inactive != nil {
		d.inactive.Close()
	}
	d.inactive = t
	d.log.Info("table loaded", "size", t.Size(), "targets", len(t.lines))
	return nil
}

// ClearInactive drops the inactive table (dmsetup clear).
func (d *Device) ClearInactive() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inactive != nil {
		d.inactive.Close()
		d.inactive = nil
	}
}

// Suspend stops admitting new I/O and waits for in-flight I/O to finish,
// then flushes the live table unless noflush. Suspending a suspended device
// does nothing.
func (d *Device) Suspend(noflush bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.removed {
		return fmt.Errorf("%s: %w", d.name, ErrNotFound)
	}
	return d.suspendLocked(noflush)
}

func (d *Device) suspendLocked(noflush bool) error {
	if d.suspended.Load() {
		return nil
	}
	t := d.live.Load()
	if t != nil {
		for _, tg := range t.targets {
			if s, ok := tg.(Suspender); ok {
				if err := s.Presuspend(noflush); err != nil {
					return fmt.Errorf("%s: presuspend: %w", d.name, err)
				}
			}
		}
	}
	d.gateMu.Lock()
	d.suspended.Store(true)
	for d.inflight.Load() != 0 {
		d.gateCond.Wait()
	}
	d.gateMu.Unlock()
	if t != nil && !noflush {
		// A failing flush does not stop the suspend: nothing waits on
		// it, and a table with a failed path must stay replaceable.
		if err := t.Map(&Request{Op: OpFlush}); err != nil {
			d.log.Warn("flush on suspend failed", "err", err)
		}
	}
	d.log.Info("suspended", "noflush", noflush)
	return nil
}

func (d *Device) resumeGate() {
	d.gateMu.Lock()
	d.suspended.Store(false)
	d.gateCond.Broadcast()
	d.gateMu.Unlock()
}

// Suspended reports whether the device is suspended.
func (d *Device) Suspended() bool { return d.suspended.Load() }

// Resume makes the inactive table live, if there is one (suspending first
// if needed), and releases held I/O onto it. A size change is announced to
// the resize watchers.
func (d *Device) Resume() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.removed {
		return fmt.Errorf("%s: %w", d.name, ErrNotFound)
	}
	var oldSize, newSize uint64
	swapped := false
	if d.inactive != nil {
		old := d.live.Load()
		if old != nil {
			if err := d.suspendLocked(false); err != nil {
				return err
			}
		} else {
			// No table was live: no I/O can be in flight, so the
			// new table goes live without a suspend.
			d.gateMu.Lock()
			d.suspended.Store(true)
			d.gateMu.Unlock()
		}
		if old != nil {
			oldSize = old.Size()
		}
		newSize = d.inactive.Size()
		d.live.Store(d.inactive)
		d.inactive = nil
		if old == nil {
			d.m.loadBitmaps(d)
		} else if oldSize != newSize {
			d.resizeBitmaps(newSize)
		}
		d.swaps.Add(1)
		swapped = true
		if old != nil {
			if err := old.Close(); err != nil {
				d.log.Warn("closing old table", "err", err)
			}
		}
	}
	if !d.suspended.Load() {
		return nil
	}
	if t := d.live.Load(); t != nil {
		for _, tg := range t.targets {
			if s, ok := tg.(Suspender); ok {
				if err := s.Resume(); err != nil {
					return fmt.Errorf("%s: resume: %w", d.name, err)
				}
			}
		}
	}
	d.resumeGate()
	if oldSize != 0 || !swapped {
		d.log.Info("resumed", "new_table", swapped)
	}
	// A resize is no dm event: the kernel's event counter stays (a
	// thin-pool grown out of out_of_data_space counts only its mode
	// change on 6.1); QMP still reports it.
	if swapped && oldSize != newSize && oldSize != 0 {
		for _, w := range d.watchers {
			w(oldSize, newSize)
		}
		d.m.emit(Event{Device: d.name, Kind: EventResized, Data: map[string]any{"old-size": oldSize, "new-size": newSize}})
	}
	if swapped {
		for _, w := range d.reloads {
			w()
		}
	}
	return nil
}

// Reload loads text and resumes on it in one step (dmsetup reload followed
// by resume). If the text is invalid the live table is untouched.
func (d *Device) Reload(text string) error {
	if err := d.Load(text); err != nil {
		return err
	}
	return d.Resume()
}

// OnResize registers fn to be called after a resume changes the size; the
// returned function unregisters it. fn runs with the device's life-cycle
// lock held and must not call back into the device's life cycle.
func (d *Device) OnResize(fn func(oldSize, newSize uint64)) (cancel func()) {
	d.mu.Lock()
	defer d.mu.Unlock()
	id := d.nextW
	d.nextW++
	d.watchers[id] = fn
	return func() {
		d.mu.Lock()
		delete(d.watchers, id)
		d.mu.Unlock()
	}
}

// Discards reports whether the live table serves discards and
// write-zeroes (Table.Discards); without a live table, neither.
func (d *Device) Discards() (discard, writeZeroes bool) {
	if t := d.live.Load(); t != nil {
		return t.Discards()
	}
	return false, false
}

// OnReload registers fn to be called after a resume made a new table live
// (what the table serves may have changed); the returned function
// unregisters it. fn runs with the device's life-cycle lock held and must
// not call back into the device's life cycle.
func (d *Device) OnReload(fn func()) (cancel func()) {
	d.mu.Lock()
	defer d.mu.Unlock()
	id := d.nextW
	d.nextW++
	d.reloads[id] = fn
	return func() {
		d.mu.Lock()
		delete(d.reloads, id)
		d.mu.Unlock()
	}
}

// Open counts a user of the device (an export, a stacked table); remove is
// refused while the count is above zero.
func (d *Device) Open() { d.openCount.Add(1) }

// Close undoes Open.
func (d *Device) Close() { d.openCount.Add(-1) }

// Message sends a message to the live target covering sector, as
// `dmsetup message NAME SECTOR WORDS...`, and returns its reply.
func (d *Device) Message(sector uint64, args []string) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.live.Load()
	if t == nil {
		return "", fmt.Errorf("%s: %w", d.name, ErrNoTable)
	}
	if len(args) == 0 {
		return "", Errorf(ErrInvalid, "%s: empty message", d.name)
	}
	if sector >= t.Size() {
		return "", Errorf(ErrInvalid, "%s: message sector %d outside device of %d sectors", d.name, sector, t.Size())
	}
	i := t.Find(sector)
	m, ok := t.targets[i].(Messenger)
	if !ok {
		return "", Errorf(ErrInvalid, "%s: target %s does not take messages", d.name, t.lines[i].Type)
	}
	reply, err := m.Message(args)
	if err != nil {
		return "", fmt.Errorf("%s: %s: %w", d.name, t.lines[i].Type, WithClass(err, ErrInvalid))
	}
	return reply, nil
}

// Status returns the live (or, with inactive, the inactive) table's lines
// in the given form. A device without such a table has no lines.
func (d *Device) Status(kind StatusKind, inactive bool) []StatusLine {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.live.Load()
	if inactive {
		t = d.inactive
	}
	if t == nil {
		return nil
	}
	return t.Status(kind)
}

// Info is what `dmsetup info` tells of a device.
type Info struct {
	Name          string
	UUID          string
	Suspended     bool
	ReadOnly      bool
	LiveTable     bool
	InactiveTable bool
	OpenCount     int
	EventNr       uint32
	Size          uint64 // sectors
	Swaps         uint64 // tables made live by resume since creation
}

// State returns "SUSPENDED" or "ACTIVE" as dmsetup prints it.
func (i Info) State() string {
	if i.Suspended {
		return "SUSPENDED"
	}
	return "ACTIVE"
}

// Info returns the device's state.
func (d *Device) Info() Info {
	d.mu.Lock()
	defer d.mu.Unlock()
	return Info{
		Name: d.name, UUID: d.uuid, Suspended: d.suspended.Load(), ReadOnly: d.readOnly,
		LiveTable: d.live.Load() != nil, InactiveTable: d.inactive != nil,
		OpenCount: int(d.openCount.Load()), EventNr: d.eventNr.Load(), Size: d.Size(), Swaps: d.swaps.Load(),
	}
}

// targetEvent is the EventRaiser given to the device's targets.
func (d *Device) targetEvent(target, kind string, data map[string]any) {
	d.eventNr.Add(1)
	d.m.emit(Event{Device: d.name, Target: target, Kind: kind, Data: data})
}

// remove tears the device down: tables are closed and held I/O fails.
func (d *Device) remove(force bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.removed {
		return fmt.Errorf("%s: %w", d.name, ErrNotFound)
	}
	if n := d.openCount.Load(); n > 0 && !force {
		return Errorf(ErrBusy, "%s: device is open (%d users)", d.name, n)
	}
	if t := d.live.Load(); t != nil && !d.suspended.Load() {
		// As the kernel does on destroy: presuspend first, so that a
		// target holding I/O (multipath queueing with no path) lets go.
		for _, tg := range t.targets {
			if s, ok := tg.(Suspender); ok {
				if err := s.Presuspend(false); err != nil {
					d.log.Warn("presuspend on remove", "err", err)
				}
			}
		}
	}
	if !d.suspended.Load() {
		// Wait for in-flight I/O before closing the table under it.
		d.gateMu.Lock()
		d.suspended.Store(true)
		for d.inflight.Load() != 0 {
			d.gateCond.Wait()
		}
		d.gateMu.Unlock()
	}
	d.removed = true
	d.m.saveBitmaps(d)
	var errs []error
	if t := d.live.Swap(nil); t != nil {
		errs = append(errs, t.Map(&Request{Op: OpFlush}), t.Close())
	}
	if d.inactive != nil {
		errs = append(errs, d.inactive.Close())
		d.inactive = nil
	}
	d.resumeGate() // held I/O now finds no table and fails
	d.log.Info("removed", "force", force)
	return errors.Join(errs...)
}
