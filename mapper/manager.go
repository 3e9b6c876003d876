package mapper

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// MapperDir is the directory prefix by which tables name other mapper
// devices: /dev/mapper/NAME, the spelling dmsetup users write.
const MapperDir = "/dev/mapper/"

// Event is a device event: a target's own (thin-pool low water mark, path
// failed) or the core's (EventResized).
type Event struct {
	Device string
	Target string // the raising target's type; empty for core events
	Kind   string
	Data   map[string]any
}

// EventResized is the Kind of the event sent when a resume changes a
// device's size; Data has "old-size" and "new-size" in sectors.
const EventResized = "resized"

// ManagerOptions configure a Manager.
type ManagerOptions struct {
	Logger *slog.Logger // defaults to slog.Default()
	// Events receives every device event. It is called synchronously
	// from the goroutine that raised the event and must not block.
	Events func(Event)
	// Open, when set, opens backends that are not mapper devices instead
	// of the file system: tests use it for memory and crashable backends.
	Open func(name string, readOnly bool) (Backend, error)
	// Dir resolves relative backend paths; empty means the working
	// directory. TABLE output keeps the names as the table wrote them.
	Dir string
	// StateDir holds the devices' persistent dirty bitmaps
	// (NAME.bitmaps); empty: persistent bitmaps are not saved.
	StateDir string
	// Schemes open backends named SCHEME:REST (rbd:POOL/IMAGE) by the
	// scheme before the colon, with the whole name. A name whose prefix
	// is not a scheme here is a path.
	Schemes map[string]OpenFunc
}

// OpenFunc opens a backend by name.
type OpenFunc func(name string, readOnly bool) (Backend, error)

// Manager holds one daemon's devices by name and resolves the backend names
// tables use. Its methods may be called concurrently.
type Manager struct {
	log      *slog.Logger
	events   func(Event)
	open     func(name string, readOnly bool) (Backend, error)
	schemes  map[string]OpenFunc
	dir      string
	stateDir string

	mu      sync.Mutex
	devices map[string]*Device
	files   map[fileKey]*sharedFile
	shared  map[any]any
}

// Shared returns the value stored under key for this manager, storing
// mk() first if there is none. Targets use it, through Ctx.Shared, for
// state shared between tables (the snapshots of an origin).
func (m *Manager) Shared(key any, mk func() any) any {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.shared == nil {
		m.shared = map[any]any{}
	}
	v, ok := m.shared[key]
	if !ok {
		v = mk()
		m.shared[key] = v
	}
	return v
}

// NewManager returns a Manager with no devices.
func NewManager(o ManagerOptions) *Manager {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return &Manager{log: o.Logger, events: o.Events, open: o.Open, schemes: o.Schemes, dir: o.Dir, stateDir: o.StateDir, devices: map[string]*Device{}, files: map[fileKey]*sharedFile{}}
}

func (m *Manager) emit(e Event) {
	if m.events != nil {
		m.events(e)
	}
}

// ValidateName checks a device name as the kernel does: 1 to 127
// characters, no '/', not "." or "..".
func ValidateName(name string) error {
	switch {
	case name == "":
		return Errorf(ErrInvalid, "device name is empty")
	case len(name) > 127:
		return Errorf(ErrInvalid, "device name %q: longer than 127 characters", name)
	case strings.ContainsAny(name, "/\x00") || name == "." || name == "..":
		return Errorf(ErrInvalid, "device name %q: must not contain '/' or be . or ..", name)
	}
	for _, r := range name {
		if r < ' ' || r == 0x7f {
			return Errorf(ErrInvalid, "device name %q: control character", name)
		}
	}
	return nil
}

// DeviceOptions are the settings of a device fixed at creation.
type DeviceOptions struct {
	ReadOnly bool
	// Cache is how the file and block-device backends its tables name
	// are opened: through the page cache, or with O_DIRECT.
	Cache CacheMode
	// MetadataCache bounds the metadata cache of its targets that keep
	// one ([MetadataCacher]), in bytes; 0: their defaults. Unlike the
	// others it can change later (Device.SetMetadataCache).
	MetadataCache int64
	// Locking is whether the files and block devices its tables open
	// carry QEMU's image locks (imagelock.go): LockAuto by default.
	Locking LockMode
}

// Create makes a device with no table (dmsetup create without a table).
func (m *Manager) Create(name, uuid string, readOnly bool) (*Device, error) {
	return m.CreateWith(name, uuid, DeviceOptions{ReadOnly: readOnly})
}

// CreateWith is Create with options.
func (m *Manager) CreateWith(name, uuid string, o DeviceOptions) (*Device, error) {
	readOnly := o.ReadOnly
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	if len(uuid) > 128 {
		return nil, Errorf(ErrInvalid, "uuid %q: longer than 128 characters", uuid)
	}
	if err := CheckMetadataCache(o.MetadataCache); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.devices[name]; ok {
		return nil, Errorf(ErrExists, "device %s already exists", name)
	}
	if uuid != "" {
		for _, d := range m.devices {
			if d.uuid == uuid {
				return nil, Errorf(ErrExists, "uuid %s already used by device %s", uuid, d.name)
			}
		}
	}
	d := newDevice(m, name, uuid, readOnly)
	d.cache = o.Cache
	d.locking = o.Locking
	d.metaCache.Store(o.MetadataCache)
	m.devices[name] = d
	m.log.Info("device created", "device", name, "uuid", uuid, "readonly", readOnly, "cache", o.Cache.String())
	return d, nil
}

// CreateTable makes a device and makes table text live (dmsetup create
// with a table). Nothing is left behind if the table is invalid.
func (m *Manager) CreateTable(name, uuid string, readOnly bool, table string) (*Device, error) {
	return m.CreateTableWith(name, uuid, DeviceOptions{ReadOnly: readOnly}, table)
}

// CreateTableWith is CreateTable with options.
func (m *Manager) CreateTableWith(name, uuid string, o DeviceOptions, table string) (*Device, error) {
	d, err := m.CreateWith(name, uuid, o)
	if err != nil {
		return nil, err
	}
	err = d.Load(table)
	if err == nil {
		err = d.Resume()
	}
	if err != nil {
		m.Remove(name, true)
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	return d, nil
}

// Get returns the device called name.
func (m *Manager) Get(name string) (*Device, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.devices[name]
	if !ok {
		return nil, Errorf(ErrNotFound, "device %s not found", name)
	}
	return d, nil
}

// Devices returns every device sorted by name.
func (m *Manager) Devices() []*Device {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*Device, 0, len(m.devices))
	for _, d := range m.devices {
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b *Device) int { return strings.Compare(a.name, b.name) })
	return out
}

// Remove removes a device. It is refused while the device is open unless
// force is set; forced removal fails held and later I/O.
func (m *Manager) Remove(name string, force bool) error {
	d, err := m.Get(name)
	if err != nil {
		return err
	}
	if err := d.remove(force); err != nil && !d.removed {
		return err
	}
	m.mu.Lock()
	delete(m.devices, name)
	m.mu.Unlock()
	return nil
}

// Close removes every device, users before the devices they use, so that
// each is flushed and its backends closed.
func (m *Manager) Close() error {
	for {
		devs := m.Devices()
		if len(devs) == 0 {
			return nil
		}
		progress := false
		for _, d := range devs {
			if d.openCount.Load() == 0 {
				m.Remove(d.name, false)
				progress = true
			}
		}
		if !progress { // only exports hold the rest open
			for _, d := range devs {
				m.Remove(d.name, true)
			}
		}
	}
}

// deviceOpener opens backends for one device's tables, refusing names that
// would make the device depend on itself.
type deviceOpener struct{ d *Device }

func (o deviceOpener) OpenBackend(name string, readOnly bool) (Backend, error) {
	return o.d.m.openBackend(o.d, name, readOnly)
}

// OpenBackend opens a backend by name for use outside a table.
func (m *Manager) OpenBackend(name string, readOnly bool) (Backend, error) {
	return m.openBackend(nil, name, readOnly)
}

func (m *Manager) openBackend(user *Device, name string, readOnly bool) (Backend, error) {
	if dev, ok := strings.CutPrefix(name, MapperDir); ok {
		d, err := m.Get(dev)
		if err != nil {
			return nil, err
		}
		if user != nil && (d == user || m.dependsOn(d, user)) {
			return nil, Errorf(ErrInvalid, "%s: would make device %s depend on itself", name, user.name)
		}
		if !readOnly && d.readOnly {
			return nil, Errorf(ErrInvalid, "%s: device is read-only", name)
		}
		d.Open()
		return &deviceBackend{d: d, name: name}, nil
	}
	if scheme, _, ok := strings.Cut(name, ":"); ok && m.schemes[scheme] != nil {
		return m.schemes[scheme](name, readOnly)
	}
	if m.open != nil {
		return m.open(name, readOnly)
	}
	path := name
	if isMajorMinor(name) {
		p, err := blockDevPath(name)
		if err != nil {
			return nil, err
		}
		path = p
	}
	cache, locking := CacheWriteback, LockAuto
	if user != nil {
		cache, locking = user.cache, user.locking
	}
	b, err := m.openShared(name, path, readOnly, cache, locking)
	if err == nil && user != nil {
		user.noteBlockSize(fileOf(b).BlockSize())
	}
	return b, err
}

// blockDevPath finds the device node of a block device given as
// major:minor, through sysfs's uevent (DEVNAME), else /dev/block.
func blockDevPath(mm string) (string, error) {
	if data, err := os.ReadFile("/sys/dev/block/" + mm + "/uevent"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if dev, ok := strings.CutPrefix(l, "DEVNAME="); ok && dev != "" && !strings.Contains(dev, "..") {
				return "/dev/" + dev, nil
			}
		}
	}
	if _, err := os.Stat("/dev/block/" + mm); err == nil {
		return "/dev/block/" + mm, nil
	}
	return "", Errorf(ErrNotFound, "%s: no such block device", mm)
}

func isMajorMinor(s string) bool {
	maj, min, ok := strings.Cut(s, ":")
	return ok && maj != "" && min != "" && strings.Trim(maj, "0123456789") == "" && strings.Trim(min, "0123456789") == ""
}

// dependsOn reports whether d's tables use other, directly or through
// further devices.
func (m *Manager) dependsOn(d, other *Device) bool {
	seen := map[*Device]bool{}
	var walk func(*Device) bool
	walk = func(x *Device) bool {
		if x == other {
			return true
		}
		if seen[x] {
			return false
		}
		seen[x] = true
		for _, y := range x.uses() {
			if walk(y) {
				return true
			}
		}
		return false
	}
	return walk(d)
}

// uses returns the devices d's live and inactive tables use.
func (d *Device) uses() []*Device {
	var out []*Device
	tabs := []*Table{d.live.Load()}
	if d.mu.TryLock() { // the caller may hold it while loading
		tabs = append(tabs, d.inactive)
		d.mu.Unlock()
	}
	for _, t := range tabs {
		if t == nil {
			continue
		}
		for _, b := range t.opened {
			if db, ok := b.(*deviceBackend); ok {
				out = append(out, db.d)
			}
		}
	}
	return out
}

type fileKey struct {
	path     string
	readOnly bool
	cache    CacheMode // an O_DIRECT and a cached descriptor are distinct
	locking  LockMode
}

// sharedFile is one open file shared by every table line that names it, so
// that flushes of a many-line table coalesce into one fdatasync.
type sharedFile struct {
	*fileBackend
	refs   int
	unlock func() // releases its image locks; nil without
}

// fileHandle is one table's use of a sharedFile.
type fileHandle struct {
	*fileBackend
	name string
	m    *Manager
	key  fileKey
	once sync.Once
}

func (h *fileHandle) Name() string { return h.name }

// Identity implements Identifier: the shared open file.
func (h *fileHandle) Identity() any { return h.fileBackend }

func (h *fileHandle) Close() error {
	var err error
	h.once.Do(func() { err = h.m.releaseShared(h.key) })
	return err
}

func (m *Manager) openShared(name, path string, readOnly bool, cache CacheMode, locking LockMode) (Backend, error) {
	if !filepath.IsAbs(path) && m.dir != "" {
		path = filepath.Join(m.dir, path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	key := fileKey{abs, readOnly, cache, locking}
	m.mu.Lock()
	defer m.mu.Unlock()
	sf := m.files[key]
	if sf == nil {
		fb, err := openFile(abs, readOnly, cache)
		if err != nil {
			return nil, WithClass(err, ErrNotFound)
		}
		fb.name = name
		unlock, err := lockImage(fb, readOnly, locking, m.log)
		if err != nil {
			fb.Close()
			return nil, err
		}
		sf = &sharedFile{fileBackend: fb, unlock: unlock}
		m.files[key] = sf
	}
	sf.refs++
	return &fileHandle{fileBackend: sf.fileBackend, name: name, m: m, key: key}, nil
}

func (m *Manager) releaseShared(key fileKey) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	sf := m.files[key]
	if sf == nil {
		return nil
	}
	sf.refs--
	if sf.refs > 0 {
		return nil
	}
	delete(m.files, key)
	err := sf.fileBackend.Close()
	if sf.unlock != nil {
		sf.unlock() // after the last write
	}
	return err
}

// deviceBackend is another mapper device used as a backend (stacking).
type deviceBackend struct {
	d    *Device
	name string
	once sync.Once
}

func (b *deviceBackend) Name() string { return b.name }

// Identity implements Identifier: the device.
func (b *deviceBackend) Identity() any { return b.d }

func (b *deviceBackend) submit(op Op, bufs [][]byte, off, n int64, unmap bool) error {
	if off%SectorSize != 0 || n%SectorSize != 0 {
		return Errorf(ErrInvalid, "%s: %s at byte %d+%d: not sector aligned", b.name, op, off, n)
	}
	return b.d.Submit(&Request{Op: op, Sector: uint64(off) >> SectorShift, Sectors: uint64(n) >> SectorShift, Data: bufs, Unmap: unmap})
}

func (b *deviceBackend) ReadAt(bufs [][]byte, off int64) error {
	return b.submit(OpRead, bufs, off, int64(BufsLen(bufs)), false)
}

func (b *deviceBackend) WriteAt(bufs [][]byte, off int64) error {
	return b.submit(OpWrite, bufs, off, int64(BufsLen(bufs)), false)
}

// TryReadAt implements NowaitBackend: the device's TrySubmit.
func (b *deviceBackend) TryReadAt(bufs [][]byte, off int64, resident bool) error {
	return b.trySubmit(OpRead, bufs, off, resident)
}

// TryWriteAt implements NowaitBackend: the device's TrySubmit.
func (b *deviceBackend) TryWriteAt(bufs [][]byte, off int64, resident bool) error {
	return b.trySubmit(OpWrite, bufs, off, resident)
}

func (b *deviceBackend) trySubmit(op Op, bufs [][]byte, off int64, resident bool) error {
	n := int64(BufsLen(bufs))
	if off%SectorSize != 0 || n%SectorSize != 0 {
		return Errorf(ErrInvalid, "%s: %s at byte %d+%d: not sector aligned", b.name, op, off, n)
	}
	return b.d.TrySubmit(&Request{Op: op, Sector: uint64(off) >> SectorShift, Sectors: uint64(n) >> SectorShift, Data: bufs, Resident: resident})
}

func (b *deviceBackend) Flush() error { return b.d.Submit(&Request{Op: OpFlush}) }

func (b *deviceBackend) Discard(off, n int64) error { return b.submit(OpDiscard, nil, off, n, false) }

func (b *deviceBackend) WriteZeroes(off, n int64, unmap bool) error {
	return b.submit(OpWriteZeroes, nil, off, n, unmap)
}

func (b *deviceBackend) Size() (int64, error) { return int64(b.d.Size()) << SectorShift, nil }

func (b *deviceBackend) Close() error {
	b.once.Do(b.d.Close)
	return nil
}
