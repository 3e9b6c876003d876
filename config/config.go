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
//	cache = "writeback"             # or "none": backends opened with O_DIRECT
//	metadata-cache = "64m"          # thin-pool tables only; default sized for the pool
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
//	socket-owner = "libvirt-qemu"   # or a uid; default: the daemon's user
//	socket-group = "kvm"            # or a gid; default: the daemon's group
//	socket-mode = "0660"            # default "0600"
//
//	[ceph]                          # for rbd:POOL/IMAGE[@SNAP] backends
//	conf = "/etc/ceph/ceph.conf"    # default: librados's search
//	id = "vhostdm"                  # client.vhostdm; default "admin"
//	keyring = "/etc/ceph/ceph.client.vhostdm.keyring"
//
// Relative paths (sockets, and backend paths inside tables) are relative to
// the directory of the configuration file. Every error names the file, the
// line and the key; all errors are reported at once.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/internal/unixsock"
	"github.com/vhostdm/vhostdm/mapper"
)

// Version is the newest configuration version this build understands.
const Version = 1

// Config is a whole configuration file.
type Config struct {
	Version  int      `toml:"version"`
	QMP      QMP      `toml:"qmp"`
	Devices  []Device `toml:"device"`
	Exports  []Export `toml:"export"`
	RepAgent RepAgent `toml:"repagent"`
	Metrics  Metrics  `toml:"metrics"`
	// Ceph says how rbd: backends reach the cluster.
	Ceph ceph.Config `toml:"ceph"`
	// StateDir holds the devices' persistent dirty bitmaps (NAME.bitmaps);
	// default: the configuration file's directory.
	StateDir string `toml:"state-dir"`

	// Dir is the directory relative paths are resolved against.
	Dir string `toml:"-"`
	// File is the file the configuration was read from, for messages.
	File string `toml:"-"`

	loc *locator // where keys are in File
}

// StatePath returns the state directory: state-dir resolved against the
// file's directory, or that directory itself.
func (c *Config) StatePath() string {
	if c.StateDir == "" {
		return c.Dir
	}
	return c.Path(c.StateDir)
}

// DeviceIndex returns the index of the device called name, or -1.
func (c *Config) DeviceIndex(name string) int {
	for i := range c.Devices {
		if c.Devices[i].Name == name {
			return i
		}
	}
	return -1
}

// TableError returns err, an error from building device i's table (which
// names "line N" of the table), as a configuration error located at that
// table line in the file: "vm.toml:5: device[0].table: line 1: ...".
func (c *Config) TableError(i int, err error) error {
	if c.loc == nil || i < 0 || i >= len(c.Devices) {
		return &Error{File: c.File, Key: fmt.Sprintf("device[%d].table", i), Msg: err.Error()}
	}
	v := &validator{file: c.File, loc: c.loc}
	v.tableErr(fmt.Sprintf("device[%d].table", i), c.Devices[i].Table, err)
	return v.errs[0]
}

// QMP configures the control socket.
type QMP struct {
	Socket string `toml:"socket"` // unix socket path; empty: no QMP
	SocketPerm
}

// SocketPerm is the ownership and mode of a socket file, applied before
// the socket accepts its first connection and whenever it is recreated.
type SocketPerm struct {
	SocketOwner string `toml:"socket-owner"` // user name or uid; "": the daemon's
	SocketGroup string `toml:"socket-group"` // group name or gid; "": the daemon's
	SocketMode  string `toml:"socket-mode"`  // octal, e.g. "0660"; "": 0600
}

// Perm returns p for unixsock.Listen; p has been validated.
func (p SocketPerm) Perm() unixsock.Perm {
	m, _ := unixsock.ParseMode(p.SocketMode)
	return unixsock.Perm{Owner: p.SocketOwner, Group: p.SocketGroup, Mode: m}
}

// validate checks the mode and looks the user and group up on this
// machine.
func (p SocketPerm) validate(v *validator, key string) {
	if _, err := unixsock.ParseMode(p.SocketMode); err != nil {
		v.errAt(key+".socket-mode", "%v", err)
	}
	if p.SocketOwner != "" {
		if _, err := unixsock.LookupUser(p.SocketOwner); err != nil {
			v.errAt(key+".socket-owner", "%v", err)
		}
	}
	if p.SocketGroup != "" {
		if _, err := unixsock.LookupGroup(p.SocketGroup); err != nil {
			v.errAt(key+".socket-group", "%v", err)
		}
	}
}

// Device is one mapper device and its table.
type Device struct {
	Name     string `toml:"name"`
	UUID     string `toml:"uuid"`
	Table    string `toml:"table"`
	ReadOnly bool   `toml:"readonly"`
	// Cache is "writeback" (default: through the page cache) or "none"
	// (file and block-device backends opened with O_DIRECT).
	Cache string `toml:"cache"`
	// MetadataCache bounds the in-memory cache of a thin-pool's metadata
	// blocks: a size from 64k to 16g in whole 4 KiB blocks ("64m"); ""
	// leaves the default, sized for the pool. Only a device whose table
	// has a thin-pool line takes it; a reload applies a change at once.
	MetadataCache string `toml:"metadata-cache"`
	// Locking is "auto" (default), "on" or "off": whether the files and
	// block devices the table opens carry QEMU's image locks, as
	// QEMU's file driver's locking option.
	Locking string `toml:"locking"`

	CacheMode          mapper.CacheMode `toml:"-"` // Cache, parsed
	MetadataCacheBytes int64            `toml:"-"` // MetadataCache, parsed; 0: the default
	LockMode           mapper.LockMode  `toml:"-"` // Locking, parsed
}

// Options returns the device's creation options.
func (d *Device) Options() mapper.DeviceOptions {
	return mapper.DeviceOptions{ReadOnly: d.ReadOnly, Cache: d.CacheMode, MetadataCache: d.MetadataCacheBytes, Locking: d.LockMode}
}

// validateMetadataCache parses metadata-cache and checks the table has a
// thin-pool line (lines: the parsed table, nil when it did not parse).
func (d *Device) validateMetadataCache(v *validator, key string, lines []mapper.Line) {
	d.MetadataCacheBytes = 0
	if d.MetadataCache == "" {
		return
	}
	key += ".metadata-cache"
	n, err := ParseSize(d.MetadataCache)
	// The mapper's bounds (mapper.CheckMetadataCache); 0, the default
	// there, is not a size to write here.
	if err != nil || n == 0 || n > mapper.MaxMetadataCache || mapper.CheckMetadataCache(int64(n)) != nil {
		v.errAt(key, "%q: want a size from 64k to 16g in whole 4k blocks, such as \"64m\"", d.MetadataCache)
		return
	}
	d.MetadataCacheBytes = int64(n)
	if lines == nil {
		return
	}
	for _, l := range lines {
		if l.Type == "thin-pool" {
			return
		}
	}
	v.errAt(key, "only a device whose table has a thin-pool line has a metadata cache")
}

// Export is one export of a device: vhost-user-blk (the default type) or
// NBD.
type Export struct {
	ID               string `toml:"id"`
	Type             string `toml:"type"` // "vhost-user-blk" (default) or "nbd"
	Device           string `toml:"device"`
	Socket           string `toml:"socket"`
	NumQueues        int    `toml:"num-queues"`
	Writable         bool   `toml:"writable"`
	LogicalBlockSize uint32 `toml:"logical-block-size"`
	Serial           string `toml:"serial"`
	// PollUS is how long, in microseconds, each queue busy-polls its
	// available ring after it runs dry before it sleeps on the kick
	// eventfd: 0 (the default) for never, up to MaxPollUS.
	PollUS int `toml:"poll-us"`
	// AdaptivePoll, when false, turns off adaptive polling: by default
	// (nil) each queue that runs dry polls its available ring for 1 µs
	// per request it completed itself since it last ran dry, up to 256 µs
	// (docs/REFERENCE.md, export.adaptive-poll). PollUS > 0 replaces it
	// with a fixed poll; true with it is an error.
	AdaptivePoll *bool `toml:"adaptive-poll"`
	SocketPerm
	// NegotiationTimeout is how long a connecting front end has to
	// complete negotiation before it is disconnected: a Go duration
	// ("10s", the default; "0s" for none).
	NegotiationTimeout string `toml:"negotiation-timeout"`
	// NegotiationWait is NegotiationTimeout parsed; negative for none.
	NegotiationWait time.Duration `toml:"-"`
	// Replication (see RepAgent): protect mirrors the export's writes to
	// the hub; fall-behind is the threshold past which mirroring becomes
	// synchronous ("ios N", "size N[s|k|m|g|t|p|e]", "timeout N[s|m|h|d]",
	// as dm-replicator's site links); allow-remote-write lets the hub
	// write the volume (recovery-side VMs only).
	Protect    bool   `toml:"protect"`
	FallBehind string `toml:"fall-behind"`
	// OnHubLoss is what happens to writes past the fall-behind threshold
	// while the hub is away: "continue" (default: the dirty map) or
	// "suspend" (held until the hub is back).
	OnHubLoss        string `toml:"on-hub-loss"`
	AllowRemoteWrite bool   `toml:"allow-remote-write"`
	// NBD exports (type = "nbd") listen on socket (a unix socket path) or
	// listen (host:port); exports of one address share its server.
	Listen        string   `toml:"listen"`
	Name          string   `toml:"name"` // the NBD export name; default the device name
	Description   string   `toml:"description"`
	Bitmaps       []string `toml:"bitmaps"`         // dirty bitmaps offered as qemu:dirty-bitmap:NAME
	TLSCreds      string   `toml:"tls-creds"`       // directory with ca-cert.pem, server-cert.pem, server-key.pem
	TLSVerifyPeer *bool    `toml:"tls-verify-peer"` // default true, as QEMU's tls-creds-x509
}

// Export types.
const (
	TypeVhostUserBlk = "vhost-user-blk"
	TypeNBD          = "nbd"
)

// VerifyPeer reports whether an NBD export's TLS clients must present a
// certificate (tls-verify-peer, default true).
func (e *Export) VerifyPeer() bool { return e.TLSVerifyPeer == nil || *e.TLSVerifyPeer }

// exportAddr returns the key under which an export's listening address is
// shared: "unix:PATH" or "tcp:HOST:PORT".
func (c *Config) exportAddr(e *Export) string {
	if e.Listen != "" {
		return "tcp:" + e.Listen
	}
	return "unix:" + c.Path(e.Socket)
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	Listen string `toml:"listen"` // host:port of /metrics; empty: none
}

// RepAgent configures the replication agent. Without a hub there is none.
//
//	[repagent]
//	hub = "127.0.0.1:7070"    # or a list: ["hub-a:7070", "hub-b:7070"]
//	vm = "vm1"
//	tls-cert = "vm1.crt"
//	tls-key = "vm1.key"
//	tls-ca = "ca.crt"
//	queue-size = "64m"
//	activity-log = "vm1.actlog"
//	al-extents = 1237
//	al-extent-size = "4m"
type RepAgent struct {
	// Hubs is `hub`: one host:port, or a list of them tried in turn
	// (hubs sharing one Ceph pool: the agent moves to the next on a
	// connection failure or when another hub holds the VM).
	Hubs HubList `toml:"hub"`
	// Hub is the first of Hubs ("": no agent), set by validation.
	Hub       string `toml:"-"`
	VM        string `toml:"vm"`         // the VM's name at the hub
	UUID      string `toml:"uuid"`       // 8-4-4-4-12 hex digits; optional
	TLSCert   string `toml:"tls-cert"`   // PEM files; all three or none
	TLSKey    string `toml:"tls-key"`    //
	TLSCA     string `toml:"tls-ca"`     //
	Insecure  bool   `toml:"insecure"`   // plain TCP to a non-loopback hub
	QueueSize string `toml:"queue-size"` // mirror queue bound, default 64m
	// ActivityLog is the file of the agent's activity log of hot
	// extents, resolved against the file's directory; default
	// "VM.actlog" beside the file; "none" turns it off (a crash then
	// resyncs every protected volume in full).
	ActivityLog  string `toml:"activity-log"`
	ALExtents    int    `toml:"al-extents"`     // hot extents at most, default 1237
	ALExtentSize string `toml:"al-extent-size"` // extent size, a power of two, default 4m

	// QueueBytes is QueueSize parsed.
	QueueBytes int64 `toml:"-"`
	// ALPath is ActivityLog resolved ("" when off); ALExtentBytes is
	// ALExtentSize parsed (0: the default).
	ALPath        string `toml:"-"`
	ALExtentBytes uint64 `toml:"-"`
}

// FallBehind is a parsed fall-behind threshold; zero fields are unset.
type FallBehind struct {
	IOs     uint64
	Bytes   uint64
	Timeout time.Duration
}

// DefaultQueueSize is the mirror queue's bound when queue-size is unset.
const DefaultQueueSize = 64 << 20

// ParseFallBehind parses dm-replicator's fall-behind forms: "ios N",
// "size N<unit>" with unit s (sectors), k, m, g, t, p or e (bytes
// without), and "timeout N<unit>" with unit s, m, h or d. "" is no
// threshold.
func ParseFallBehind(s string) (FallBehind, error) {
	f := strings.Fields(s)
	if len(f) == 0 {
		return FallBehind{}, nil
	}
	if len(f) != 2 {
		return FallBehind{}, fmt.Errorf("%q: want \"ios N\", \"size N<unit>\" or \"timeout N<unit>\"", s)
	}
	switch f[0] {
	case "ios":
		n, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil || n == 0 {
			return FallBehind{}, fmt.Errorf("%q: ios must be a positive integer", s)
		}
		return FallBehind{IOs: n}, nil
	case "size":
		n, err := ParseSize(f[1])
		if err != nil {
			return FallBehind{}, fmt.Errorf("%q: %w", s, err)
		}
		return FallBehind{Bytes: n}, nil
	case "timeout":
		num, unit := splitUnit(f[1])
		n, err := strconv.ParseUint(num, 10, 32)
		mult := map[string]time.Duration{"": time.Second, "s": time.Second, "m": time.Minute, "h": time.Hour, "d": 24 * time.Hour}[unit]
		if err != nil || n == 0 || mult == 0 {
			return FallBehind{}, fmt.Errorf("%q: timeout must be a positive integer with unit s, m, h or d", s)
		}
		return FallBehind{Timeout: time.Duration(n) * mult}, nil
	}
	return FallBehind{}, fmt.Errorf("%q: unknown threshold %q (ios, size or timeout)", s, f[0])
}

// ParseSize parses a size with dm-replicator's labels: s (512-byte
// sectors), k, m, g, t, p, e (binary multiples); no label is bytes.
func ParseSize(s string) (uint64, error) {
	num, unit := splitUnit(s)
	shift, ok := map[string]uint{"": 0, "s": 9, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}[strings.ToLower(unit)]
	n, err := strconv.ParseUint(num, 10, 64)
	if !ok || err != nil || n == 0 || n > (^uint64(0))>>shift {
		return 0, fmt.Errorf("size %q: want a positive integer with unit s, k, m, g, t, p or e", s)
	}
	return n << shift, nil
}

// splitUnit splits "256m" into "256" and "m".
func splitUnit(s string) (string, string) {
	i := len(s)
	for i > 0 && (s[i-1] < '0' || s[i-1] > '9') {
		i--
	}
	return s[:i], s[i:]
}

// Export defaults, as qemu-storage-daemon's: one queue, 512-byte blocks.
// Exports are read-only unless writable = true, also as there.
const (
	DefaultNumQueues        = 1
	MaxNumQueues            = 64
	MaxPollUS               = 1000
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
	c.loc = v.loc
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
	c.RepAgent.resolveHubs()
	if c.Version > Version {
		v.errAt("version", "version %d is newer than this vhostdm understands (%d)", c.Version, Version)
	}
	if c.Version < 0 {
		v.errAt("version", "version %d: must be 1 or absent", c.Version)
	}
	if c.Metrics.Listen != "" {
		if _, _, err := net.SplitHostPort(c.Metrics.Listen); err != nil {
			v.errAt("metrics.listen", "%q: want host:port (%v)", c.Metrics.Listen, err)
		}
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
		if m, err := mapper.ParseCacheMode(d.Cache); err != nil {
			v.errAt(key+".cache", "%q: want \"writeback\" or \"none\"", d.Cache)
		} else {
			d.CacheMode = m
		}
		if m, err := mapper.ParseLockMode(d.Locking); err != nil {
			v.errAt(key+".locking", "%q: want \"auto\", \"on\" or \"off\"", d.Locking)
		} else {
			d.LockMode = m
		}
		if strings.TrimSpace(d.Table) == "" {
			v.errAt(key+".table", "missing table")
			d.validateMetadataCache(v, key, nil)
			continue
		}
		lines, err := mapper.ParseTable(d.Table)
		if err != nil {
			v.tableErr(key+".table", d.Table, err)
		}
		d.validateMetadataCache(v, key, lines)
	}
	if _, err := c.DeviceOrder(); err != nil {
		v.errAt("device", "%v", err)
	}
	ids := map[string]int{}
	sockets := map[string]int{}
	c.QMP.SocketPerm.validate(v, "qmp")
	if c.QMP.Socket != "" {
		sockets[c.Path(c.QMP.Socket)] = -1
	}
	nbdAddrs := map[string]int{}  // shared NBD addresses: first export
	nbdNames := map[string]bool{} // address + "\x00" + export name
	for i := range c.Exports {
		e := &c.Exports[i]
		key := fmt.Sprintf("export[%d]", i)
		if e.Type == "" {
			e.Type = TypeVhostUserBlk
		}
		switch e.Type {
		case TypeVhostUserBlk:
			for k, set := range map[string]bool{"listen": e.Listen != "", "name": e.Name != "", "description": e.Description != "",
				"bitmaps": e.Bitmaps != nil, "tls-creds": e.TLSCreds != "", "tls-verify-peer": e.TLSVerifyPeer != nil} {
				if set {
					v.errAt(key+"."+k, "only nbd exports take %s", k)
				}
			}
		case TypeNBD:
			c.validateNBD(v, key, e, i, nbdAddrs, nbdNames, sockets)
			if e.Device != "" {
				if _, ok := names[e.Device]; !ok {
					v.errAt(key+".device", "no device named %q", e.Device)
				}
			}
			switch j, dup := ids[e.ID]; {
			case e.ID == "":
				v.errAt(key+".id", "missing export id")
			case dup:
				v.errAt(key+".id", "export id %q already used by export[%d]", e.ID, j)
			default:
				ids[e.ID] = i
			}
			continue
		default:
			v.errAt(key+".type", "%q: want vhost-user-blk or nbd", e.Type)
			continue
		}
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
		e.SocketPerm.validate(v, key)
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
		if e.PollUS < 0 || e.PollUS > MaxPollUS {
			v.errAt(key+".poll-us", "%d: must be 0 (off) to %d microseconds", e.PollUS, MaxPollUS)
		}
		if e.AdaptivePoll != nil && *e.AdaptivePoll && e.PollUS > 0 {
			v.errAt(key+".adaptive-poll", "true with poll-us = %d: choose one (adaptive polling, or a fixed poll after every batch)", e.PollUS)
		}
		e.NegotiationWait = 0
		if e.NegotiationTimeout != "" {
			d, err := time.ParseDuration(e.NegotiationTimeout)
			switch {
			case err != nil || d < 0:
				v.errAt(key+".negotiation-timeout", "%q: want a duration such as \"10s\", or \"0s\" for none", e.NegotiationTimeout)
			case d == 0:
				e.NegotiationWait = -1
			default:
				e.NegotiationWait = d
			}
		}
		if _, err := ParseFallBehind(e.FallBehind); err != nil {
			v.errAt(key+".fall-behind", "%v", err)
		}
		if e.Protect && e.AllowRemoteWrite {
			v.errAt(key+".allow-remote-write", "not with protect = true: the hub could overwrite the disk it protects (allow-remote-write is for recovery-side VMs)")
		}
		if (e.Protect || e.FallBehind != "" || e.AllowRemoteWrite) && c.RepAgent.Hub == "" {
			v.errAt(key+".protect", "replication settings need a [repagent] hub")
		}
	}
	c.RepAgent.validate(c, v)
	cephErrs := c.CephConfig().Validate()
	for _, key := range slices.Sorted(maps.Keys(cephErrs)) {
		v.errAt("ceph."+key, "%v", cephErrs[key])
	}
	c.validateFallBehind(v)
}

// validateNBD checks an NBD export's keys.
func (c *Config) validateNBD(v *validator, key string, e *Export, i int, addrs map[string]int, names map[string]bool, sockets map[string]int) {
	if e.Device == "" {
		v.errAt(key+".device", "missing device")
	}
	if e.NumQueues != 0 || e.LogicalBlockSize != 0 || e.Serial != "" || e.PollUS != 0 || e.AdaptivePoll != nil || e.Protect || e.FallBehind != "" || e.AllowRemoteWrite {
		v.errAt(key+".type", "nbd exports take none of num-queues, logical-block-size, serial, poll-us, adaptive-poll, protect, fall-behind, allow-remote-write")
	}
	switch {
	case (e.Socket == "") == (e.Listen == ""):
		v.errAt(key+".socket", "an nbd export needs exactly one of socket (unix path) and listen (host:port)")
		return
	case e.Listen != "":
		if _, _, err := net.SplitHostPort(e.Listen); err != nil {
			v.errAt(key+".listen", "%q: want host:port (%v)", e.Listen, err)
			return
		}
	default:
		if j, dup := sockets[c.Path(e.Socket)]; dup && (j < 0 || c.Exports[j].Type != TypeNBD) {
			v.errAt(key+".socket", "socket %s already used by another export or the QMP socket", e.Socket)
			return
		}
		sockets[c.Path(e.Socket)] = i
	}
	if e.Name == "" {
		e.Name = e.Device
	}
	if len(e.Name) > 4096 || len(e.Description) > 4096 {
		v.errAt(key+".name", "name and description are at most 4096 bytes")
	}
	addr := c.exportAddr(e)
	if names[addr+"\x00"+e.Name] {
		v.errAt(key+".name", "nbd export name %q already used at %s", e.Name, strings.TrimPrefix(strings.TrimPrefix(addr, "tcp:"), "unix:"))
	}
	names[addr+"\x00"+e.Name] = true
	if j, shared := addrs[addr]; shared {
		o := &c.Exports[j]
		if o.TLSCreds != e.TLSCreds || o.VerifyPeer() != e.VerifyPeer() {
			v.errAt(key+".tls-creds", "exports sharing an address need the same TLS settings as export[%d]", j)
		}
	} else {
		addrs[addr] = i
	}
	for k, b := range e.Bitmaps {
		if b == "" {
			v.errAt(fmt.Sprintf("%s.bitmaps[%d]", key, k), "empty bitmap name")
		}
	}
}

// validateFallBehind refuses thresholds that can never trigger: a
// protected volume's backlog never exceeds its share of the mirror queue
// (queue-size divided among the protected exports).
func (c *Config) validateFallBehind(v *validator) {
	n := 0
	for _, e := range c.Exports {
		if e.Protect {
			n++
		}
	}
	for i, e := range c.Exports {
		key := fmt.Sprintf("export[%d]", i)
		switch e.OnHubLoss {
		case "", "continue", "suspend":
		default:
			v.errAt(key+".on-hub-loss", "%q: want \"continue\" or \"suspend\"", e.OnHubLoss)
		}
		fb, err := ParseFallBehind(e.FallBehind)
		if err != nil || c.RepAgent.Hub == "" {
			continue
		}
		if e.OnHubLoss == "suspend" && fb == (FallBehind{}) {
			v.errAt(key+".on-hub-loss", "\"suspend\" needs a fall-behind threshold: without one it never applies")
		}
		if !e.Protect || n == 0 || c.RepAgent.QueueBytes <= 0 {
			continue
		}
		share := uint64(c.RepAgent.QueueBytes) / uint64(n)
		if fb.Bytes >= share {
			v.errAt(key+".fall-behind", "%q (%d bytes) can never trigger: the volume's backlog is bounded by its share of the mirror queue, %d bytes (queue-size %d bytes / %d protected exports); use a smaller size or a larger queue-size",
				e.FallBehind, fb.Bytes, share, c.RepAgent.QueueBytes, n)
		}
	}
}

// HubList is a TOML string or array of strings (`[repagent] hub`).
type HubList struct {
	// Addrs are the addresses in order.
	Addrs []string
	// bad: the TOML value was neither (reported by validation).
	bad string
}

// UnmarshalTOML implements toml.Unmarshaler.
func (l *HubList) UnmarshalTOML(v any) error {
	switch v := v.(type) {
	case string:
		l.Addrs = []string{v}
		return nil
	case []any:
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				l.bad = fmt.Sprintf("%v is not a string", e)
				return nil
			}
			l.Addrs = append(l.Addrs, s)
		}
		if len(l.Addrs) == 0 {
			l.bad = "an empty list"
		}
		return nil
	}
	l.bad = fmt.Sprintf("%v is not a string or a list of strings", v)
	return nil
}

// HubAddrs returns the hubs' addresses: Hubs, or Hub alone when Hubs is
// empty (a configuration built in code).
func (r *RepAgent) HubAddrs() []string {
	if len(r.Hubs.Addrs) > 0 {
		return r.Hubs.Addrs
	}
	if r.Hub != "" {
		return []string{r.Hub}
	}
	return nil
}

// resolveHubs sets Hub from Hubs.
func (r *RepAgent) resolveHubs() {
	if len(r.Hubs.Addrs) > 0 {
		r.Hub = r.Hubs.Addrs[0]
	}
}

func (r *RepAgent) validate(c *Config, v *validator) {
	if r.Hubs.bad != "" {
		v.errAt("repagent.hub", "%s: want \"host:port\" or a list of them", r.Hubs.bad)
		return
	}
	if r.Hub == "" {
		if r.VM != "" || r.TLSCert != "" || r.TLSKey != "" || r.TLSCA != "" || r.QueueSize != "" || r.UUID != "" || r.Insecure ||
			r.ActivityLog != "" || r.ALExtents != 0 || r.ALExtentSize != "" {
			v.errAt("repagent.hub", "missing hub address")
		}
		return
	}
	seen := map[string]bool{}
	for _, h := range r.HubAddrs() {
		if _, _, err := net.SplitHostPort(h); err != nil {
			v.errAt("repagent.hub", "%q: want host:port", h)
		} else if seen[h] {
			v.errAt("repagent.hub", "%q: listed twice", h)
		}
		seen[h] = true
	}
	if r.VM == "" {
		v.errAt("repagent.vm", "missing vm name")
	}
	n := 0
	for _, f := range []string{r.TLSCert, r.TLSKey, r.TLSCA} {
		if f != "" {
			n++
		}
	}
	if n != 0 && n != 3 {
		v.errAt("repagent.tls-cert", "tls-cert, tls-key and tls-ca must all be set, or none")
	}
	r.QueueBytes = DefaultQueueSize
	if r.QueueSize != "" {
		q, err := ParseSize(r.QueueSize)
		if err != nil || q > 1<<40 {
			v.errAt("repagent.queue-size", "%q: want a size such as 64m, at most 1t", r.QueueSize)
		} else {
			r.QueueBytes = int64(q)
		}
	}
	switch r.ActivityLog {
	case "none":
		r.ALPath = ""
	case "":
		if r.VM != "" {
			r.ALPath = c.Path(r.VM + ".actlog")
		}
	default:
		r.ALPath = c.Path(r.ActivityLog)
	}
	if r.ALExtents < 0 || r.ALExtents > 65534 {
		v.errAt("repagent.al-extents", "%d: want 1 to 65534", r.ALExtents)
	}
	if r.ALExtentSize != "" {
		q, err := ParseSize(r.ALExtentSize)
		if err != nil || q < 4096 || q > 1<<30 || q&(q-1) != 0 {
			v.errAt("repagent.al-extent-size", "%q: want a power of two from 4k to 1g", r.ALExtentSize)
		} else {
			r.ALExtentBytes = q
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

// CephConfig returns the [ceph] section with its files resolved against
// the file's directory.
func (c *Config) CephConfig() ceph.Config {
	cc := c.Ceph
	cc.Conf = c.Path(cc.Conf)
	cc.Keyring = c.Path(cc.Keyring)
	return cc
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
