package hub

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// SeedVolume is an existing image that Seed makes a volume's replica.
type SeedVolume struct {
	Name string // the volume's name: the export id its agent reports
	Path string // the image (its size is the volume's)
}

// Seed creates VM vm in the store of a hub that is not running on it,
// with the images as its replicas (copies, reflinked where the file
// system can): the old source's disks for a failback, or a copy of the
// source made some other way. When the VM's agent first connects, the
// hub resynchronises each volume by checksums — the agent hashes its
// regions, only those that differ are read — instead of copying it
// (protocol level 2; an older agent is read in full). uuid ("" for any)
// is the VM's UUID as its agent will say it (8-4-4-4-12 hex digits);
// regionSectors is the hub's region size (0: the default).
func Seed(store, vm, uuid string, regionSectors uint32, vols []SeedVolume) error {
	if err := wire.CheckName(vm); err != nil {
		return fmt.Errorf("seed: vm %q: %w", vm, err)
	}
	if len(vols) == 0 {
		return errors.New("seed: no volumes")
	}
	if regionSectors == 0 {
		regionSectors = wire.DefaultRegionSectors
	}
	var u [16]byte
	if uuid != "" {
		var err error
		if u, err = wire.ParseUUID(uuid); err != nil {
			return fmt.Errorf("seed: uuid %q: %w", uuid, err)
		}
	}
	dir := filepath.Join(store, vm)
	if _, err := os.Stat(dir); err == nil {
		return fmt.Errorf("seed: %s exists: the store already holds vm %q", dir, vm)
	}
	imgs := make([]journal.SeedImage, len(vols))
	seen := map[string]bool{}
	for i, v := range vols {
		if seen[v.Name] {
			return fmt.Errorf("seed: volume %q given twice", v.Name)
		}
		seen[v.Name] = true
		imgs[i] = journal.SeedImage{Name: v.Name, Path: v.Path}
	}
	if err := os.MkdirAll(store, 0o700); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	if err := journal.Seed(dir, imgs); err != nil {
		return err
	}
	meta := vmMeta{Name: vm}
	if uuid != "" {
		meta.UUID = hex.EncodeToString(u[:])
	}
	b, _ := json.Marshal(meta)
	if err := writeFileSync(filepath.Join(dir, "vm.json"), b); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	for _, v := range vols {
		fi, err := os.Stat(filepath.Join(dir, v.Name+".img"))
		if err != nil {
			return fmt.Errorf("seed: %w", err)
		}
		if err := saveSeeded(DirBackend(store), vm, v.Name, fi.Size(), regionSectors); err != nil {
			return err
		}
	}
	return nil
}

// saveSeeded writes a seeded volume's state: in sync once every region
// was compared by checksum.
func saveSeeded(be Backend, vm, vol string, size int64, regionSectors uint32) error {
	sectors := uint64(size) / wire.SectorSize
	st := volState{Sectors: sectors, RegionSectors: regionSectors, Synced: true, Seeded: true,
		CsumNeed: []wire.Extent{{Start: 0, Count: wire.RegionCount(sectors, regionSectors)}}}
	if err := saveState(be, vm, vol, &st); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	return nil
}

// SeedBackend is Seed into any Backend (the Ceph store: each source is
// written into the volume's new RBD replica image, zero chunks skipped,
// no hub may hold the VM meanwhile): the VM must not be in it.
func SeedBackend(be Backend, vm, uuid string, regionSectors uint32, vols []journal.SeedSource) error {
	if err := wire.CheckName(vm); err != nil {
		return fmt.Errorf("seed: vm %q: %w", vm, err)
	}
	if len(vols) == 0 {
		return errors.New("seed: no volumes")
	}
	if regionSectors == 0 {
		regionSectors = wire.DefaultRegionSectors
	}
	meta := vmMeta{Name: vm}
	if uuid != "" {
		u, err := wire.ParseUUID(uuid)
		if err != nil {
			return fmt.Errorf("seed: uuid %q: %w", uuid, err)
		}
		meta.UUID = hex.EncodeToString(u[:])
	}
	if b, err := be.GetVM(vm); err != nil {
		return fmt.Errorf("seed: %w", err)
	} else if b != nil {
		var cur vmMeta
		if json.Unmarshal(b, &cur) != nil || cur.Name != "" {
			return fmt.Errorf("seed: %s already holds vm %q", be, vm)
		}
	}
	if err := journal.SeedStore(be.Journal(vm), vols); err != nil {
		return err
	}
	b, _ := json.Marshal(meta)
	if err := be.PutVM(vm, b); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	for _, v := range vols {
		if err := saveSeeded(be, vm, v.Name, v.Size, regionSectors); err != nil {
			return err
		}
	}
	return nil
}
