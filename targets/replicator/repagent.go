package replicator

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// The repagent site link: a site that is a repagent hub. Parameters:
//
//	<slink_nr> <hub host:port> [sync|async [ios <N> | size <N>[unit] | timeout <N>[unit]]]
//
// (the policy words as blockdev's). Its <dev_params> are one word, the
// volume's name at the hub. Every replicator-dev of the log with a device
// at this site is a volume of one repagent agent (one connection, one
// sequence of frames): the agent says it is a consistency group (HELLO
// flag GROUP), the site's worker sends the log's entries in log order
// across the devices, and the engine's own resynchronisation (dirty logs,
// region copies) replaces the hub's remote reads. The engine tells the hub
// when the site holds a prefix of the log (GROUP_STATE), which is when
// repagent-failover-test may present the replicas.
func init() {
	SiteLinkTypes.Register("repagent", &SiteLinkType{Name: "repagent", Version: [3]int{1, 0, 0}, New: newRepagentLink})
}

// RepagentSettings are the daemon's [repagent] settings that repagent site
// links use: the VM name and the TLS client configuration. cmd/vhostdm
// sets them with SetRepagentSettings before loading tables.
type RepagentSettings struct {
	// VM is the VM's name at the hub; empty: the replicator device's name.
	VM   string
	UUID string
	// TLS, when set, is used to dial the hub; without it the hub must be
	// on a loopback address or Insecure set.
	TLS      *tls.Config
	Insecure bool
	// Logger receives the agents' logs; nil: the table's logger.
	Logger *slog.Logger
	// Tune, when set, adjusts each agent's configuration (heartbeats and
	// back-off in tests).
	Tune func(*agent.Config)
}

// settingsKey is the key of a Manager's repagent settings (Manager.Shared):
// the settings belong to the daemon's Manager, not to the process.
type settingsKey struct{}

// settingsHolder holds one Manager's RepagentSettings.
type settingsHolder struct {
	mu sync.Mutex
	s  RepagentSettings
}

func newSettingsHolder() any { return &settingsHolder{} }

// SetRepagentSettings sets what repagent site links of m's tables loaded
// from now on use.
func SetRepagentSettings(m *mapper.Manager, s RepagentSettings) {
	h := m.Shared(settingsKey{}, newSettingsHolder).(*settingsHolder)
	h.mu.Lock()
	h.s = s
	h.mu.Unlock()
}

// groupKey identifies a site's agent: one per hub, VM and site number.
type groupKey struct {
	hub, vm string
	nr      uint32
}

// groupAgent is a running agent shared by the tables of one site.
type groupAgent struct {
	agent  *agent.Agent
	cancel context.CancelFunc
	done   chan struct{}
	refs   int
	vols   map[string]uint64 // attached volume names and sizes
}

// groupRegistry holds the running agents of a Manager.
type groupRegistry struct {
	mu     sync.Mutex
	agents map[groupKey]*groupAgent
}

type groupRegistryKey struct{}

type repagentLink struct {
	blockdevLink // number and policy
	hub, vm      string
	reg          *groupRegistry
	cfg          agent.Config
	args         []string // as given, for TABLE
}

func newRepagentLink(c *mapper.Ctx, args []string) (SiteLink, error) {
	if len(args) != 2 && len(args) != 3 && len(args) != 5 {
		return nil, fmt.Errorf("repagent: want <slink_nr> <hub address> [sync|async [ios|size|timeout <N>]], got %d parameters", len(args))
	}
	bl, err := newBlockdevLink(c, append([]string{args[0]}, args[2:]...))
	if err != nil {
		return nil, fmt.Errorf("repagent: %w", err)
	}
	if bl.Nr() == 0 {
		return nil, errors.New("repagent: slink 0 is the local site, it cannot be a hub")
	}
	h := c.Shared(settingsKey{}, newSettingsHolder).(*settingsHolder)
	h.mu.Lock()
	set := h.s
	h.mu.Unlock()
	vm := set.VM
	if vm == "" {
		vm = c.Device
	}
	logger := set.Logger
	if logger == nil {
		logger = c.Logger()
	}
	cfg := agent.Config{Hub: args[1], VM: vm, UUID: set.UUID, TLS: set.TLS, Insecure: set.Insecure,
		Group: true, DrainTimeout: 5 * time.Second, Logger: logger}
	if set.Tune != nil {
		set.Tune(&cfg)
	}
	// Checks the address, name and TLS rules now, not when the site
	// starts.
	if _, err := agent.New(cfg); err != nil {
		return nil, fmt.Errorf("slink %d: %w", bl.Nr(), err)
	}
	reg := c.Shared(groupRegistryKey{}, func() any {
		return &groupRegistry{agents: map[groupKey]*groupAgent{}}
	}).(*groupRegistry)
	return &repagentLink{blockdevLink: *bl.(*blockdevLink), hub: args[1], vm: vm, reg: reg, cfg: cfg, args: args}, nil
}

func (l *repagentLink) key() groupKey { return groupKey{l.hub, l.vm, l.nr} }

// Table implements SiteLink.
func (l *repagentLink) Table() string {
	return fmt.Sprintf("repagent %d %s", len(l.args), strings.Join(l.args, " "))
}

// StartSite implements SiteStarter: the site's agent connects to the hub.
func (l *repagentLink) StartSite() func() {
	l.reg.mu.Lock()
	defer l.reg.mu.Unlock()
	k := l.key()
	g := l.reg.agents[k]
	if g == nil {
		a, err := agent.New(l.cfg)
		if err != nil { // checked by the constructor
			panic(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		g = &groupAgent{agent: a, cancel: cancel, done: make(chan struct{}), vols: map[string]uint64{}}
		go func() {
			defer close(g.done)
			a.Run(ctx)
		}()
		l.reg.agents[k] = g
	}
	g.refs++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.reg.mu.Lock()
			g.refs--
			last := g.refs == 0
			if last {
				delete(l.reg.agents, k)
			}
			l.reg.mu.Unlock()
			if last {
				g.agent.Close()
				g.cancel()
				<-g.done
			}
		})
	}
}

// group returns the site's running agent.
func (l *repagentLink) group() (*groupAgent, error) {
	l.reg.mu.Lock()
	defer l.reg.mu.Unlock()
	g := l.reg.agents[l.key()]
	if g == nil {
		return nil, fmt.Errorf("slink %d: the site is not running", l.nr)
	}
	return g, nil
}

// SetConsistent implements ConsistencyReporter.
func (l *repagentLink) SetConsistent(consistent bool) {
	if g, err := l.group(); err == nil {
		g.agent.SetConsistent(consistent)
	}
}

// DevParams implements SiteLink: the volume name.
func (l *repagentLink) DevParams() int { return 1 }

// OpenDevice implements SiteLink: the replicator-dev becomes a protected
// volume of the site's agent, of the replicator-dev's size.
func (l *repagentLink) OpenDevice(c *mapper.Ctx, params []string) (SiteDevice, error) {
	if len(params) != 1 {
		return nil, fmt.Errorf("slink %d: repagent devices take 1 parameter (volume name), got %d", l.nr, len(params))
	}
	name := params[0]
	if err := wire.CheckName(name); err != nil {
		return nil, fmt.Errorf("slink %d: volume name %q: %w", l.nr, name, err)
	}
	g, err := l.group()
	if err != nil {
		return nil, err
	}
	l.reg.mu.Lock()
	defer l.reg.mu.Unlock()
	if size, ok := g.vols[name]; ok {
		// A reload of the replicator-dev: the volume stays attached.
		if size != c.Length {
			return nil, fmt.Errorf("slink %d: volume %q is attached with %d sectors, the table has %d", l.nr, name, size, c.Length)
		}
	} else {
		if _, err := g.agent.Attach(name, hubVolume{sectors: c.Length}, agent.VolumeOptions{Protect: true}); err != nil {
			return nil, fmt.Errorf("slink %d: %w", l.nr, err)
		}
		g.vols[name] = c.Length
	}
	return &repagentDevice{agent: g.agent, name: name, sectors: c.Length, sync: l.policy.Sync}, nil
}

// hubVolume is what the agent wraps for a group volume: writes come
// through MirrorWrite and the hub reads nothing, so it serves no I/O.
type hubVolume struct{ sectors uint64 }

func (v hubVolume) Submit(r *mapper.Request) error {
	return fmt.Errorf("repagent site volume: %s: %w", r.Op, mapper.ErrUnsupported)
}
func (v hubVolume) Size() uint64                                  { return v.sectors }
func (v hubVolume) ReadOnly() bool                                { return false }
func (v hubVolume) OnResize(func(oldSize, newSize uint64)) func() { return func() {} }

// repagentDevice is a replicator-dev's volume at the hub.
type repagentDevice struct {
	agent   *agent.Agent
	name    string
	sectors uint64
	sync    bool
}

// Apply implements SiteDevice: the entry is queued to the hub. A discard
// is replicated as zeroing (as blockdev does), so that the hub's replica
// reads what the others do. A sync site waits for the hub's
// acknowledgement.
func (d *repagentDevice) Apply(op mapper.Op, sector, sectors uint64, data []byte) error {
	if op == mapper.OpDiscard {
		op = mapper.OpWriteZeroes
	}
	if op != mapper.OpWrite && op != mapper.OpWriteZeroes {
		return fmt.Errorf("volume %s: cannot apply %s: %w", d.name, op, mapper.ErrUnsupported)
	}
	if err := d.agent.MirrorWrite(d.name, op, sector, sectors, data); err != nil {
		return err
	}
	if d.sync {
		return d.agent.Sync()
	}
	return nil
}

// Flush implements SiteDevice: every entry queued so far is durable at the
// hub, or the error says some may be lost.
func (d *repagentDevice) Flush() error { return d.agent.Sync() }

// Sectors implements SiteDevice.
func (d *repagentDevice) Sectors() (uint64, error) { return d.sectors, nil }

// Table implements SiteDevice.
func (d *repagentDevice) Table() []string { return []string{d.name} }
