package repagent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets" // linear, for the test devices
	"github.com/vhostdm/vhostdm/vhost"
)

// FailoverExport is one recovery volume served by a failover test.
type FailoverExport struct {
	Volume  string `json:"volume"`
	Device  string `json:"device"` // the mapper device's name
	Socket  string `json:"socket"` // vhost-user-blk socket
	Sectors uint64 `json:"sectors"`
}

// failoverTest is a running failover test of one VM.
type failoverTest struct {
	m       *mapper.Manager
	exports []*vhost.Export
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	once    sync.Once
}

func (t *failoverTest) close() {
	t.once.Do(func() {
		t.cancel()
		for _, x := range t.exports {
			x.Close()
		}
		t.wg.Wait()
		t.m.Close()
	})
}

// testDevice marks what the test VM writes, so that it is read from the
// source again when the test ends.
type testDevice struct {
	*mapper.Device
	h *Hub
	v *hubVolume
}

// Submit implements vhost.Device.
func (d *testDevice) Submit(r *mapper.Request) error {
	if r.Op.IsWrite() {
		d.h.mu.Lock()
		addSectors(d.v.testDirty, r.Sector, r.Sectors, d.h.cfg.RegionSectors)
		d.h.mu.Unlock()
	}
	return d.Device.Submit(r)
}

// FailoverTest serves the recovery volumes of vm as writable
// vhost-user-blk exports with sockets in dir (VOLUME.sock), so that a test
// VM can boot on them. Every volume must be consistent: protecting, or
// disconnected with nothing left to resync. Mirrored writes that arrive
// meanwhile are not applied: their regions are read from the source when
// the test stops, together with whatever the test VM wrote.
func (h *Hub) FailoverTest(vmName, dir string) ([]FailoverExport, error) {
	h.mu.Lock()
	vm := h.vms[vmName]
	if vm == nil {
		h.mu.Unlock()
		return nil, fmt.Errorf("vm %q not found", vmName)
	}
	if vm.failover != nil {
		h.mu.Unlock()
		return nil, fmt.Errorf("vm %q: a failover test is already running", vmName)
	}
	var vols []*hubVolume
	for _, v := range vm.vols {
		if v.st.Version == 0 {
			continue
		}
		consistent := v.state == StateProtecting ||
			(v.state == StateDisconnected && v.st.Synced && len(v.st.Need) == 0 && v.need.IsEmpty() && v.inRead.IsEmpty())
		if !consistent {
			h.mu.Unlock()
			return nil, fmt.Errorf("vm %q: volume %q is %s, not consistent", vmName, v.name, v.state)
		}
		vols = append(vols, v)
	}
	if len(vols) == 0 {
		h.mu.Unlock()
		return nil, fmt.Errorf("vm %q has no recovery volumes", vmName)
	}
	slices.SortFunc(vols, func(a, b *hubVolume) int { return strings.Compare(a.name, b.name) })
	t := &failoverTest{}
	vm.failover = t
	prev := map[*hubVolume]string{}
	for _, v := range vols {
		prev[v] = v.state
		v.testDirty.Clear()
		h.setState(v, StateFailoverTest, "failover test started")
		v.changed = true
	}
	h.mu.Unlock()

	out, err := h.startTest(t, vm, vols, dir)
	if err != nil {
		t.close()
		h.mu.Lock()
		vm.failover = nil
		for _, v := range vols {
			h.setState(v, prev[v], "failover test failed to start")
		}
		h.mu.Unlock()
		return nil, err
	}
	for _, v := range vols {
		h.saveOffline(v)
	}
	return out, nil
}

// startTest creates the test devices and exports.
func (h *Hub) startTest(t *failoverTest, vm *hubVM, vols []*hubVolume, dir string) ([]FailoverExport, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("failover test: %w", err)
	}
	log := h.log.With("vm", vm.name, "failover_test", dir)
	t.m = mapper.NewManager(mapper.ManagerOptions{Logger: log})
	var ctx context.Context
	ctx, t.cancel = context.WithCancel(context.Background())
	var out []FailoverExport
	for _, v := range vols {
		name := vm.name + "-" + v.name
		if mapper.ValidateName(name) != nil {
			name = fmt.Sprintf("failover-%d", len(out))
		}
		dev, err := t.m.CreateTable(name, "", false, fmt.Sprintf("0 %d linear %s 0", v.sectors, v.imgPath))
		if err != nil {
			return nil, fmt.Errorf("failover test: volume %s: %w", v.name, err)
		}
		sock := filepath.Join(dir, v.name+".sock")
		x, err := vhost.NewExport(vhost.ExportConfig{ID: v.name, Socket: sock, Writable: true, Logger: log,
			Serial: serial(v.name)}, &testDevice{Device: dev, h: h, v: v})
		if err != nil {
			return nil, fmt.Errorf("failover test: volume %s: %w", v.name, err)
		}
		t.exports = append(t.exports, x)
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			if err := x.Serve(ctx); err != nil {
				log.Error("failover export stopped", "volume", v.name, "err", err)
			}
		}()
		out = append(out, FailoverExport{Volume: v.name, Device: name, Socket: sock, Sectors: v.sectors})
	}
	return out, nil
}

// serial fits a volume name into a virtio-blk serial.
func serial(name string) string {
	if len(name) > vhost.MaxSerialLen {
		return name[:vhost.MaxSerialLen]
	}
	return name
}

// FailoverTestStop ends vm's failover test: the exports go away, and the
// regions that the test VM wrote or that were mirrored meanwhile are read
// from the source again.
func (h *Hub) FailoverTestStop(vmName string) error {
	h.mu.Lock()
	vm := h.vms[vmName]
	if vm == nil {
		h.mu.Unlock()
		return fmt.Errorf("vm %q not found", vmName)
	}
	t := vm.failover
	if t == nil {
		h.mu.Unlock()
		return fmt.Errorf("vm %q: no failover test is running", vmName)
	}
	h.mu.Unlock()
	t.close()
	h.mu.Lock()
	vm.failover = nil
	var offline []*hubVolume
	for _, v := range vm.vols {
		if v.state != StateFailoverTest {
			continue
		}
		add := v.testDirty.Clone()
		v.testDirty.Clear()
		if c := v.conn; c != nil && v.mirror {
			h.setState(v, StateSyncing, "failover test stopped")
			c.markNeed(v, add)
			v.changed = true
			c.poke()
			continue
		}
		addExtents(add, v.st.Need, v.st.RegionSectors, h.cfg.RegionSectors, regionCount(v.sectors, h.cfg.RegionSectors))
		add.Or(v.need)
		v.need = add
		h.setState(v, StateDisconnected, "failover test stopped")
		offline = append(offline, v)
	}
	h.mu.Unlock()
	var errs []error
	for _, v := range offline {
		errs = append(errs, h.saveOffline(v))
	}
	return errors.Join(errs...)
}

// saveOffline saves the state of a volume that no connection checkpoints.
func (h *Hub) saveOffline(v *hubVolume) error {
	h.mu.Lock()
	if v.conn != nil {
		c := v.conn
		v.changed = true
		h.mu.Unlock()
		c.poke()
		return nil
	}
	v.st.Need = extentsOf(v.need)
	v.st.RegionSectors = h.cfg.RegionSectors
	v.st.FailoverTest = v.state == StateFailoverTest
	st := v.st
	h.mu.Unlock()
	return saveState(v.statePath, &st)
}
