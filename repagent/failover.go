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

	"golang.org/x/sys/unix"

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
	copies  []string // a consistency group's test copies, removed at the end
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
		if t.m != nil {
			t.m.Close()
		}
		for _, p := range t.copies {
			os.Remove(p)
		}
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
//
// A consistency group (see PROTOCOL.md) must also be consistent by its
// source's word; its test runs on copies of the recovery volumes
// (dir/VOLUME.img) taken between two applied writes, and mirroring goes
// on.
func (h *Hub) FailoverTest(vmName, dir string) ([]FailoverExport, error) {
	h.mu.Lock()
	vm := h.vms[vmName]
	h.mu.Unlock()
	if vm == nil {
		return nil, fmt.Errorf("vm %q not found", vmName)
	}
	// Between two applied writes: the replicas are a prefix of the
	// write order across the VM's volumes.
	vm.apply.Lock()
	defer vm.apply.Unlock()
	h.mu.Lock()
	if vm.failover != nil {
		h.mu.Unlock()
		return nil, fmt.Errorf("vm %q: a failover test is already running", vmName)
	}
	if vm.groupInconsistent() {
		h.mu.Unlock()
		return nil, fmt.Errorf("vm %q: its consistency group is being resynchronised by the source, not consistent", vmName)
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
	sizes := make([]uint64, len(vols))
	for i, v := range vols {
		sizes[i] = v.sectors
	}
	if vm.isGroup() {
		// A consistency group is resynchronised by its source, which
		// cannot be asked to copy what the test VM changes: the test
		// runs on copies taken between two applied writes, and
		// mirroring goes on.
		h.mu.Unlock()
		imgs, err := copyReplicas(t, vols, dir)
		var out []FailoverExport
		if err == nil {
			out, err = h.startTest(t, vm, vols, sizes, imgs, dir)
		}
		if err != nil {
			t.close()
			h.mu.Lock()
			vm.failover = nil
			h.mu.Unlock()
			return nil, err
		}
		return out, nil
	}
	prev := map[*hubVolume]string{}
	for _, v := range vols {
		prev[v] = v.state
		v.testDirty.Clear()
		h.setState(v, StateFailoverTest, "failover test started")
		v.changed = true
	}
	h.mu.Unlock()

	imgs := make([]string, len(vols))
	for i, v := range vols {
		imgs[i] = v.imgPath
	}
	out, err := h.startTest(t, vm, vols, sizes, imgs, dir)
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
func (h *Hub) startTest(t *failoverTest, vm *hubVM, vols []*hubVolume, sizes []uint64, imgs []string, dir string) ([]FailoverExport, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("failover test: %w", err)
	}
	log := h.log.With("vm", vm.name, "failover_test", dir)
	t.m = mapper.NewManager(mapper.ManagerOptions{Logger: log})
	var ctx context.Context
	ctx, t.cancel = context.WithCancel(context.Background())
	var out []FailoverExport
	for i, v := range vols {
		name := vm.name + "-" + v.name
		if mapper.ValidateName(name) != nil {
			name = fmt.Sprintf("failover-%d", len(out))
		}
		dev, err := t.m.CreateTable(name, "", false, fmt.Sprintf("0 %d linear %s 0", sizes[i], imgs[i]))
		if err != nil {
			return nil, fmt.Errorf("failover test: volume %s: %w", v.name, err)
		}
		sock := filepath.Join(dir, v.name+".sock")
		var xd vhost.Device = &testDevice{Device: dev, h: h, v: v}
		if len(t.copies) > 0 {
			xd = dev // a copy: nothing to read again afterwards
		}
		x, err := vhost.NewExport(vhost.ExportConfig{ID: v.name, Socket: sock, Writable: true, Logger: log,
			Serial: serial(v.name)}, xd)
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
		out = append(out, FailoverExport{Volume: v.name, Device: name, Socket: sock, Sectors: sizes[i]})
	}
	return out, nil
}

// copyReplicas copies the recovery volumes of a consistency group into dir
// (VOLUME.img), as reflinks where the file system can; the caller holds
// the VM's apply lock, so the copies are one point of the group's write
// order.
func copyReplicas(t *failoverTest, vols []*hubVolume, dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("failover test: %w", err)
	}
	var out []string
	for _, v := range vols {
		dst := filepath.Join(dir, v.name+".img")
		t.copies = append(t.copies, dst)
		if err := copyFile(v.imgPath, dst); err != nil {
			return nil, fmt.Errorf("failover test: copy of volume %s: %w", v.name, err)
		}
		out = append(out, dst)
	}
	return out, nil
}

// copyFile copies src to a new file dst, sharing extents (FICLONE) where
// the file system can, skipping holes otherwise.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = copyData(in, out)
	return errors.Join(err, out.Close())
}

func copyData(in, out *os.File) error {
	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
		return nil
	}
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	if err := out.Truncate(size); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: only a hole is left
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		for p := data; p < hole; {
			n, err := in.ReadAt(buf[:min(int64(len(buf)), hole-p)], p)
			if n > 0 {
				if _, werr := out.WriteAt(buf[:n], p); werr != nil {
					return werr
				}
				p += int64(n)
			}
			if err != nil {
				return err
			}
		}
		off = hole
	}
	return out.Sync()
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
