// Package failover serves a hub's recovery volumes to a test VM: for each
// volume a linear mapper device over the recovery image (or a consistency
// group's copy of it) and a writable vhost-user-blk export, so that a
// test VM can boot on them while the source runs on. The hub engine
// (repagent/hub) decides which volumes are consistent and what is read
// again afterwards; this package builds the devices and exports.
package failover

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	_ "github.com/vhostdm/vhostdm/targets" // linear, for the test devices
	"github.com/vhostdm/vhostdm/vhost"
)

// Export is one recovery volume served by a failover test.
type Export struct {
	Volume  string `json:"volume"`
	Device  string `json:"device"` // the mapper device's name
	Socket  string `json:"socket"` // vhost-user-blk socket
	Sectors uint64 `json:"sectors"`
	// Image is the materialised copy served: a file, or with the Ceph
	// store the RBD clone rbd:POOL/IMAGE.
	Image string `json:"image"`
}

// Options are a failover test's settings.
type Options struct {
	Log *slog.Logger
	// Ceph, when set, is the cluster the test's rbd: volumes (the Ceph
	// store's clones) are opened in; the test opens and closes its own
	// connection.
	Ceph *ceph.Config
}

// Start serves the recovery volumes of vm, materialised at the consistent
// point sel selects (copies in dir/point; the live replicas are never
// served), as writable vhost-user-blk exports with sockets in dir
// (VOLUME.sock); see [hub.Hub.FailoverTestAt].
func Start(h *hub.Hub, vm, dir string, sel journal.Selector, log *slog.Logger) ([]Export, error) {
	return StartWith(h, vm, dir, sel, Options{Log: log})
}

// StartWith is Start with options: with the Ceph store, o.Ceph names the
// cluster its clones are served from.
func StartWith(h *hub.Hub, vm, dir string, sel journal.Selector, o Options) ([]Export, error) {
	var out []Export
	err := h.FailoverTestAt(vm, dir, sel, func(vm string, vols []hub.TestVolume) (io.Closer, error) {
		s, exps, err := serve(vm, vols, dir, o)
		out = exps
		return s, err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Stop ends vm's failover test and removes its copies.
func Stop(h *hub.Hub, vm string) error { return h.FailoverTestStop(vm) }

// End ends vm's failover test; with keep its copies stay and are
// returned (see [hub.Hub.FailoverTestEnd]).
func End(h *hub.Hub, vm string, keep bool) ([]string, error) { return h.FailoverTestEnd(vm, keep) }

// session is a running failover test's devices and exports.
type session struct {
	m       *mapper.Manager
	ceph    *ceph.Opener // nil without the Ceph store
	exports []*vhost.Export
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// Close stops the exports and removes the devices.
func (s *session) Close() error {
	s.cancel()
	for _, x := range s.exports {
		x.Close()
	}
	s.wg.Wait()
	err := s.m.Close()
	if s.ceph != nil {
		err = errors.Join(err, s.ceph.Close())
	}
	return err
}

// tracked reports what the test VM writes to the hub, so that it is read
// from the source again when the test ends.
type tracked struct {
	*mapper.Device
	written func(sector, sectors uint64)
}

// Submit implements vhost.Device.
func (d *tracked) Submit(r *mapper.Request) error {
	if r.Op.IsWrite() {
		d.written(r.Sector, r.Sectors)
	}
	return d.Device.Submit(r)
}

// serve creates the test devices and exports; on error, what was made is
// undone.
func serve(vm string, vols []hub.TestVolume, dir string, o Options) (*session, []Export, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	log := o.Log.With("vm", vm, "failover_test", dir)
	s := &session{}
	mo := mapper.ManagerOptions{Logger: log}
	if o.Ceph != nil {
		s.ceph = ceph.NewOpener(*o.Ceph, log)
		mo.Schemes = map[string]mapper.OpenFunc{ceph.Scheme: s.ceph.Open}
	}
	s.m = mapper.NewManager(mo)
	var ctx context.Context
	ctx, s.cancel = context.WithCancel(context.Background())
	var out []Export
	fail := func(err error) (*session, []Export, error) {
		return nil, nil, errors.Join(err, s.Close())
	}
	for _, v := range vols {
		name := vm + "-" + v.Name
		if mapper.ValidateName(name) != nil {
			name = fmt.Sprintf("failover-%d", len(out))
		}
		dev, err := s.m.CreateTable(name, "", false, fmt.Sprintf("0 %d linear %s 0", v.Sectors, v.Path))
		if err != nil {
			return fail(fmt.Errorf("volume %s: %w", v.Name, err))
		}
		sock := filepath.Join(dir, v.Name+".sock")
		var xd vhost.Device = dev // a copy: nothing to read again afterwards
		if v.Written != nil {
			xd = &tracked{Device: dev, written: v.Written}
		}
		x, err := vhost.NewExport(vhost.ExportConfig{ID: v.Name, Socket: sock, Writable: true, Logger: log,
			Serial: serial(v.Name)}, xd)
		if err != nil {
			return fail(fmt.Errorf("volume %s: %w", v.Name, err))
		}
		s.exports = append(s.exports, x)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := x.Serve(ctx); err != nil {
				log.Error("failover export stopped", "volume", v.Name, "err", err)
			}
		}()
		out = append(out, Export{Volume: v.Name, Device: name, Socket: sock, Sectors: v.Sectors, Image: v.Path})
	}
	return s, out, nil
}

// serial fits a volume name into a virtio-blk serial.
func serial(name string) string {
	if len(name) > vhost.MaxSerialLen {
		return name[:vhost.MaxSerialLen]
	}
	return name
}
