package hub

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestVolume is a recovery volume handed to a failover test's
// [TestRunner].
type TestVolume struct {
	Name string // the volume's name
	// Path is the image to serve: a copy materialised at the test's point
	// (a file in the test's directory, or with the Ceph store an RBD
	// clone of a replica snapshot, rbd:POOL/IMAGE).
	Path    string
	Sectors uint64
	// Written is nil: the test VM writes a copy, never the replica, so
	// nothing it writes needs reading again. (Kept for runners that
	// track writes.)
	Written func(sector, sectors uint64)
}

// TestRunner serves a failover test's volumes, in name order, to a test
// VM (the hub's command builds mapper devices and vhost-user exports of
// them); closing what it returns stops serving.
type TestRunner func(vm string, vols []TestVolume) (io.Closer, error)

// failoverTest is a running failover test of one VM.
type failoverTest struct {
	dir    string // the materialised images, removed at the end
	point  journal.Point
	served io.Closer // the runner's exports
	// images are the materialised volumes' names; with a RecoveryStore
	// (rs) they live in the store and are removed through it.
	images []string
	rs     RecoveryStore
	once   sync.Once
	kept   []string
	err    error
}

// close ends the test and removes its volumes.
func (t *failoverTest) close() { t.end(false) }

// end stops serving the test's volumes and, unless keep, removes them;
// it returns the volumes kept (keep) and the first removal error. Only
// the first call acts.
func (t *failoverTest) end(keep bool) ([]string, error) {
	t.once.Do(func() {
		if t.served != nil {
			t.served.Close()
		}
		if keep {
			t.kept = t.images
			return
		}
		if t.dir != "" {
			if err := os.RemoveAll(t.dir); err != nil {
				t.err = err
			}
		}
		if t.rs != nil {
			for _, n := range t.images {
				if err := t.rs.RemoveRecovered(n); err != nil && t.err == nil {
					t.err = fmt.Errorf("remove the test volume %s: %w", n, err)
				}
			}
		}
	})
	return t.kept, t.err
}

// Recover materialises every volume of vm at the consistent point sel
// selects into outDir (outDir/VOLUME.img; see journal.Journal.Materialize).
// It never writes the replica images or the journal, and mirroring goes
// on meanwhile.
func (h *Hub) Recover(ctx context.Context, vmName string, sel journal.Selector, outDir string) (journal.Recovered, error) {
	h.mu.Lock()
	vm := h.vms[vmName]
	var j *journal.Journal
	if vm != nil {
		j = vm.j
	}
	h.mu.Unlock()
	if vm == nil || j == nil {
		return journal.Recovered{}, h.noJournal(vmName, vm)
	}
	rec, err := j.Materialize(ctx, sel, outDir)
	if err == nil {
		h.label(vmName, recoveredNames(rec), PurposeRecover)
	}
	return rec, err
}

// recoveredNames are the names of rec's volumes.
func recoveredNames(rec journal.Recovered) []string {
	var out []string
	for _, v := range rec.Volumes {
		out = append(out, v.Path)
	}
	return out
}

// Points returns vm's recoverable window: the oldest and newest consistent
// points and the named checkpoints in it.
func (h *Hub) Points(vmName string) (oldest, newest journal.Point, cps []journal.Checkpoint, err error) {
	h.mu.Lock()
	vm := h.vms[vmName]
	var j *journal.Journal
	if vm != nil {
		j = vm.j
	}
	h.mu.Unlock()
	if j == nil {
		return oldest, newest, nil, h.noJournal(vmName, vm)
	}
	return j.Oldest(), j.Newest(), j.Checkpoints(), nil
}

// FailoverTest is FailoverTestAt the newest consistent point.
func (h *Hub) FailoverTest(vmName, dir string, run TestRunner) error {
	return h.FailoverTestAt(vmName, dir, journal.Newest(), run)
}

// FailoverTestAt materialises every volume of vm at the consistent point
// sel selects into dir/point (a copy: the live replica images are never
// served nor written; with the Ceph store RBD clones of replica
// snapshots, labelled PurposeFailoverTest) and hands the copies to run,
// which serves them writable to a test VM. Mirroring and journaling go on
// meanwhile.
func (h *Hub) FailoverTestAt(vmName, dir string, sel journal.Selector, run TestRunner) error {
	h.mu.Lock()
	vm := h.vms[vmName]
	if vm == nil {
		h.mu.Unlock()
		return fmt.Errorf("vm %q not found", vmName)
	}
	if vm.failover != nil {
		h.mu.Unlock()
		return fmt.Errorf("vm %q: a failover test is already running", vmName)
	}
	t := &failoverTest{dir: filepath.Join(dir, "point")}
	t.rs, _ = h.cfg.Backend.(RecoveryStore)
	vm.failover = t
	j := vm.j
	h.mu.Unlock()
	fail := func(err error) error {
		t.close()
		h.mu.Lock()
		vm.failover = nil
		h.mu.Unlock()
		return fmt.Errorf("failover test: %w", err)
	}
	if j == nil {
		return fail(errors.New("no journal"))
	}
	if _, err := os.Stat(t.dir); err == nil {
		t.dir = "" // not ours: never removed
		return fail(fmt.Errorf("%s exists", filepath.Join(dir, "point")))
	}
	rec, err := j.Materialize(context.Background(), sel, t.dir)
	if err != nil {
		// A store's volumes made before the error stay: `repagent-hub
		// clones` lists them, unlabelled.
		return fail(err)
	}
	t.images = recoveredNames(rec)
	h.label(vmName, t.images, PurposeFailoverTest)
	if len(rec.Volumes) == 0 {
		return fail(fmt.Errorf("vm %q has no recovery volumes at %s", vmName, sel))
	}
	if missing := h.missingVolumes(vm, rec); len(missing) > 0 {
		return fail(fmt.Errorf("vm %q: the point %s holds no data of volume %s yet (its first synchronisation has not completed): a test VM would miss that disk",
			vmName, sel, strings.Join(missing, ", ")))
	}
	t.point = rec.Point
	tv := make([]TestVolume, len(rec.Volumes))
	for i, v := range rec.Volumes {
		tv[i] = TestVolume{Name: v.Name, Path: v.Path, Sectors: uint64(v.Size) / wire.SectorSize}
	}
	served, err := run(vm.name, tv)
	if err != nil {
		return fail(err)
	}
	t.served = served
	h.log.Info("failover test started", "vm", vmName, "seq", rec.Point.Seq, "time", rec.Point.Time, "dir", t.dir)
	return nil
}

// FailoverTestStop ends vm's failover test: the runner stops serving and
// the materialised copies are removed.
func (h *Hub) FailoverTestStop(vmName string) error {
	_, err := h.FailoverTestEnd(vmName, false)
	return err
}

// FailoverTestEnd ends vm's failover test: the runner stops serving and,
// unless keep, the materialised copies are removed (files, or the Ceph
// store's clones). With keep it returns the copies kept (paths or
// rbd:POOL/IMAGE), left for the user to inspect and remove.
func (h *Hub) FailoverTestEnd(vmName string, keep bool) ([]string, error) {
	h.mu.Lock()
	vm := h.vms[vmName]
	if vm == nil {
		h.mu.Unlock()
		return nil, fmt.Errorf("vm %q not found", vmName)
	}
	t := vm.failover
	vm.failover = nil
	h.mu.Unlock()
	if t == nil {
		return nil, fmt.Errorf("vm %q: no failover test is running", vmName)
	}
	kept, err := t.end(keep)
	if err != nil {
		h.log.Warn("failover test ended; removing its volumes failed", "vm", vmName, "err", err)
		return kept, fmt.Errorf("failover test of vm %q ended; %w", vmName, err)
	}
	h.log.Info("failover test ended", "vm", vmName, "kept", kept)
	return kept, nil
}

// ApplyNow has the applier write every journaled record that left the
// retention window into vm's replica images now, up to the newest
// consistent point among them (with Retain 0: everything consistent).
func (h *Hub) ApplyNow(vmName string) error {
	h.mu.Lock()
	vm := h.vms[vmName]
	var j *journal.Journal
	if vm != nil {
		j = vm.j
	}
	h.mu.Unlock()
	if j == nil {
		return h.noJournal(vmName, vm)
	}
	return j.ApplyNow()
}

// Promote makes vm's recovery volumes at the consistent point sel selects
// the VM's new sources: the VM's agent is disconnected and refused from
// now on, the volumes are materialised into outDir, and the VM's journal
// is closed, so nothing more is applied to its replica images (they and
// the journal stay in the store as they are). Restarting the hub serves
// the VM again.
func (h *Hub) Promote(ctx context.Context, vmName string, sel journal.Selector, outDir string) (journal.Recovered, error) {
	h.mu.Lock()
	vm := h.vms[vmName]
	if vm != nil && vm.promoted {
		h.mu.Unlock()
		return journal.Recovered{}, fmt.Errorf("vm %q is already promoted", vmName)
	}
	if vm == nil || vm.j == nil {
		h.mu.Unlock()
		return journal.Recovered{}, h.noJournal(vmName, vm)
	}
	vm.promoted = true
	conn := vm.conn
	j := vm.j
	h.mu.Unlock()
	if conn != nil {
		conn.shut()
		for i := 0; i < 1000; i++ {
			h.mu.Lock()
			gone := vm.conn != conn
			h.mu.Unlock()
			if gone {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	h.log.Warn("promoting: the VM's agent is refused and its replicas are no longer advanced", "vm", vmName)
	rec, err := j.Materialize(ctx, sel, outDir)
	if err != nil {
		h.mu.Lock()
		vm.promoted = false
		h.mu.Unlock()
		return journal.Recovered{}, fmt.Errorf("promote: %w", err)
	}
	h.label(vmName, recoveredNames(rec), PurposePromote)
	h.mu.Lock()
	if vm.j == j {
		vm.j = nil
	}
	h.mu.Unlock()
	if err := j.Close(); err != nil {
		h.log.Warn("promote: closing the journal", "vm", vmName, "err", err)
	}
	h.log.Warn("promoted", "vm", vmName, "seq", rec.Point.Seq, "time", rec.Point.Time, "dir", outDir)
	return rec, nil
}

// noJournal is the error of a request for vmName's journal when the hub
// has none open: an unknown VM, or with a shared store one this hub does
// not hold.
func (h *Hub) noJournal(vmName string, vm *hubVM) error {
	if vm != nil && h.cfg.Shared {
		return fmt.Errorf("vm %q is not held by this hub: the hub its agent is attached to holds it (or, with no agent attached, none does: use recover --store)", vmName)
	}
	return fmt.Errorf("vm %q not found", vmName)
}

// missingVolumes returns the volumes of vm that are protected (or were)
// and absent from rec, a point materialised before their first
// synchronisation completed: such a point is not the VM, only some of its
// disks.
func (h *Hub) missingVolumes(vm *hubVM, rec journal.Recovered) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var missing []string
	for name, v := range vm.vols {
		if !v.mirror && v.st.Version == 0 {
			continue // reported, never protected
		}
		if !slices.ContainsFunc(rec.Volumes, func(r journal.RecoveredVolume) bool { return r.Name == name }) {
			missing = append(missing, name)
		}
	}
	slices.Sort(missing)
	return missing
}
