//go:build ceph

package cephstore

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rbd"
	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// The recovered volumes (RBD clones named IMAGE.rec-T, see the package
// comment) as a hub.RecoveryStore. Their RBD image metadata says what
// made them:
//
//	vhostdm-hub.purpose   recover, failover-test or promote
//	vhostdm-hub.vm        the VM's name

const (
	recMarker   = ".rec-"
	metaPurpose = prefix + "purpose"
	metaVM      = prefix + "vm"
)

var _ hub.RecoveryStore = (*Backend)(nil)

// cloneImage returns the image name of rbd:POOL/IMAGE when it names a
// recovered volume's clone in this store's pool.
func (b *Backend) cloneImage(name string) (string, error) {
	rest, ok := strings.CutPrefix(name, "rbd:"+b.cfg.Pool+"/")
	if !ok || !strings.HasPrefix(rest, prefix) || !strings.Contains(rest, recMarker) || strings.ContainsAny(rest, "/@") {
		return "", fmt.Errorf("%q is not a recovered volume of %s (want rbd:%s/%sVM.VOLUME%sT)", name, b, b.cfg.Pool, prefix, recMarker)
	}
	return rest, nil
}

// LabelRecovered implements hub.RecoveryStore: image metadata on the
// clone.
func (b *Backend) LabelRecovered(name, vm, purpose string) error {
	img, err := b.cloneImage(name)
	if err != nil {
		return err
	}
	im, err := rbd.OpenImage(b.io, img, rbd.NoSnapshot)
	if err != nil {
		return fmt.Errorf("open %s: %w", name, explain(err))
	}
	defer im.Close()
	if err := im.SetMetadata(metaVM, vm); err != nil {
		return fmt.Errorf("label %s: %w", name, explain(err))
	}
	if err := im.SetMetadata(metaPurpose, purpose); err != nil {
		return fmt.Errorf("label %s: %w", name, explain(err))
	}
	return nil
}

// ListRecovered implements hub.RecoveryStore: the pool's images named
// like a recovered volume (IMAGE.rec-T) that are no VM's replica (a
// volume whose name merely contains ".rec-" has a state in the store).
// Most are clones of a replica's pos-N snapshot; a volume the journal
// held entirely (created after the applied position) is a plain image.
func (b *Backend) ListRecovered() ([]hub.RecoveredImage, error) {
	names, err := rbd.GetImageNames(b.io)
	if err != nil {
		return nil, fmt.Errorf("%s: list images: %w", b, explain(err))
	}
	slices.Sort(names)
	var out []hub.RecoveredImage
	for _, n := range names {
		ri, ok, err := b.describe(n)
		if err != nil {
			if notFound(err) {
				continue // removed meanwhile
			}
			return nil, err
		}
		if ok {
			out = append(out, ri)
		}
	}
	return out, nil
}

// splitRecovered splits a recovered volume's image name
// (vhostdm-hub.VM.VOLUME.rec-T) into the VM (decoded), the volume and
// the replica's image name.
func splitRecovered(img string) (vm, vol, replica string, ok bool) {
	rest, ok := strings.CutPrefix(img, prefix)
	if !ok {
		return "", "", "", false
	}
	e, tail, ok := strings.Cut(rest, ".")
	i := strings.LastIndex(tail, recMarker)
	if !ok || e == "" || i <= 0 || i+len(recMarker) == len(tail) {
		return "", "", "", false
	}
	return dec(e), tail[:i], prefix + e + "." + tail[:i], true
}

// describe reads one recovered volume's description; ok is false when
// img is not one.
func (b *Backend) describe(img string) (ri hub.RecoveredImage, ok bool, err error) {
	vm, vol, replica, ok := splitRecovered(img)
	if !ok {
		return ri, false, nil
	}
	if st, err := b.GetVolume(vm, strings.TrimPrefix(img, prefix+enc(vm)+".")); err != nil {
		return ri, false, fmt.Errorf("%s: vm %s: %w", b, vm, explain(err))
	} else if st != nil {
		return ri, false, nil // a replica
	}
	im, err := rbd.OpenImageReadOnly(b.io, img, rbd.NoSnapshot)
	if err != nil {
		return ri, false, fmt.Errorf("open rbd:%s/%s: %w", b.cfg.Pool, img, explain(err))
	}
	defer im.Close()
	ri = hub.RecoveredImage{Name: "rbd:" + b.cfg.Pool + "/" + img, VM: vm, Volume: vol, Watchers: []string{}}
	pi, err := im.GetParent()
	switch {
	case err == nil && pi != nil:
		if pi.Image.PoolName != b.cfg.Pool || pi.Image.ImageName != replica || !strings.HasPrefix(pi.Snap.SnapName, snapPoint) {
			return ri, false, nil // a clone of something else
		}
		ri.Parent = "rbd:" + b.cfg.Pool + "/" + replica + "@" + pi.Snap.SnapName
	case err != nil && !notFound(err):
		return ri, false, fmt.Errorf("parent of %s: %w", ri.Name, explain(err))
	}
	if v, err := im.GetMetadata(metaVM); err == nil {
		ri.VM = v
	}
	if v, err := im.GetMetadata(metaPurpose); err == nil {
		ri.Purpose = v
	}
	if sz, err := im.GetSize(); err == nil {
		ri.Size = int64(sz)
	}
	if ts, err := im.GetCreateTimestamp(); err == nil {
		ri.Created = time.Unix(ts.Sec, ts.Nsec).UTC()
	}
	ws, err := im.ListWatchers()
	if err != nil {
		return ri, false, fmt.Errorf("watchers of %s: %w", ri.Name, explain(err))
	}
	for _, w := range ws {
		ri.Watchers = append(ri.Watchers, w.Addr)
	}
	return ri, true, nil
}

// dec undoes enc.
func dec(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// RemoveRecovered implements hub.RecoveryStore: a clone no client has
// open (no watcher) is removed, then its parent snapshot when no other
// clone uses it (unprotected and removed; a clone being made from it
// meanwhile makes the unprotect fail, and the snapshot stays).
func (b *Backend) RemoveRecovered(name string) error {
	img, err := b.cloneImage(name)
	if err != nil {
		return err
	}
	ri, ok, err := b.describe(img)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%s is not a recovered volume of %s (a replica, or a clone of something else)", name, b)
	}
	if len(ri.Watchers) > 0 {
		return fmt.Errorf("%s: %w (watchers: %s)", name, hub.ErrRecoveredInUse, strings.Join(ri.Watchers, ", "))
	}
	if err := b.dropMarks(img); err != nil {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	if err := rbd.RemoveImage(b.io, img); err != nil {
		if isErrno(err, unix.EBUSY) {
			return fmt.Errorf("%s: %w: %w", name, hub.ErrRecoveredInUse, err)
		}
		return fmt.Errorf("remove %s: %w", name, explain(err))
	}
	if ri.Parent == "" {
		return nil
	}
	parent, snap, _ := strings.Cut(strings.TrimPrefix(ri.Parent, "rbd:"+b.cfg.Pool+"/"), "@")
	if err := b.dropSnapshot(parent, snap); err != nil {
		b.log.Warn("ceph store: the recovery snapshot stays", "snapshot", ri.Parent, "err", err)
	}
	return nil
}

// dropMarks removes the snapshots with which a vhostdm that served the
// clone as a protected volume marked it at its stop (ceph.MarkSnapPrefix):
// they would keep the clone from being removed. Other snapshots stay, and
// the removal fails naming them.
func (b *Backend) dropMarks(img string) error {
	im, err := rbd.OpenImage(b.io, img, rbd.NoSnapshot)
	if err != nil {
		return explain(err)
	}
	defer im.Close()
	snaps, err := im.GetSnapshotNames()
	if err != nil {
		return explain(err)
	}
	for _, s := range snaps {
		if strings.HasPrefix(s.Name, ceph.MarkSnapPrefix) {
			if err := im.GetSnapshot(s.Name).Remove(); err != nil {
				return fmt.Errorf("remove vhostdm's snapshot %q: %w", s.Name, explain(err))
			}
		}
	}
	return nil
}

// dropSnapshot removes a replica's recovery snapshot that no clone uses.
func (b *Backend) dropSnapshot(parent, snap string) error {
	ps, err := rbd.OpenImage(b.io, parent, snap)
	if err != nil {
		return explain(err)
	}
	_, kids, err := ps.ListChildren()
	ps.Close()
	if err != nil {
		return explain(err)
	}
	if len(kids) > 0 {
		return nil
	}
	im, err := rbd.OpenImage(b.io, parent, rbd.NoSnapshot)
	if err != nil {
		return explain(err)
	}
	defer im.Close()
	s := im.GetSnapshot(snap)
	if prot, err := s.IsProtected(); err == nil && prot {
		if err := s.Unprotect(); err != nil {
			return explain(err)
		}
	}
	return explain(s.Remove())
}
