package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// Config is the part of vhostdm's TOML configuration (package config) the
// harness writes and reads: QMP socket, devices with tables, exports.
type Config struct {
	QMP     QMPConfig      `toml:"qmp"`
	Devices []DeviceConfig `toml:"device"`
	Exports []ExportConfig `toml:"export"`
	// Extra is TOML text written after the rest as it is, for tables
	// the harness does not model ([ceph]).
	Extra string `toml:"-"`

	// Dir is the directory of the file it was loaded from; relative image
	// paths in tables are relative to it.
	Dir string `toml:"-"`
}

// QMPConfig is the [qmp] table.
type QMPConfig struct {
	Socket string `toml:"socket"`
}

// DeviceConfig is one [[device]].
type DeviceConfig struct {
	Name  string `toml:"name"`
	Table string `toml:"table"`
}

// ExportConfig is one [[export]].
type ExportConfig struct {
	ID               string `toml:"id"`
	Device           string `toml:"device"`
	Socket           string `toml:"socket"`
	NumQueues        int    `toml:"num-queues"`
	Writable         bool   `toml:"writable"`
	LogicalBlockSize int    `toml:"logical-block-size"`
	Serial           string `toml:"serial"`
}

// LoadConfig reads a vhostdm configuration file.
func LoadConfig(path string) (*Config, error) {
	c := &Config{}
	if _, err := toml.DecodeFile(path, c); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	c.Dir = filepath.Dir(abs)
	return c, nil
}

// TOML renders the configuration in vhostdm's schema.
func (c *Config) TOML() string {
	var b strings.Builder
	b.WriteString("# written by the vhostdm e2e harness\n")
	if c.QMP.Socket != "" {
		fmt.Fprintf(&b, "[qmp]\nsocket = %s\n", strconv.Quote(c.QMP.Socket))
	}
	for _, d := range c.Devices {
		fmt.Fprintf(&b, "\n[[device]]\nname = %s\ntable = \"\"\"\n%s\n\"\"\"\n", strconv.Quote(d.Name), strings.TrimSpace(d.Table))
	}
	for _, x := range c.Exports {
		fmt.Fprintf(&b, "\n[[export]]\nid = %s\ndevice = %s\nsocket = %s\nnum-queues = %d\nwritable = %t\n",
			strconv.Quote(x.ID), strconv.Quote(x.Device), strconv.Quote(x.Socket), max(x.NumQueues, 1), x.Writable)
		if x.LogicalBlockSize > 0 {
			fmt.Fprintf(&b, "logical-block-size = %d\n", x.LogicalBlockSize)
		}
		if x.Serial != "" {
			fmt.Fprintf(&b, "serial = %s\n", strconv.Quote(x.Serial))
		}
	}
	if c.Extra != "" {
		b.WriteString("\n" + strings.TrimSpace(c.Extra) + "\n")
	}
	return b.String()
}

// Write writes the configuration to path and records its directory.
func (c *Config) Write(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	c.Dir = filepath.Dir(abs)
	return os.WriteFile(path, []byte(c.TOML()), 0o644)
}

// Device returns the device named name.
func (c *Config) Device(name string) (*DeviceConfig, error) {
	for i := range c.Devices {
		if c.Devices[i].Name == name {
			return &c.Devices[i], nil
		}
	}
	return nil, fmt.Errorf("no device %q in the configuration", name)
}

// Export returns the export with the given id.
func (c *Config) Export(id string) (*ExportConfig, error) {
	for i := range c.Exports {
		if c.Exports[i].ID == id {
			return &c.Exports[i], nil
		}
	}
	return nil, fmt.Errorf("no export %q in the configuration", id)
}

// Path resolves a path from a table as vhostdm does: relative to Dir.
func (c *Config) Path(p string) string {
	if filepath.IsAbs(p) || c.Dir == "" {
		return p
	}
	return filepath.Join(c.Dir, p)
}
