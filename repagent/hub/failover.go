package hub

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestVolume is a recovery volume handed to a failover test's
// [TestRunner].
type TestVolume struct {
	Name    string // the volume's name
	Path    string // the image to serve: the recovery volume, or a consistency group's copy of it
	Sectors uint64
	// Written, when not nil, takes the ranges that the test VM writes:
	// they are read from the source again when the test stops. It is nil
	// for a copy.
	Written func(sector, sectors uint64)
}

// TestRunner serves a failover test's volumes, in name order, to a test
// VM (the hub's command builds mapper devices and vhost-user exports of
// them). The hub calls it between two applied writes; closing what it
// returns stops serving.
type TestRunner func(vm string, vols []TestVolume) (io.Closer, error)

// failoverTest is a running failover test of one VM.
type failoverTest struct {
	copies []string  // a consistency group's test copies, removed at the end
	served io.Closer // the runner's exports
	once   sync.Once
}

func (t *failoverTest) close() {
	t.once.Do(func() {
		if t.served != nil {
			t.served.Close()
		}
		for _, p := range t.copies {
			os.Remove(p)
		}
	})
}

// FailoverTest hands the recovery volumes of vm to run, which serves them
// writable to a test VM. Every volume must be consistent: protecting, or
// disconnected with nothing left to resync. Mirrored writes that arrive
// meanwhile are not applied: their regions are read from the source when
// the test stops, together with whatever the test VM wrote.
//
// A consistency group (see repagent/wire/PROTOCOL.md) must also be consistent by its
// source's word; its test runs on copies of the recovery volumes
// (dir/VOLUME.img) taken between two applied writes, and mirroring goes
// on.
func (h *Hub) FailoverTest(vmName, dir string, run TestRunner) error {
	h.mu.Lock()
	vm := h.vms[vmName]
	h.mu.Unlock()
	if vm == nil {
		return fmt.Errorf("vm %q not found", vmName)
	}
	// Between two applied writes: the replicas are a prefix of the
	// write order across the VM's volumes.
	vm.apply.Lock()
	defer vm.apply.Unlock()
	h.mu.Lock()
	if vm.failover != nil {
		h.mu.Unlock()
		return fmt.Errorf("vm %q: a failover test is already running", vmName)
	}
	if vm.groupInconsistent() {
		h.mu.Unlock()
		return fmt.Errorf("vm %q: its consistency group is being resynchronised by the source, not consistent", vmName)
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
			return fmt.Errorf("vm %q: volume %q is %s, not consistent", vmName, v.name, v.state)
		}
		vols = append(vols, v)
	}
	if len(vols) == 0 {
		h.mu.Unlock()
		return fmt.Errorf("vm %q has no recovery volumes", vmName)
	}
	slices.SortFunc(vols, func(a, b *hubVolume) int { return strings.Compare(a.name, b.name) })
	t := &failoverTest{}
	vm.failover = t
	tv := make([]TestVolume, len(vols))
	for i, v := range vols {
		tv[i] = TestVolume{Name: v.name, Path: v.imgPath, Sectors: v.sectors}
	}
	if vm.isGroup() {
		// A consistency group is resynchronised by its source, which
		// cannot be asked to copy what the test VM changes: the test
		// runs on copies taken between two applied writes, and
		// mirroring goes on.
		h.mu.Unlock()
		err := copyReplicas(t, tv, dir)
		if err == nil {
			t.served, err = run(vm.name, tv)
		}
		if err != nil {
			t.close()
			h.mu.Lock()
			vm.failover = nil
			h.mu.Unlock()
			return fmt.Errorf("failover test: %w", err)
		}
		return nil
	}
	prev := map[*hubVolume]string{}
	for i, v := range vols {
		prev[v] = v.state
		v.testDirty.Clear()
		h.setState(v, StateFailoverTest, "failover test started")
		v.changed = true
		tv[i].Written = func(sector, sectors uint64) {
			h.mu.Lock()
			wire.AddSectors(v.testDirty, sector, sectors, h.cfg.RegionSectors)
			h.mu.Unlock()
		}
	}
	h.mu.Unlock()

	var err error
	t.served, err = run(vm.name, tv)
	if err != nil {
		t.close()
		h.mu.Lock()
		vm.failover = nil
		for _, v := range vols {
			h.setState(v, prev[v], "failover test failed to start")
		}
		h.mu.Unlock()
		return fmt.Errorf("failover test: %w", err)
	}
	for _, v := range vols {
		h.saveOffline(v)
	}
	return nil
}

// copyReplicas copies the recovery volumes of a consistency group into dir
// (VOLUME.img), as reflinks where the file system can, and points vols at
// the copies; the caller holds the VM's apply lock, so the copies are one
// point of the group's write order.
func copyReplicas(t *failoverTest, vols []TestVolume, dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for i, v := range vols {
		dst := filepath.Join(dir, v.Name+".img")
		t.copies = append(t.copies, dst)
		if err := copyFile(v.Path, dst); err != nil {
			return fmt.Errorf("copy of volume %s: %w", v.Name, err)
		}
		vols[i].Path = dst
	}
	return nil
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

// FailoverTestStop ends vm's failover test: the runner stops serving, and the
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
		wire.AddExtents(add, v.st.Need, v.st.RegionSectors, h.cfg.RegionSectors, wire.RegionCount(v.sectors, h.cfg.RegionSectors))
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
	if v.storeErr != nil {
		h.mu.Unlock()
		return nil // its durable state stays as it was before the failure
	}
	v.st.Need = wire.ExtentsOf(v.need)
	v.st.RegionSectors = h.cfg.RegionSectors
	v.st.FailoverTest = v.state == StateFailoverTest
	st := v.st
	h.mu.Unlock()
	return saveState(v.statePath, &st)
}
