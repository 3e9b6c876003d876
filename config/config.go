// Package config loads and validates vhostdm's TOML configuration: the QMP
// socket, the devices with their tables, and the vhost-user-blk exports.
//
//	version = 1
//
//	[qmp]
//	socket = "/run/vhostdm/vm1.qmp"
//
//	[[device]]
//	name = "root"
//	table = """
//	0 2097152 linear /var/lib/vm1/root.img 0
//	2097152 2097152 zero
//	"""
//
//	[[export]]
//	id = "root0"
//	device = "root"
//	socket = "/run/vhostdm/vm1-root.sock"
//	num-queues = 2
//	writable = true
//	logical-block-size = 512
//	serial = "vm1-root"
//
// Relative paths (sockets, and backend paths inside tables) are relative to
// the directory of the configuration file. Every error names the file, the
// line and the key; all errors are reported at once.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/BurntSushi/toml"

	"github.com/vhostdm/vhostdm/mapper"
)

// Version is the newest configuration version this build understands.
const Version = 1

// Config is a whole configuration file.
type Config struct {
	Version int      `toml:"version"`
	QMP     QMP      `toml:"qmp"`
	Devices []Device `toml:"device"`
	Exports []Export `toml:"export"`

	// Dir is the directory relative paths are resolved against.
	Dir string `toml:"-"`
	// File is the file the configuration was read from, for messages.
	File string `toml:"-"`
}

// QMP configures the control socket.
type QMP struct {
	Socket string `toml:"socket"` // unix socket path; empty: no QMP
}

// Device is one mapper device and its table.
type Device struct {
	Name     string `toml:"name"`
	UUID     string `toml:"uuid"`
	Table    string `toml:"table"`
	ReadOnly bool   `toml:"readonly"`
}

// Export is one vhost-user-blk export of a device.
type Export struct {
	ID               string `toml:"id"`
	Device           string `toml:"device"`
	Socket           string `toml:"socket"`
	NumQueues        int    `toml:"num-queues"`
	Writable         bool   `toml:"writable"`
	LogicalBlockSize uint32 `toml:"logical-block-size"`
	Serial           string `toml:"serial"`
}

// Export defaults, as qemu-storage-daemon's: one queue, 512-byte blocks.
// Exports are read-only unless writable = true, also as there.
const (
	DefaultNumQueues        = 1
	MaxNumQueues            = 64
	DefaultLogicalBlockSize = 512
	MaxLogicalBlockSize     = 2 << 20
	MaxSerialLen            = 20
)

// Error is one configuration error with its location.
type Error struct {
	File string
	Line int    // 0 when unknown
	Key  string // e.g. device[1].table; empty for syntax errors
	Msg  string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Key != "" {
		b.WriteString(": " + e.Key)
	}
	b.WriteString(": " + e.Msg)
	return b.String()
}

// Errors is every error found in one file.
type Errors []*Error

func (es Errors) Error() string {
	s := make([]string, len(es))
	for i, e := range es {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// Load reads and validates the configuration file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(data, path, filepath.Dir(abs))
}

// Parse decodes and validates configuration text. file names the source in
// errors; dir is where relative paths are resolved.
func Parse(data []byte, file, dir string) (*Config, error) {
	c := &Config{Dir: dir, File: file}
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(c)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, Errors{{File: file, Line: pe.Position.Line, Msg: pe.Message}}
		}
		msg := err.Error()
		msg = strings.TrimPrefix(msg, "toml: ")
		return nil, Errors{{File: file, Msg: msg}}
	}
	v := &validator{file: file, loc: locate(data)}
	for _, k := range md.Undecoded() {
		v.errAt(k.String(), "unknown key")
	}
	c.validate(v)
	if len(v.errs) > 0 {
		return nil, v.errs
	}
	return c, nil
}

type validator struct {
	file string
	loc  *locator
	errs Errors
}

// errAt records an error about key (e.g. "device[0].table"), located at
// the key's line, or its table's line when the key is absent.
func (v *validator) errAt(key, format string, args ...any) {
	v.errs = append(v.errs, &Error{File: v.file, Line: v.loc.line(key), Key: key, Msg: fmt.Sprintf(format, args...)})
}

func (c *Config) validate(v *validator) {
	if c.Version > Version {
		v.errAt("version", "version %d is newer than this vhostdm understands (%d)", c.Version, Version)
	}
	if c.Version < 0 {
		v.errAt("version", "version %d: must be 1 or absent", c.Version)
	}
	names := map[string]int{}
	for i := range c.Devices {
		d := &c.Devices[i]
		key := fmt.Sprintf("device[%d]", i)
		if err := mapper.ValidateName(d.Name); err != nil {
			v.errAt(key+".name", "%v", err)
		} else if j, dup := names[d.Name]; dup {
			v.errAt(key+".name", "device %q already defined as device[%d]", d.Name, j)
		} else {
			names[d.Name] = i
		}
		if len(d.UUID) > 128 {
			v.errAt(key+".uuid", "longer than 128 characters")
		}
		if strings.TrimSpace(d.Table) == "" {
			v.errAt(key+".table", "missing table")
			continue
		}
		if _, err := mapper.ParseTable(d.Table); err != nil {
			v.tableErr(key+".table", d.Table, err)
		}
	}
	if _, err := c.DeviceOrder(); err != nil {
		v.errAt("device", "%v", err)
	}
	ids := map[string]int{}
	sockets := map[string]int{}
	if c.QMP.Socket != "" {
		sockets[c.Path(c.QMP.Socket)] = -1
	}
	for i := range c.Exports {
		e := &c.Exports[i]
		key := fmt.Sprintf("export[%d]", i)
		switch j, dup := ids[e.ID]; {
		case e.ID == "":
			v.errAt(key+".id", "missing export id")
		case dup:
			v.errAt(key+".id", "export id %q already used by export[%d]", e.ID, j)
		default:
			ids[e.ID] = i
		}
		if e.Device == "" {
			v.errAt(key+".device", "missing device")
		} else if j, ok := names[e.Device]; !ok {
			v.errAt(key+".device", "no device named %q", e.Device)
		} else if c.Devices[j].ReadOnly && e.Writable {
			v.errAt(key+".writable", "device %q is read-only", e.Device)
		}
		if e.Socket == "" {
			v.errAt(key+".socket", "missing socket path")
		} else if j, dup := sockets[c.Path(e.Socket)]; dup {
			other := "the QMP socket"
			if j >= 0 {
				other = fmt.Sprintf("export[%d]", j)
			}
			v.errAt(key+".socket", "socket %s already used by %s", e.Socket, other)
		} else {
			sockets[c.Path(e.Socket)] = i
		}
		if e.NumQueues == 0 {
			e.NumQueues = DefaultNumQueues
		}
		if e.NumQueues < 1 || e.NumQueues > MaxNumQueues {
			v.errAt(key+".num-queues", "%d: must be 1 to %d", e.NumQueues, MaxNumQueues)
		}
		if e.LogicalBlockSize == 0 {
			e.LogicalBlockSize = DefaultLogicalBlockSize
		}
		if lbs := e.LogicalBlockSize; lbs < 512 || lbs > MaxLogicalBlockSize || lbs&(lbs-1) != 0 {
			v.errAt(key+".logical-block-size", "%d: must be a power of two from 512 to %d", lbs, MaxLogicalBlockSize)
		}
		if e.Serial == "" {
			e.Serial = e.ID
		}
		if len(e.Serial) > MaxSerialLen {
			v.errAt(key+".serial", "%q: longer than %d bytes", e.Serial, MaxSerialLen)
		}
	}
}

// tableErr reports a table error at the file line of the table line it
// names, when the table is a multi-line string.
func (v *validator) tableErr(key, table string, err error) {
	line := v.loc.line(key)
	var n int
	if _, scan := fmt.Sscanf(err.Error(), "line %d:", &n); scan == nil && line > 0 && v.loc.multiline[key] {
		v.errs = append(v.errs, &Error{File: v.file, Line: line + n, Key: key, Msg: err.Error()})
		return
	}
	v.errs = append(v.errs, &Error{File: v.file, Line: line, Key: key, Msg: err.Error()})
}

// Path resolves a path from the file against the file's directory.
func (c *Config) Path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(c.Dir, p)
}

// Uses returns the names of the configured devices whose /dev/mapper/NAME
// the device's table names.
func (d *Device) Uses() []string {
	var out []string
	for _, f := range strings.Fields(d.Table) {
		if name, ok := strings.CutPrefix(f, mapper.MapperDir); ok && !slices.Contains(out, name) {
			out = append(out, name)
		}
	}
	return out
}

// DeviceOrder returns the devices in an order in which each comes after the
// devices its table uses; a cycle is an error naming it.
func (c *Config) DeviceOrder() ([]Device, error) {
	byName := map[string]*Device{}
	for i := range c.Devices {
		byName[c.Devices[i].Name] = &c.Devices[i]
	}
	const (
		unseen = iota
		visiting
		done
	)
	state := map[string]int{}
	var order []Device
	var visit func(name string, path []string) error
	visit = func(name string, path []string) error {
		d := byName[name]
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("dependency cycle: %s", strings.Join(append(path, name), " -> "))
		}
		state[name] = visiting
		for _, u := range d.Uses() {
			if byName[u] == nil {
				return fmt.Errorf("device %q uses /dev/mapper/%s, which is not a configured device", name, u)
			}
			if err := visit(u, append(path, name)); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, *d)
		return nil
	}
	for i := range c.Devices {
		if err := visit(c.Devices[i].Name, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}
