// Package snapshot holds the copy-on-write snapshot targets of the kernel's
// dm-snapshot (Documentation/admin-guide/device-mapper/snapshot.rst, kernel
// 6.1): snapshot-origin, snapshot and snapshot-merge, with the persistent
// exception store in the kernel's on-disk format (so that a COW device moves
// between vhostdm and Linux either way) and the transient one.
//
//	import _ "github.com/vhostdm/vhostdm/targets/snapshot"
//
// # Origins and their snapshots
//
// Writes to an origin must first copy the old data of each chunk to every
// snapshot of that origin, so the targets of different devices share state:
// the kernel keeps a hash of origins keyed by the origin's block device.
// vhostdm keys the same registry by the identity of the storage behind the
// origin Backend ([identity]): the *Device of a /dev/mapper/NAME backend, the
// shared open file of a path, the backend value itself otherwise. Two tables
// of one Manager naming the same storage meet at one entry whatever spelling
// they use; tables of different Managers never do, since their backends are
// different objects. The registry is process-wide only because a target
// constructor cannot reach its Manager; entries live exactly as long as some
// table holds the origin, so nothing outlives the tables that created it.
// COW devices are tracked the same way: a table loaded over a COW device
// that a live snapshot already uses takes that snapshot's exception store
// over at resume (the kernel's handover), instead of reading metadata the
// other is still writing — this is how a snapshot reload and the switch
// from snapshot to snapshot-merge work.
//
// # Locking
//
// An origin has a range lock over its sectors. A write through the origin
// holds its range exclusively, widened to the largest chunk of its
// snapshots, while it copies chunks out and writes; reads of a snapshot that
// fall through to the origin hold the chunk shared. So a snapshot never reads
// origin data that a write has half replaced, and a chunk is copied out once
// per snapshot before its first change. Each snapshot has a lock over its
// exception table, and a chunk being copied has a pending entry that later
// writers to it wait on.
package snapshot

import (
	"fmt"
	"reflect"
	"sync"
	"unsafe"

	"github.com/vhostdm/vhostdm/copier"
	"github.com/vhostdm/vhostdm/mapper"
)

// snapshot-origin passes I/O to the origin device and copies each chunk a
// write changes to every snapshot of the origin first.
//
//	snapshot-origin <origin>
//
// INFO is empty; TABLE is "<origin>" as the table named it
// ("0 2048 snapshot-origin /dev/mapper/base-real"; the kernel prints
// major:minor).
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "snapshot-origin", Version: [3]int{1, 9, 0}, New: newOrigin})
}

// snapRegistry maps storage identities to the origins and COW devices in
// use by one Manager's tables (the kernel's _origins hash), and holds the
// copier they share: its buffer pool bounds the memory of every copy-out
// and merge. There is one per Manager, reached through Ctx.Shared.
type snapRegistry struct {
	kcopyd *copier.Copier

	mu      sync.Mutex
	origins map[any]*origin
	cows    map[any]*cowState
}

// registryKey is the Ctx.Shared key of a Manager's snapRegistry.
type registryKey struct{}

func newRegistry() any {
	return &snapRegistry{kcopyd: copier.New(copier.Options{MemoryBytes: 8 << 20, PieceBytes: 128 << 10}),
		origins: map[any]*origin{}, cows: map[any]*cowState{}}
}

// sharedRegistry returns the registry of the Manager loading c's table.
func sharedRegistry(c *mapper.Ctx) *snapRegistry {
	return c.Shared(registryKey{}, newRegistry).(*snapRegistry)
}

// identityKey names the storage behind a backend. It holds the pointer
// itself, not its address as a number, so that the storage cannot be freed
// and its address reused while an entry names it.
type identityKey struct {
	t reflect.Type
	p unsafe.Pointer
}

// identity returns a comparable value that is equal for two Backends over
// the same storage. A backend may say so itself with an Identity method;
// otherwise the mapper's handles, whose first field points to the shared
// storage (the open file, the Device), are recognised; anything else is
// its own identity.
func identity(b mapper.Backend) any {
	if id, ok := b.(interface{ Identity() any }); ok {
		return id.Identity()
	}
	v := reflect.ValueOf(b)
	if v.Kind() == reflect.Pointer && !v.IsNil() && v.Elem().Kind() == reflect.Struct && v.Elem().NumField() > 0 {
		if f := v.Elem().Field(0); f.Kind() == reflect.Pointer && !f.IsNil() {
			return identityKey{f.Type(), f.UnsafePointer()}
		}
	}
	return identityKey{v.Type(), v.UnsafePointer()}
}

// origin is the state shared by every target that uses one origin device.
type origin struct {
	key   any
	reg   *snapRegistry
	locks rangeLock

	// Guarded by mu.
	mu    sync.Mutex
	snaps []*cowState // registered snapshots
	refs  int         // guarded by reg.mu
}

func getOrigin(reg *snapRegistry, dev mapper.Backend) *origin {
	key := identity(dev)
	reg.mu.Lock()
	defer reg.mu.Unlock()
	o := reg.origins[key]
	if o == nil {
		o = &origin{key: key, reg: reg}
		reg.origins[key] = o
	}
	o.refs++
	return o
}

func (o *origin) put() {
	o.reg.mu.Lock()
	defer o.reg.mu.Unlock()
	o.refs--
	if o.refs == 0 {
		delete(o.reg.origins, o.key)
	}
}

func (o *origin) register(cs *cowState) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, s := range o.snaps {
		if s == cs {
			return
		}
	}
	o.snaps = append(o.snaps, cs)
}

// merging reports whether a snapshot-merge table serves one of the
// origin's snapshots other than except.
func (o *origin) merging(except *cowState) bool {
	o.mu.Lock()
	snaps := append([]*cowState(nil), o.snaps...)
	o.mu.Unlock()
	for _, cs := range snaps {
		if cs == except {
			continue
		}
		cs.mu.Lock()
		m := cs.owner != nil && cs.owner.merge
		cs.mu.Unlock()
		if m {
			return true
		}
	}
	return false
}

func (o *origin) unregister(cs *cowState) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for i, s := range o.snaps {
		if s == cs {
			o.snaps = append(o.snaps[:i], o.snaps[i+1:]...)
			return
		}
	}
}

// targets returns the snapshots a write must copy out to (valid, not
// merging, not exclude) and the largest chunk size among all snapshots.
func (o *origin) targets(exclude *cowState) ([]*cowState, uint64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []*cowState
	var maxChunk uint64 = 1
	for _, s := range o.snaps {
		maxChunk = max(maxChunk, s.chunk)
		if s != exclude && s.live() {
			out = append(out, s)
		}
	}
	return out, maxChunk
}

// lockWrite locks [sector, sector+n) of the origin exclusively, widened to
// whole chunks of every snapshot, and returns the snapshots to copy out to.
func (o *origin) lockWrite(sector, n uint64, exclude *cowState) (snaps []*cowState, unlock func()) {
	snaps, maxChunk := o.targets(exclude)
	lo := sector &^ (maxChunk - 1)
	hi := (sector + n + maxChunk - 1) &^ (maxChunk - 1)
	return snaps, o.locks.lock(lo, hi, true)
}

// write performs an origin write: it copies out the old data of
// [sector, sector+n) to every snapshot that lacks it, then calls do. The
// caller holds no origin lock.
func (o *origin) write(sector, n uint64, exclude *cowState, do func() error) error {
	snaps, unlock := o.lockWrite(sector, n, exclude)
	defer unlock()
	copyOut(snaps, sector, n)
	return do()
}

// copyOut makes sure each snapshot has its own copy of every chunk that
// overlaps [sector, sector+n); it runs under the origin's exclusive lock.
// A snapshot that cannot take the copy is invalidated; the origin write
// goes on.
func copyOut(snaps []*cowState, sector, n uint64) {
	var wg sync.WaitGroup
	for _, cs := range snaps {
		cs.mu.Lock() // a resume handing the store over may change length
		length := cs.length
		cs.mu.Unlock()
		if sector >= length {
			continue
		}
		end := min(sector+n, length)
		for chunk := sector >> cs.shift; chunk<<cs.shift < end; chunk++ {
			p, newChunk, err := cs.begin(chunk)
			if err != nil {
				cs.invalidate(err)
				break
			}
			if p == nil { // already there
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := cs.copyChunk(chunk, newChunk)
				if err == nil {
					err = cs.st.commit(chunk, newChunk)
				}
				cs.end(p, chunk, newChunk, err)
			}()
		}
	}
	wg.Wait()
}

// originTarget is snapshot-origin.
type originTarget struct {
	dev    mapper.Backend
	o      *origin
	length uint64
}

func newOrigin(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) != 1 {
		return nil, fmt.Errorf("want 1 argument <origin>, got %d", len(args))
	}
	dev, err := c.Open(args[0])
	if err != nil {
		return nil, err
	}
	return &originTarget{dev: dev, o: getOrigin(sharedRegistry(c), dev), length: c.Length}, nil
}

func (t *originTarget) Map(r *mapper.Request) error {
	switch r.Op {
	case mapper.OpRead:
		return t.dev.ReadAt(r.Data, int64(r.Sector)<<mapper.SectorShift)
	case mapper.OpFlush:
		return t.dev.Flush()
	}
	return t.o.write(r.Sector, r.Sectors, nil, func() error { return mapper.MapBackend(t.dev, r.Sector, r) })
}

func (t *originTarget) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusTable {
		return t.dev.Name()
	}
	return ""
}

func (t *originTarget) Close() error {
	t.o.put()
	return nil
}

// Areas lists the origin area the target maps.
func (t *originTarget) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	return fn(t.dev, 0, t.length)
}
