package mapper

import (
	"fmt"
	"log/slog"
	"strconv"
	"strings"
)

// StatusKind selects which of a target's two status forms to produce.
type StatusKind int

// The two forms of dmsetup: status (INFO) and table (TABLE).
const (
	StatusInfo     StatusKind = iota // dmsetup status
	StatusTable                      // dmsetup table: re-emits the constructor's arguments, keys hidden
	StatusShowKeys                   // dmsetup table --showkeys: TABLE with key material shown
)

// KeyHider is a target whose TABLE form hides key material, as dmsetup
// does unless --showkeys, and whose Status(StatusShowKeys) shows it. Other
// targets are asked for StatusTable when StatusShowKeys is wanted.
type KeyHider interface {
	HidesKeys()
}

// Target maps I/O for one line of a table. Map may be called concurrently
// from many goroutines. Status must produce exactly what dmsetup prints after
// "<start> <length> <type> " for the target (no leading or trailing space);
// the TABLE form must load back into the same target.
type Target interface {
	// Map performs r, which lies inside the target (Sector is relative to
	// the target's start), and returns when it is complete.
	Map(r *Request) error
	// Status returns the INFO or TABLE form of the target's parameters.
	Status(kind StatusKind) string
	// Close stops background work. Backends opened through Ctx.Open are
	// closed by the table afterwards.
	Close() error
}

// Messenger is a target that takes dmsetup messages.
type Messenger interface {
	// Message handles the words of a message and returns its reply
	// (often empty).
	Message(args []string) (string, error)
}

// Suspender is a target that takes part in suspend and resume.
type Suspender interface {
	// Presuspend quiesces background work before the device waits for
	// in-flight I/O; noflush is dmsetup's --noflush.
	Presuspend(noflush bool) error
	// Resume restarts background work when the table goes live again.
	Resume() error
}

// Flusher is a target with its own flush handling. Targets without it get
// flushes through Map with OpFlush.
type Flusher interface {
	Flush() error
}

// Discarder is a target that declares which of discard and write-zeroes
// its Map serves, as the kernel's targets do with discards_supported,
// num_discard_bios and num_write_zeroes_bios. A table serves an operation
// only if every target does (Table.Discards), and an export offers it to
// the guest only then. Targets without Discarder serve both, passing them
// to their backends.
type Discarder interface {
	// Discards reports whether Map serves OpDiscard.
	Discards() bool
	// WritesZeroes reports whether Map serves OpWriteZeroes.
	WritesZeroes() bool
}

// AreaLister is a target that lists the backend areas it uses so that the
// table can check each area fits its backend ("too small for target").
type AreaLister interface {
	// Areas calls fn for each backend area, in sectors.
	Areas(fn func(b Backend, start, length uint64) error) error
}

// EventRaiser is notified of target events; see Ctx.Event.
type EventRaiser func(kind string, data map[string]any)

// Features are flags of a TargetType that the table enforces.
type Features uint32

// Target type features, as the kernel's DM_TARGET_* flags.
const (
	// Singleton types must be the only target in a table.
	Singleton Features = 1 << iota
	// NoReload types may not be reloaded over an existing live table
	// of a different type (the kernel's immutable targets).
	Immutable
)

// TargetType is a registered kind of target.
type TargetType struct {
	Name     string
	Version  [3]int
	Features Features
	// New builds a target from its arguments. It checks cheap things first
	// and opens backends last, through c.Open.
	New func(c *Ctx, args []string) (Target, error)
}

var targetTypes = NewRegistry[*TargetType]("target type")

// RegisterTarget registers a target type; call it from init.
func RegisterTarget(t *TargetType) {
	if t.New == nil {
		panic("mapper: target type " + t.Name + " has no constructor")
	}
	targetTypes.Register(t.Name, t)
}

// LookupTarget returns the registered target type name.
func LookupTarget(name string) (*TargetType, error) { return targetTypes.Lookup(name) }

// TargetTypes returns the registered target types sorted by name, as
// "dmsetup targets" lists them.
func TargetTypes() []*TargetType {
	var out []*TargetType
	for _, n := range targetTypes.Names() {
		t, _ := targetTypes.Lookup(n)
		out = append(out, t)
	}
	return out
}

// Opener opens the backend a table names: a path, /dev/mapper/NAME, or
// major:minor. It is provided by the Manager.
type Opener interface {
	OpenBackend(name string, readOnly bool) (Backend, error)
}

// Ctx is what a constructor knows of its line and how it reaches storage.
type Ctx struct {
	Device   string // name of the device whose table is being built
	Start    uint64 // first sector of the target in the device
	Length   uint64 // length of the target in sectors
	ReadOnly bool   // the table is loaded read-only
	// MetadataCache is the device's metadata cache option in bytes; 0
	// leaves the bound of a target's metadata cache to its default (see
	// [MetadataCacher]).
	MetadataCache int64

	opener Opener
	opened []Backend
	event  EventRaiser
	log    *slog.Logger
	shared func(key any, mk func() any) any
}

// Logger returns the logger of the device being loaded, for warnings a
// target logs on its own (a snapshot marked invalid).
func (c *Ctx) Logger() *slog.Logger {
	if c.log == nil {
		return slog.Default()
	}
	return c.log
}

// Shared returns state shared by every table of the same Manager under
// key, made by mk the first time. Without a Manager (BuildTable called
// directly) it is shared by the tables built with the same TableOptions.
func (c *Ctx) Shared(key any, mk func() any) any {
	if c.shared == nil {
		return mk()
	}
	return c.shared(key, mk)
}

// Open opens a backend by the name a table uses. The table closes it when
// the table is closed or when construction fails, so constructors need no
// unwinding of their own.
func (c *Ctx) Open(name string) (Backend, error) {
	if c.opener == nil {
		return nil, fmt.Errorf("device %q: no backend opener", name)
	}
	b, err := c.opener.OpenBackend(name, c.ReadOnly)
	if err != nil {
		return nil, err
	}
	c.opened = append(c.opened, b)
	return b, nil
}

// OpenReadOnly opens a backend read-only whatever the table's mode: for
// storage a target only reads (a ploop image under the top delta). Like
// Open, the table closes it.
func (c *Ctx) OpenReadOnly(name string) (Backend, error) {
	if c.opener == nil {
		return nil, fmt.Errorf("device %q: no backend opener", name)
	}
	b, err := c.opener.OpenBackend(name, true)
	if err != nil {
		return nil, err
	}
	c.opened = append(c.opened, b)
	return b, nil
}

// Event returns a function the target calls to raise a device event (the
// kernel's dm_table_event and uevents): it bumps the device's event counter
// and is delivered to QMP clients as DM_EVENT. It is safe to call from any
// goroutine, at any time while the target is open.
func (c *Ctx) Event() EventRaiser {
	if c.event == nil {
		return func(string, map[string]any) {}
	}
	return c.event
}

// Args reads a target's arguments in order with checks that name the
// argument in their errors: `stripe count "0": must be 1 to 64`.
type Args struct {
	args []string
	i    int
}

// NewArgs returns a reader over args.
func NewArgs(args []string) *Args { return &Args{args: args} }

// Len returns the number of arguments not yet read.
func (a *Args) Len() int { return len(a.args) - a.i }

// Done returns an error if arguments remain unread.
func (a *Args) Done() error {
	if a.Len() != 0 {
		return fmt.Errorf("too many arguments: unexpected %q", a.args[a.i])
	}
	return nil
}

// Next returns the next argument, or an error naming what was missing.
func (a *Args) Next(what string) (string, error) {
	if a.i >= len(a.args) {
		return "", fmt.Errorf("missing %s", what)
	}
	s := a.args[a.i]
	a.i++
	return s, nil
}

// Uint reads an unsigned decimal argument in [min, max].
func (a *Args) Uint(what string, min, max uint64) (uint64, error) {
	s, err := a.Next(what)
	if err != nil {
		return 0, err
	}
	return ParseUint(what, s, min, max)
}

// Sector reads a sector number or count (below 2^54, so that a
// sector converted to bytes cannot overflow).
func (a *Args) Sector(what string) (uint64, error) {
	return a.Uint(what, 0, MaxSector)
}

// MaxSector is the largest sector number a table may name: 2^54-1, so that
// sector*512 fits a signed 64-bit byte offset.
const MaxSector = 1<<54 - 1

// ParseUint parses s as an unsigned decimal in [min, max].
func ParseUint(what, s string, min, max uint64) (uint64, error) {
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || strings.HasPrefix(s, "+") {
		return 0, fmt.Errorf("%s %q: not a number", what, s)
	}
	if v < min || v > max {
		return 0, fmt.Errorf("%s %q: must be %d to %d", what, s, min, max)
	}
	return v, nil
}
