package hub

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// The hub's durable state, kept in a Backend (backend.go).

// stateVersion is the version of volState files.
const stateVersion = 1

// volState is a recovery volume's durable state.
type volState struct {
	Version       int           `json:"version"`
	Sectors       uint64        `json:"sectors"`
	RegionSectors uint32        `json:"region-sectors"`
	Session       uint64        `json:"session"`       // agent session of the last connection
	Clean         bool          `json:"clean"`         // the last connection ended with AGENT_SHUTDOWN
	Synced        bool          `json:"synced"`        // the initial sync completed once
	AppliedSeq    uint64        `json:"applied-seq"`   // last mirrored sequence applied
	Need          []wire.Extent `json:"need"`          // regions still to read from the source
	Protecting    bool          `json:"protecting"`    // in protection when last written
	FailoverTest  bool          `json:"failover-test"` // a failover test was running
	// GroupInconsistent: the volume belongs to a consistency group whose
	// source is resynchronising it (GROUP_STATE), so the group's replicas
	// are not a prefix of its write order.
	GroupInconsistent bool `json:"group-inconsistent,omitempty"`
	// Group: the volume was last protected as part of a consistency
	// group (an agent with the group flag).
	Group bool `json:"group,omitempty"`
	// Seeded: the replica holds data of its own (seeded from a copy of
	// the source, or the base of a checksum resync) and CsumNeed lists
	// the regions still to compare by checksum before they count as in
	// sync; cleared when the checksum resync has compared them all.
	Seeded   bool          `json:"seeded,omitempty"`
	CsumNeed []wire.Extent `json:"csum-need,omitempty"`
}

// vmMeta is a VM's identity in the store.
type vmMeta struct {
	Name string `json:"name"`
	UUID string `json:"uuid"`
}

// writeFileSync replaces path with data durably.
func writeFileSync(path string, data []byte) error { return journal.ReplaceFile(path, data) }

// saveState writes a volume's state durably.
func saveState(be Backend, vm, vol string, st *volState) error {
	st.Version = stateVersion
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return be.PutVolume(vm, vol, b)
}

// loadState reads a volume's state; a missing one is (nil, nil).
func loadState(be Backend, vm, vol string) (*volState, error) {
	path := vm + "/" + vol
	b, err := be.GetVolume(vm, vol)
	if err != nil {
		return nil, err
	}
	if b == nil {
		return nil, nil
	}
	st := &volState{}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("%s: state version %d, want %d", path, st.Version, stateVersion)
	}
	if rs := st.RegionSectors; rs < 8 || rs > 1<<21 || rs&(rs-1) != 0 {
		return nil, fmt.Errorf("%s: bad region size %d", path, rs)
	}
	limit := wire.RegionCount(st.Sectors, st.RegionSectors)
	for _, e := range append(slices.Clone(st.Need), st.CsumNeed...) {
		if e.Count == 0 || e.Start+e.Count < e.Start || e.Start+e.Count > limit {
			return nil, fmt.Errorf("%s: need extent %d+%d outside %d regions", path, e.Start, e.Count, limit)
		}
	}
	return st, nil
}

// listStore returns the VM directories and their volume names.
func listStore(root string) (map[string][]string, error) {
	out := map[string][]string{}
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		if !e.IsDir() || wire.CheckName(e.Name()) != nil {
			continue
		}
		files, err := os.ReadDir(filepath.Join(root, e.Name()))
		if err != nil {
			return nil, err
		}
		vols := []string{}
		for _, f := range files {
			if n, ok := strings.CutSuffix(f.Name(), ".state.json"); ok && wire.CheckName(n) == nil {
				vols = append(vols, n)
			}
		}
		out[e.Name()] = vols
	}
	return out, nil
}

// replicaFile is a recovery volume's image as the hub writes it. The
// hub opens it with Config.openReplica (tests inject faults there).
type replicaFile interface {
	WriteAt(p []byte, off int64) (int, error)
	// Truncate sets the file's size.
	Truncate(size int64) error
	// Allocate reserves the blocks of [off, off+n) (fallocate mode 0), so
	// that later writes cannot run out of space.
	Allocate(off, n int64) error
	// ZeroRange zeroes [off, off+n), keeping the blocks allocated.
	ZeroRange(off, n int64) error
	// Datasync makes written data durable (fdatasync).
	Datasync() error
	Close() error
}

// osReplica is a replicaFile on the local file system.
type osReplica struct{ *os.File }

func openReplica(path string) (replicaFile, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	return osReplica{f}, nil
}

func (f osReplica) Datasync() error { return unix.Fdatasync(int(f.Fd())) }

func (f osReplica) Allocate(off, n int64) error {
	if n <= 0 {
		return nil
	}
	return unix.Fallocate(int(f.Fd()), 0, off, n)
}

func (f osReplica) ZeroRange(off, n int64) error {
	if unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n) == nil {
		return nil
	}
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if _, err := f.WriteAt(zero[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}
