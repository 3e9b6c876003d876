package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/logging"
	"github.com/vhostdm/vhostdm/internal/sdnotify"
	"github.com/vhostdm/vhostdm/internal/unixsock"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/metrics"
	"github.com/vhostdm/vhostdm/qmp"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/agent/actlog"
	"github.com/vhostdm/vhostdm/repagent/wire"
	"github.com/vhostdm/vhostdm/targets/replicator"
	"github.com/vhostdm/vhostdm/vhost"
)

func init() {
	register("serve", "serve the configured devices over vhost-user-blk", runServe)
}

// demoDir is where `vhostdm serve` without a configuration keeps its demo.
const demoDir = "vhostdm-demo"

// demoFile names the demo's built-in configuration in messages.
const demoFile = "(demo)"

// demoSize is the size of the demo's sparse disk image.
const demoSize = 1 << 30

func runServe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	file := fs.String("c", "", "configuration `FILE` (none: a demo under ./"+demoDir+")")
	fs.StringVar(file, "config", "", "configuration `FILE` (same as -c)")
	level := fs.String("log-level", "info", "log `LEVEL`: debug, info, warn or error")
	format := fs.String("log-format", "text", "log `FORMAT`: text or json")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: vhostdm serve [-c FILE]")
		return 2
	}
	log, err := logging.New(stderr, *level, *format)
	if err != nil {
		fmt.Fprintf(stderr, "vhostdm serve: %v\n", err)
		return 2
	}

	var c *config.Config
	if *file == "" {
		c, err = demoConfig(demoDir)
	} else {
		c, err = config.Load(*file)
	}
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	d, err := startDaemon(ctx, c, log)
	if err != nil {
		fmt.Fprintf(stderr, "vhostdm serve: %v\n", err)
		return 1
	}
	if *file == "" {
		fmt.Fprintln(stdout, demoBanner(c))
	}
	if err := sdnotify.Notify(sdnotify.Ready, sdnotify.Status(d.summary())); err != nil {
		log.Warn("readiness notification", "err", err)
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for done := false; !done; {
		select {
		case <-d.ctx.Done():
			done = true
		case <-hup:
			if *file == "" {
				log.Warn("SIGHUP ignored: the demo has no configuration file")
				continue
			}
			sdnotify.Notify(sdnotify.Reloading)
			if err := d.reloadConfig(*file); err != nil {
				log.Error("configuration reload failed; nothing changed unless logged above", "err", err)
			}
			sdnotify.Notify(sdnotify.Ready, sdnotify.Status(d.summary()))
		}
	}
	sdnotify.Notify(sdnotify.Stopping)
	log.Info("shutting down")
	if err := d.Close(); err != nil {
		log.Error("shutdown", "err", err)
		return 1
	}
	log.Info("stopped")
	return 0
}

// daemon is a running vhostdm: devices, exports and the QMP server.
type daemon struct {
	ctx    context.Context
	cancel context.CancelFunc
	log    *slog.Logger
	m      *mapper.Manager
	ceph   *ceph.Opener // opens the rbd: backends of d.m
	qmp    *qmp.Server  // nil without a QMP socket
	events atomic.Pointer[qmp.Server]
	ex     *exportSet
	wg     sync.WaitGroup

	metrics     *metrics.Metrics // nil without [metrics] listen
	metricsAddr string           // where /metrics is served
	reloadMu    sync.Mutex       // one configuration reload at a time
	cfg         *config.Config   // the configuration last applied

	agent     *agent.Agent                   // nil without [repagent]
	repVM     string                         // [repagent] vm
	repOpts   map[string]agent.VolumeOptions // by export id, from the configuration; guarded by ex.mu
	repTLSSum [32]byte                       // of the [repagent] TLS files in use (reloadMu)
}

// startDaemon creates the devices of c in dependency order, opens its
// exports and its QMP socket, and serves until ctx is done or QMP quit.
func startDaemon(ctx context.Context, c *config.Config, log *slog.Logger) (*daemon, error) {
	d := &daemon{log: log, cfg: c}
	d.ctx, d.cancel = context.WithCancel(ctx)
	d.ceph = ceph.NewOpener(c.CephConfig(), log)
	d.m = mapper.NewManager(mapper.ManagerOptions{Logger: log, Dir: c.Dir, StateDir: c.StatePath(), Schemes: map[string]mapper.OpenFunc{ceph.Scheme: d.ceph.Open}, Events: func(e mapper.Event) {
		if s := d.events.Load(); s != nil {
			s.MapperEvent(e)
		}
	}})
	d.ex = &exportSet{d: d, exports: map[string]*export{}, nbdServers: map[string]*nbdServer{}}
	fail := func(err error) (*daemon, error) {
		d.Close()
		return nil, err
	}
	order, err := c.DeviceOrder()
	if err != nil {
		return fail(err)
	}
	// replicator's repagent site links reach the hub as this VM, with
	// the [repagent] table's identity and TLS.
	tc, err := repagentTLS(c)
	if err != nil {
		return fail(err)
	}
	replicator.SetRepagentSettings(d.m, replicator.RepagentSettings{VM: c.RepAgent.VM, UUID: c.RepAgent.UUID,
		TLS: tc, Insecure: c.RepAgent.Insecure, Logger: log})
	var backing *agent.BackingCheck
	if c.RepAgent.Hub != "" && c.RepAgent.ALPath != "" {
		// Before the tables open (and may write) the files: were the
		// protected volumes' files written since the last stop?
		backing = agent.CheckBacking(c.RepAgent.ALPath)
	}
	for _, dc := range order {
		if _, err := d.m.CreateTableWith(dc.Name, dc.UUID, dc.Options(), dc.Table); err != nil {
			return fail(c.TableError(c.DeviceIndex(dc.Name), errors.Unwrap(err)))
		}
	}
	if c.RepAgent.Hub != "" {
		if d.agent, d.repOpts, err = newAgent(c, d.m, backing, log); err != nil {
			return fail(err)
		}
		d.repVM = c.RepAgent.VM
		if d.repTLSSum, err = tlsSum(c); err != nil {
			return fail(err)
		}
	}
	if c.Metrics.Listen != "" {
		ln, err := metrics.Listen(c.Metrics.Listen)
		if err != nil {
			return fail(err)
		}
		d.metrics = metrics.New()
		d.metrics.Devices(d.m)
		d.metrics.Queues(d.ex.queueDepths)
		d.metrics.Renotifies(d.ex.renotifies)
		if d.agent != nil {
			d.metrics.Agent(d.agent)
		}
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := metrics.Serve(d.ctx, ln, d.metrics.Registry(), log); err != nil {
				log.Error("metrics endpoint stopped", "err", err)
			}
		}()
		d.metricsAddr = ln.Addr().String()
		log.Info("metrics listening", "addr", d.metricsAddr)
	}
	if c.QMP.Socket != "" {
		ln, err := unixsock.Listen(c.Path(c.QMP.Socket), c.QMP.Perm())
		if err != nil {
			return fail(fmt.Errorf("qmp: %w", err))
		}
		d.qmp = qmp.NewServer(qmp.Config{Manager: d.m, Exports: d.ex, Logger: log, Version: Version, OnQuit: d.cancel,
			Extra: []qmp.ExtraCommand{{Name: "reload-config", Mutates: true, Run: d.qmpReloadConfig},
				{Name: "repagent-checkpoint", Required: []string{"vm", "name"}, Mutates: true, Run: d.qmpCheckpoint},

				{Name: "query-repagent", Run: d.qmpQueryRepagent}}})
		d.events.Store(d.qmp)
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := d.qmp.Serve(d.ctx, ln); err != nil && !errors.Is(err, qmp.ErrServerClosed) {
				log.Error("qmp server stopped", "err", err)
			}
		}()
		log.Info("qmp listening", "socket", c.Path(c.QMP.Socket))
	}
	for _, e := range c.Exports {
		if err := d.ex.Add(exportOptions(c, e)); err != nil {
			return fail(fmt.Errorf("%s: export %q: %w", c.File, e.ID, err))
		}
	}
	if d.agent != nil {
		// Started once every export is attached: its first report
		// names all of the VM's protected disks, so the hub never
		// takes a point that holds some of them for the whole VM.
		go d.agent.Run(context.Background()) // Close stops it after draining
	}
	log.Info("ready", "devices", len(order), "exports", len(c.Exports))
	return d, nil
}

// Close stops accepting front ends, lets in-flight I/O finish, flushes and
// closes every device.
func (d *daemon) Close() error {
	d.cancel()
	var errs []error
	if d.qmp != nil {
		d.qmp.Close()
	}
	errs = append(errs, d.ex.closeAll())
	if d.agent != nil {
		// Drains the mirror queue and tells the hub (AGENT_SHUTDOWN), so
		// that the next start resumes replication without a resync.
		if err := d.agent.Close(); err != nil {
			d.log.Warn("replication agent", "err", err)
		}
	}
	d.wg.Wait()
	if d.agent != nil {
		// Nothing writes the protected volumes any more and their
		// devices are still open: storage that is not files (rbd:)
		// is marked for the next start to compare.
		d.agent.MarkBackings()
	}
	errs = append(errs, d.m.Close())
	errs = append(errs, d.ceph.Close()) // after the devices: they flushed through it
	if d.agent != nil {
		// Nothing writes the protected volumes' files any more: the
		// next start compares them with what they are now.
		d.agent.RecordStop()
	}
	return errors.Join(errs...)
}

// repagentTLS returns the TLS configuration of c's [repagent] table, or
// nil without one.
func repagentTLS(c *config.Config) (*tls.Config, error) {
	r := c.RepAgent
	if r.TLSCert == "" {
		return nil, nil
	}
	tc, err := wire.TLSFiles{Cert: c.Path(r.TLSCert), Key: c.Path(r.TLSKey), CA: c.Path(r.TLSCA)}.TLSConfig(false)
	if err != nil {
		return nil, fmt.Errorf("%s: repagent: %w", c.File, err)
	}
	return tc, nil
}

// newAgent makes the replication agent of c's [repagent] table and the
// replication options of its exports.
func newAgent(c *config.Config, m *mapper.Manager, backing *agent.BackingCheck, log *slog.Logger) (*agent.Agent, map[string]agent.VolumeOptions, error) {
	r := c.RepAgent
	cfg := agent.Config{Hubs: r.HubAddrs(), VM: r.VM, UUID: r.UUID, Insecure: r.Insecure, QueueBytes: r.QueueBytes, Logger: log}
	if r.ALPath != "" {
		// The log covers the exports protected at start, at their
		// devices' sizes now; exports added by a reload are resynced in
		// full after a crash.
		cfg.ActivityLog = agent.ActivityLog{Path: r.ALPath, Extents: r.ALExtents, ExtentSize: r.ALExtentBytes, Backing: backing}
		for _, e := range c.Exports {
			if !e.Protect {
				continue
			}
			dev, err := m.Get(e.Device)
			if err != nil {
				return nil, nil, fmt.Errorf("%s: export %q: %w", c.File, e.ID, err)
			}
			cfg.ActivityLog.Volumes = append(cfg.ActivityLog.Volumes, actlog.Volume{Name: e.ID, Size: dev.Size() * mapper.SectorSize})
		}
	}
	tc, err := repagentTLS(c)
	if err != nil {
		return nil, nil, err
	}
	cfg.TLS = tc
	a, err := agent.New(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", c.File, err)
	}
	return a, repOptions(c), nil
}

// exportSet holds the daemon's exports by id; it implements qmp.Exports.
type exportSet struct {
	d *daemon

	mu         sync.Mutex
	exports    map[string]*export
	nbdServers map[string]*nbdServer // by address, see nbd.go
	nbdDefault string                // address of nbd-server-start's server, "" if none
}

type export struct {
	opts qmp.ExportOptions
	x    *vhost.Export // nil for an NBD export
	nbd  *nbdExport    // nil for a vhost-user-blk export
	dev  *mapper.Device
	done chan struct{} // closed when Serve returns
}

// Add implements qmp.Exports.
func (s *exportSet) Add(o qmp.ExportOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.exports[o.ID]; dup {
		return fmt.Errorf("export id %q is already in use", o.ID)
	}
	dev, err := s.d.m.Get(o.NodeName)
	if err != nil {
		return err
	}
	if o.Writable && dev.ReadOnly() {
		return fmt.Errorf("device %s is read-only", o.NodeName)
	}
	if lbs := max(int(o.LogicalBlockSize), mapper.SectorSize); lbs < dev.BlockSize() {
		return fmt.Errorf("logical-block-size %d is smaller than the %d-byte logical block of device %s's O_DIRECT backends (cache = \"none\")",
			lbs, dev.BlockSize(), o.NodeName)
	}
	if o.Type == config.TypeNBD {
		return s.addNBD(o, dev)
	}
	// connection reports a front end arriving (up) or leaving: a QMP
	// event and, with metrics, a counter.
	connection := func(up bool) func() {
		event := qmp.EventVhostUserDisconnected
		if up {
			event = qmp.EventVhostUserConnected
		}
		return func() {
			if m := s.d.metrics; m != nil {
				if up {
					m.Connected(o.ID)
				} else {
					m.Disconnected(o.ID)
				}
			}
			if q := s.d.events.Load(); q != nil {
				q.Emit(event, map[string]any{"id": o.ID})
			}
		}
	}
	var vdev vhost.Device = dev
	if s.d.metrics != nil {
		vdev = s.d.metrics.Wrap(o.ID, o.NodeName, vdev)
	}
	if s.d.agent != nil {
		// Reported to the hub; protected exports mirror their writes.
		ro := s.d.repOpts[o.ID]
		if ro.Protect {
			ro.Backing = dev.Backing // what the hub's replica must be a copy of
			ro.Reloads = dev.OnReload
			ro.MarkBacking, ro.ChangedSince = dev.MarkBacking, dev.ChangedSince // rbd: snapshots
		}
		if vdev, err = s.d.agent.Attach(o.ID, vdev, ro); err != nil {
			return err
		}
	}
	x, err := vhost.NewExport(vhost.ExportConfig{
		ID: o.ID, Socket: o.Socket, NumQueues: o.NumQueues, Writable: o.Writable,
		LogicalBlockSize: o.LogicalBlockSize, Serial: o.Serial,
		SocketOwner: o.SocketOwner, SocketGroup: o.SocketGroup, SocketMode: o.SocketMode,
		NegotiationTimeout: o.NegotiationTimeout,
		Poll:               o.Poll,
		NoAdaptivePoll:     o.NoAdaptivePoll,
		Table:              dev,
		Logger:             s.d.log,
		OnConnect:          connection(true), OnDisconnect: connection(false),
	}, vdev)
	if err != nil {
		if s.d.agent != nil {
			s.d.agent.Detach(o.ID)
		}
		return err
	}
	dev.Open()
	e := &export{opts: o, x: x, dev: dev, done: make(chan struct{})}
	s.exports[o.ID] = e
	go func() {
		defer close(e.done)
		if err := x.Serve(s.d.ctx); err != nil {
			s.d.log.Error("export stopped", "export", o.ID, "err", err)
		}
	}()
	return nil
}

// Del implements qmp.Exports.
func (s *exportSet) Del(id, mode string) error {
	s.mu.Lock()
	e, ok := s.exports[id]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("export %q not found", id)
	}
	if mode != "hard" && e.connected() {
		s.mu.Unlock()
		return fmt.Errorf("export %q is in use by a front end (use mode hard to disconnect it)", id)
	}
	delete(s.exports, id)
	s.mu.Unlock()
	err := e.close()
	if s.d.agent != nil {
		s.d.agent.Detach(id)
	}
	return err
}

func (e *export) close() error {
	if e.nbd != nil {
		err := e.nbd.close()
		e.dev.Close()
		return err
	}
	err := e.x.Close()
	<-e.done
	e.dev.Close()
	return err
}

func (e *export) connected() bool {
	if e.nbd != nil {
		return e.nbd.connected()
	}
	return e.x.Connected()
}

// List implements qmp.Exports.
func (s *exportSet) List() []qmp.ExportInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []qmp.ExportInfo
	for id, e := range s.exports {
		typ := config.TypeVhostUserBlk
		if e.nbd != nil {
			typ = config.TypeNBD
		}
		out = append(out, qmp.ExportInfo{Type: typ, ID: id, NodeName: e.opts.NodeName})
	}
	slices.SortFunc(out, func(a, b qmp.ExportInfo) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// queueDepths returns every connected export's virtqueue depths.
func (s *exportSet) queueDepths() map[string][]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string][]int{}
	for id, e := range s.exports {
		if e.x == nil {
			continue
		}
		if q := e.x.QueueDepths(); q != nil {
			out[id] = q
		}
	}
	return out
}

// renotifies returns every vhost-user export's lost-interrupt counter.
func (s *exportSet) renotifies() map[string]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]uint64{}
	for id, e := range s.exports {
		if e.x != nil {
			out[id] = e.x.Renotifies()
		}
	}
	return out
}

func (s *exportSet) closeAll() error {
	s.mu.Lock()
	all := s.exports
	s.exports = map[string]*export{}
	s.mu.Unlock()
	var errs []error
	for _, e := range all {
		errs = append(errs, e.close())
	}
	s.closeNBDServers()
	return errors.Join(errs...)
}

// demoConfig makes the demo's directory and sparse 1 GiB image, and returns
// the configuration that serves it.
func demoConfig(dir string) (*config.Config, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	img := filepath.Join(abs, "disk.img")
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	} else if st.Size() < demoSize {
		if err := f.Truncate(demoSize); err != nil {
			return nil, fmt.Errorf("demo: %w", err)
		}
	}
	text := fmt.Sprintf(`[qmp]
socket = "qmp.sock"

[[device]]
name = "demo"
table = "0 %d linear disk.img 0"

[[export]]
id = "demo0"
device = "demo"
socket = "disk.sock"
writable = true
serial = "vhostdm-demo"
`, demoSize/mapper.SectorSize)
	return config.Parse([]byte(text), demoFile, abs)
}

// demoBanner tells how to attach the demo disk to QEMU.
func demoBanner(c *config.Config) string {
	sock := c.Path(c.Exports[0].Socket)
	return fmt.Sprintf(`vhostdm demo: a 1 GiB sparse disk (%s) is served at %s
QMP control socket: %s   (try: vhostdm ctl --qmp %s table)

Attach it to a VM with (guest memory must be shared with vhostdm):

  qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 1G \
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
    -chardev socket,id=vdisk0,path=%s,reconnect-ms=500 \
    -device vhost-user-blk-pci,chardev=vdisk0,num-queues=1 \
    ...your boot disk or -kernel/-initrd...

In the guest the disk is a virtio disk (/dev/vda) with serial "vhostdm-demo".
Stop with Ctrl-C: in-flight I/O completes and the image is flushed.`,
		c.Path("disk.img"), sock, c.Path(c.QMP.Socket), c.Path(c.QMP.Socket), sock)
}
