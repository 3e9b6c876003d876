package harness

import (
	"fmt"
	"sort"

	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
)

// PlanCheck describes what a disk written by the guest's verify step
// should hold.
type PlanCheck struct {
	Seed      uint64
	Coverage  int // percent, as passed to the guest
	MaxBlocks int
	// Other lists extents written by other steps, with their own checks;
	// CheckPlan leaves them alone.
	Other []pattern.Extent
	// ZeroElsewhere requires every byte outside the plan and Other to be
	// zero (a fresh sparse image).
	ZeroElsewhere bool
}

// CheckPlan checks data, the whole disk as the host reads it, byte for
// byte against the verify plan. It returns at most 10 errors.
func CheckPlan(data []byte, pc PlanCheck) []error {
	plan := pattern.Plan(pc.Seed, int64(len(data)), pc.Coverage, pc.MaxBlocks)
	var errs []error
	add := func(err error) bool {
		errs = append(errs, err)
		return len(errs) < 10
	}
	for _, e := range plan {
		if err := pattern.Check(data[e.Off:e.End()], pc.Seed, e.Off); err != nil {
			if !add(fmt.Errorf("plan extent [%d,%d): %w", e.Off, e.End(), err)) {
				return errs
			}
		}
	}
	if !pc.ZeroElsewhere {
		return errs
	}
	covered := append(append([]pattern.Extent{}, plan...), pc.Other...)
	sort.Slice(covered, func(i, j int) bool { return covered[i].Off < covered[j].Off })
	pos := int64(0)
	checkZero := func(from, to int64) bool {
		for o := from; o < to; o += pattern.SectorSize {
			end := min(o+pattern.SectorSize, to)
			if !pattern.IsZero(data[o:end]) {
				return add(fmt.Errorf("byte %d outside every written extent is not zero (a write landed in the wrong place?)", o))
			}
		}
		return true
	}
	for _, e := range covered {
		if e.Off > pos && !checkZero(pos, e.Off) {
			return errs
		}
		pos = max(pos, e.End())
	}
	checkZero(pos, int64(len(data)))
	return errs
}

// CheckExtentPattern checks that data[e] holds the verify pattern of seed.
func CheckExtentPattern(data []byte, e pattern.Extent, seed uint64) error {
	if e.End() > int64(len(data)) {
		return fmt.Errorf("extent [%d,%d) beyond the disk's %d bytes", e.Off, e.End(), len(data))
	}
	return pattern.Check(data[e.Off:e.End()], seed, e.Off)
}

// CheckExtentZero checks that data[e] is all zeros.
func CheckExtentZero(data []byte, e pattern.Extent) error {
	if e.End() > int64(len(data)) {
		return fmt.Errorf("extent [%d,%d) beyond the disk's %d bytes", e.Off, e.End(), len(data))
	}
	for o := e.Off; o < e.End(); o += pattern.SectorSize {
		if !pattern.IsZero(data[o:min(o+pattern.SectorSize, e.End())]) {
			return fmt.Errorf("byte %d of [%d,%d) is not zero", o, e.Off, e.End())
		}
	}
	return nil
}

// CheckWriter checks the writer's blocks in data (the whole disk) after a
// run or a fault: every write below acked present or superseded, none at
// or beyond issued (-1: unknown). It returns at most 10 errors.
func CheckWriter(data []byte, seed uint64, acked, issued int64) []error {
	w := pattern.NewWriter(seed, int64(len(data)))
	return w.CheckDurable(func(idx int64) ([]byte, error) {
		return data[idx*pattern.BlockSize : (idx+1)*pattern.BlockSize], nil
	}, acked, issued, 10)
}

// CheckWriterExact checks that every block holds exactly the last of the
// n writes (a clean end of the writer).
func CheckWriterExact(data []byte, seed uint64, n int64) []error {
	w := pattern.NewWriter(seed, int64(len(data)))
	last := w.LastWrites(n)
	var errs []error
	for idx := int64(0); idx < w.Blocks && len(errs) < 10; idx++ {
		seq, err := w.Decode(data[idx*pattern.BlockSize:(idx+1)*pattern.BlockSize], idx)
		if err != nil {
			errs = append(errs, err)
		} else if seq != last[idx] {
			errs = append(errs, fmt.Errorf("block %d holds write %d, want %d", idx, seq, last[idx]))
		}
	}
	return errs
}
