package mapper

import (
	"fmt"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
)

// Dirty bitmaps: QEMU's model (block/dirty-bitmap.c) on a mapper device.
// A bitmap has one bit per granularity bytes of the device; every write,
// discard and write-zeroes that Device.Submit completes (or fails: part of
// it may have landed) sets the bits it touches in every recording bitmap,
// whoever submitted it (a vhost or NBD export, the replication agent, a
// stacked table). The hot path is lock-free and allocation-free: one
// atomic load of the device's bitmap list and an atomic OR per word.

// Bitmap granularity limits, QEMU's: a power of two from 512 bytes to 2 GiB.
const (
	MinBitmapGranularity     = 512
	MaxBitmapGranularity     = 1 << 31
	DefaultBitmapGranularity = 64 << 10
)

// DirtyBitmap is one named dirty bitmap of a Device.
type DirtyBitmap struct {
	name       string
	gran       uint64 // bytes per bit
	sectShift  uint   // log2(gran) - SectorShift
	persistent bool

	enabled      atomic.Bool
	inconsistent atomic.Bool // found in use after a crash: never records, only removable
	busy         atomic.Int32
	words        atomic.Pointer[[]atomic.Uint64]
	nbits        atomic.Uint64
}

// BitmapInfo is the query-block form of a bitmap (QEMU's BlockDirtyInfo).
type BitmapInfo struct {
	Name         string `json:"name"`
	Count        uint64 `json:"count"` // dirty bytes
	Granularity  uint64 `json:"granularity"`
	Recording    bool   `json:"recording"`
	Busy         bool   `json:"busy"`
	Persistent   bool   `json:"persistent"`
	Inconsistent bool   `json:"inconsistent,omitempty"`
}

func newBitmap(name string, gran uint64, persistent bool, sectors uint64) *DirtyBitmap {
	b := &DirtyBitmap{name: name, gran: gran, sectShift: uint(bits.TrailingZeros64(gran)) - SectorShift, persistent: persistent}
	b.resize(sectors)
	return b
}

// resize sizes the bitmap for a device of sectors; bits inside both sizes
// are kept, new bits are clean. It must not race with set: the device
// calls it while suspended.
func (b *DirtyBitmap) resize(sectors uint64) {
	n := (sectors + 1<<b.sectShift - 1) >> b.sectShift
	w := make([]atomic.Uint64, (n+63)/64)
	if old := b.words.Load(); old != nil {
		for i := range min(len(w), len(*old)) {
			w[i].Store((*old)[i].Load())
		}
		if n%64 != 0 && int(n/64) < len(w) {
			w[n/64].And(1<<(n%64) - 1)
		}
	}
	b.words.Store(&w)
	b.nbits.Store(n)
}

// Name returns the bitmap's name.
func (b *DirtyBitmap) Name() string { return b.name }

// Granularity returns the bytes covered by one bit.
func (b *DirtyBitmap) Granularity() uint64 { return b.gran }

// Persistent reports whether the bitmap is saved across a clean restart.
func (b *DirtyBitmap) Persistent() bool { return b.persistent }

// Enabled reports whether the bitmap is enabled (recording unless inconsistent).
func (b *DirtyBitmap) Enabled() bool { return b.enabled.Load() }

// Inconsistent reports whether the bitmap was found in use after a crash.
func (b *DirtyBitmap) Inconsistent() bool { return b.inconsistent.Load() }

// Recording reports whether writes set bits in the bitmap.
func (b *DirtyBitmap) Recording() bool { return b.enabled.Load() && !b.inconsistent.Load() }

// Acquire marks the bitmap busy (exported); Release undoes it.
func (b *DirtyBitmap) Acquire() { b.busy.Add(1) }

// Release undoes Acquire.
func (b *DirtyBitmap) Release() { b.busy.Add(-1) }

// Busy reports whether an export uses the bitmap.
func (b *DirtyBitmap) Busy() bool { return b.busy.Load() > 0 }

// set marks the bits covering sectors [sector, sector+n).
func (b *DirtyBitmap) set(sector, n uint64) {
	if n == 0 {
		return
	}
	wp := b.words.Load()
	w := *wp
	first := sector >> b.sectShift
	last := (sector + n - 1) >> b.sectShift
	if lim := uint64(len(w)) * 64; last >= lim {
		if first >= lim {
			return
		}
		last = lim - 1
	}
	for i := first; i <= last; {
		wi := i / 64
		lo := i % 64
		hi := uint64(63)
		if wi == last/64 {
			hi = last % 64
		}
		mask := (^uint64(0) >> (63 - hi)) &^ (1<<lo - 1)
		if w[wi].Load()&mask != mask {
			w[wi].Or(mask)
		}
		i = (wi + 1) * 64
	}
}

// Get reports whether bit i is set.
func (b *DirtyBitmap) get(w []atomic.Uint64, i uint64) bool {
	return w[i/64].Load()&(1<<(i%64)) != 0
}

// Extent is a run of bytes with one state.
type Extent struct {
	Length uint64
	Dirty  bool
}

// Extents calls fn for runs of equal state covering bytes [off, off+n),
// clipped to the bitmap; fn returns false to stop.
func (b *DirtyBitmap) Extents(off, n uint64, fn func(e Extent) bool) {
	w := *b.words.Load()
	nb := b.nbits.Load()
	end := off + n
	for off < end {
		i := off / b.gran
		if i >= nb {
			return
		}
		d := b.get(w, i)
		var same uint64 // a word of bits all equal to d
		if d {
			same = ^uint64(0)
		}
		j := i + 1
		for j < nb && j*b.gran < end {
			if j%64 == 0 && j+64 <= nb && w[j/64].Load() == same {
				j += 64 // a whole word of the same state
				continue
			}
			if b.get(w, j) != d {
				break
			}
			j++
		}
		runEnd := min(j*b.gran, end)
		if !fn(Extent{Length: runEnd - off, Dirty: d}) {
			return
		}
		off = runEnd
	}
}

// Count returns the number of dirty bytes (QEMU's count).
func (b *DirtyBitmap) Count() uint64 {
	var c uint64
	w := *b.words.Load()
	for i := range w {
		c += uint64(bits.OnesCount64(w[i].Load()))
	}
	return c * b.gran
}

// Info returns the bitmap's query-block form.
func (b *DirtyBitmap) Info() BitmapInfo {
	return BitmapInfo{Name: b.name, Count: b.Count(), Granularity: b.gran, Recording: b.Recording(),
		Busy: b.Busy(), Persistent: b.persistent, Inconsistent: b.Inconsistent()}
}

// clear zeroes every bit.
func (b *DirtyBitmap) clear() {
	w := *b.words.Load()
	for i := range w {
		w[i].Store(0)
	}
}

// snapshot returns the bits as little-endian words, for persistence.
func (b *DirtyBitmap) snapshot() []uint64 {
	w := *b.words.Load()
	out := make([]uint64, len(w))
	for i := range w {
		out[i] = w[i].Load()
	}
	return out
}

// bitmapSet is a device's bitmaps. The list is copied on change and read
// lock-free by Submit.
type bitmapSet struct {
	mu   sync.Mutex // serializes changes of the list and of bitmap states
	list atomic.Pointer[[]*DirtyBitmap]
}

// recordWrite sets the bits of sectors [sector, sector+n) in every
// recording bitmap.
func (d *Device) recordWrite(sector, n uint64) {
	lp := d.bitmaps.list.Load()
	if lp == nil {
		return
	}
	for _, b := range *lp {
		if b.Recording() {
			b.set(sector, n)
		}
	}
}

// Bitmaps returns the device's bitmaps sorted by name.
func (d *Device) Bitmaps() []*DirtyBitmap {
	lp := d.bitmaps.list.Load()
	if lp == nil {
		return nil
	}
	return slices.Clone(*lp)
}

// Bitmap returns the bitmap called name, QEMU's error text if none.
func (d *Device) Bitmap(name string) (*DirtyBitmap, error) {
	for _, b := range d.Bitmaps() {
		if b.name == name {
			return b, nil
		}
	}
	return nil, Errorf(ErrNotFound, "Dirty bitmap '%s' not found", name)
}

// BitmapOptions are block-dirty-bitmap-add's arguments.
type BitmapOptions struct {
	Name        string
	Granularity uint64 // 0: DefaultBitmapGranularity
	Persistent  bool
	Disabled    bool
}

// AddBitmap creates a bitmap, clean, recording unless o.Disabled.
func (d *Device) AddBitmap(o BitmapOptions) (*DirtyBitmap, error) {
	if o.Name == "" {
		return nil, Errorf(ErrInvalid, "Bitmap name cannot be empty")
	}
	if len(o.Name) > 1023 {
		return nil, Errorf(ErrInvalid, "Bitmap name is too long")
	}
	if o.Granularity == 0 {
		o.Granularity = DefaultBitmapGranularity
	}
	if g := o.Granularity; g < MinBitmapGranularity || g > MaxBitmapGranularity || g&(g-1) != 0 {
		return nil, Errorf(ErrInvalid, "Granularity must be power of 2 between 512 and 2147483648")
	}
	if o.Persistent && d.m.stateDir == "" {
		return nil, Errorf(ErrInvalid, "Cannot store persistent bitmap '%s': the daemon has no state directory", o.Name)
	}
	d.bitmaps.mu.Lock()
	defer d.bitmaps.mu.Unlock()
	if _, err := d.Bitmap(o.Name); err == nil {
		return nil, Errorf(ErrExists, "Bitmap already exists: %s", o.Name)
	}
	b := newBitmap(o.Name, o.Granularity, o.Persistent, d.Size())
	b.enabled.Store(!o.Disabled)
	d.insertBitmap(b)
	if o.Persistent {
		d.m.persistBitmaps(d, true)
	}
	return b, nil
}

// CanPersistBitmaps reports whether persistent bitmaps can be added (the
// manager has a state directory).
func (d *Device) CanPersistBitmaps() bool { return d.m.stateDir != "" }

// insertBitmap adds b to the list; bitmaps.mu is held.
func (d *Device) insertBitmap(b *DirtyBitmap) {
	l := d.Bitmaps()
	l = append(l, b)
	slices.SortFunc(l, func(x, y *DirtyBitmap) int {
		switch {
		case x.name < y.name:
			return -1
		case x.name > y.name:
			return 1
		}
		return 0
	})
	d.bitmaps.list.Store(&l)
}

// usable checks a bitmap for a change, as QEMU's bdrv_dirty_bitmap_check.
func (b *DirtyBitmap) usable() error {
	if b.Busy() {
		return Errorf(ErrBusy, "Bitmap '%s' is currently in use by another operation and cannot be used", b.name)
	}
	if b.Inconsistent() {
		return Errorf(ErrInvalid, "Bitmap '%s' is inconsistent and cannot be used", b.name)
	}
	return nil
}

// CheckUsable returns QEMU's error if the bitmap cannot be used for a
// backup (inconsistent) or is busy.
func (b *DirtyBitmap) CheckUsable() error { return b.usable() }

// RemoveBitmap deletes a bitmap (also an inconsistent one).
func (d *Device) RemoveBitmap(name string) error {
	d.bitmaps.mu.Lock()
	defer d.bitmaps.mu.Unlock()
	b, err := d.Bitmap(name)
	if err != nil {
		return err
	}
	if b.Busy() {
		return Errorf(ErrBusy, "Bitmap '%s' is currently in use by another operation and cannot be used", name)
	}
	l := slices.DeleteFunc(d.Bitmaps(), func(x *DirtyBitmap) bool { return x == b })
	d.bitmaps.list.Store(&l)
	if b.persistent {
		d.m.persistBitmaps(d, true)
	}
	return nil
}

// change runs fn on a usable bitmap under the set's lock.
func (d *Device) change(name string, fn func(b *DirtyBitmap) error) error {
	d.bitmaps.mu.Lock()
	defer d.bitmaps.mu.Unlock()
	b, err := d.Bitmap(name)
	if err != nil {
		return err
	}
	if err := b.usable(); err != nil {
		return err
	}
	return fn(b)
}

// ClearBitmap clears every bit.
func (d *Device) ClearBitmap(name string) error {
	return d.change(name, func(b *DirtyBitmap) error { b.clear(); return nil })
}

// EnableBitmap makes the bitmap record writes.
func (d *Device) EnableBitmap(name string) error {
	return d.change(name, func(b *DirtyBitmap) error { b.enabled.Store(true); return nil })
}

// DisableBitmap stops the bitmap recording writes; its bits stay.
func (d *Device) DisableBitmap(name string) error {
	return d.change(name, func(b *DirtyBitmap) error { b.enabled.Store(false); return nil })
}

// MergeBitmaps sets in target every bit set in the sources (any
// granularity: a dirty source range dirties every target bit it touches).
func (d *Device) MergeBitmaps(target string, sources []string) error {
	var srcs []*DirtyBitmap
	for _, s := range sources {
		b, err := d.Bitmap(s)
		if err != nil {
			return err
		}
		if b.Inconsistent() {
			return b.usable()
		}
		srcs = append(srcs, b)
	}
	return d.change(target, func(t *DirtyBitmap) error {
		for _, s := range srcs {
			if s == t {
				continue
			}
			size := s.nbits.Load() * s.gran
			var off uint64
			s.Extents(0, size, func(e Extent) bool {
				if e.Dirty {
					t.set(off>>SectorShift, (e.Length+SectorSize-1)>>SectorShift)
				}
				off += e.Length
				return true
			})
		}
		return nil
	})
}

// resizeBitmaps follows a size change; the device is suspended.
func (d *Device) resizeBitmaps(sectors uint64) {
	for _, b := range d.Bitmaps() {
		b.resize(sectors)
	}
}

// String names the bitmap for logs.
func (b *DirtyBitmap) String() string { return fmt.Sprintf("%s(%d)", b.name, b.gran) }
