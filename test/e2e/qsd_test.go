package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// fixedExtents are the flush, discard and zeroes extents of the guest
// steps on a disk of size bytes.
func fixedExtents(size int64) (flush, discard, zeroes pattern.Extent) {
	mid := proto.MiddleOffset(size)
	return pattern.Extent{Off: mid + proto.FlushOffset, Len: proto.FlushLen},
		pattern.Extent{Off: mid + proto.DiscardOffset, Len: proto.DiscardLen},
		pattern.Extent{Off: mid + proto.ZeroesOffset, Len: proto.ZeroesLen}
}

// checkIOSteps checks the host view of a disk after the guest ran
// verify, flush, discard and zeroes on it with seed: the plan byte for byte,
// the flush extent's pattern, zeros where discarded and zeroed, zeros
// everywhere else.
func checkIOSteps(t *testing.T, data []byte, seed uint64, coverage, maxBlocks int) {
	t.Helper()
	fl, di, ze := fixedExtents(int64(len(data)))
	// The plan may overlap the fixed extents; the fixed steps ran after
	// verify, so check the plan only outside them.
	errs := harness.CheckPlan(maskExtents(data, seed, coverage, maxBlocks, fl, di, ze), harness.PlanCheck{
		Seed: seed, Coverage: coverage, MaxBlocks: maxBlocks, Other: []pattern.Extent{fl, di, ze}, ZeroElsewhere: true,
	})
	for _, err := range errs {
		t.Errorf("host check: %v", err)
	}
	if err := harness.CheckExtentPattern(data, fl, seed); err != nil {
		t.Errorf("host check of the flushed extent: %v", err)
	}
	if err := harness.CheckExtentZero(data, di); err != nil {
		t.Errorf("host check of the discarded extent: %v", err)
	}
	if err := harness.CheckExtentZero(data, ze); err != nil {
		t.Errorf("host check of the zeroed extent: %v", err)
	}
}

// maskExtents returns a copy of data in which the parts of the fixed
// extents that the verify plan also covers hold the plan's pattern again,
// so that CheckPlan sees what verify wrote there.
func maskExtents(data []byte, seed uint64, coverage, maxBlocks int, fixed ...pattern.Extent) []byte {
	out := append([]byte(nil), data...)
	plan := pattern.Plan(seed, int64(len(data)), coverage, maxBlocks)
	for _, f := range fixed {
		for _, e := range plan {
			lo, hi := max(e.Off, f.Off), min(e.End(), f.End())
			if lo < hi {
				pattern.Fill(out[lo:hi], seed, lo)
			}
		}
	}
	return out
}

// TestHarnessOnQSD proves the guest side and the harness with
// qemu-storage-daemon as the back end: boot, info, pattern write and
// verify, flush, discard, write-zeroes, then a byte-for-byte host check.
func TestHarnessOnQSD(t *testing.T) {
	e := needEnv(t)
	dir, sd := t.TempDir(), sockDir(t)
	const size = 64 << 20
	img := sparse(t, filepath.Join(dir, "disk.img"), size)
	sock := filepath.Join(sd, "qsd0.sock")
	startQSD(t, e, []harness.QSDExport{{ID: "e0", Image: img, Socket: sock, NumQueues: 1, Writable: true}}, "")

	const seed, coverage, maxBlocks = 4242, 25, 64
	run := runGuest(t, e, harness.VMConfig{
		Disks: []harness.Disk{{Socket: sock, NumQueues: 1}},
		Steps: []string{proto.StepInfo, proto.StepVerify, proto.StepFlush, proto.StepDiscard, proto.StepZeroes},
		Params: map[string]string{
			proto.ParamSeed: strconv.Itoa(seed), proto.ParamCoverage: strconv.Itoa(coverage),
			proto.ParamMaxBlocks: strconv.Itoa(maxBlocks),
		},
	})
	if got := info(t, run, "vda").Sectors; got != size/512 {
		t.Errorf("guest capacity %d sectors, want %d", got, size/512)
	}
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	checkIOSteps(t, data, seed, coverage, maxBlocks)
}
