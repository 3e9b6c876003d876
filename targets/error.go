package targets

import "github.com/vhostdm/vhostdm/mapper"

// errorTarget fails every read, write, discard and write-zeroes, as the
// kernel's dm-error. Flushes succeed: the kernel sends none to dm-error
// (it has no flush bios), so a table with an error line still flushes the
// rest of the device.
//
//	error
//
// INFO and TABLE are empty. Like the kernel, the constructor ignores any
// arguments it is given.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "error", Version: [3]int{1, 5, 0}, New: newError})
}

type errorTarget struct{}

func newError(*mapper.Ctx, []string) (mapper.Target, error) { return errorTarget{}, nil }

func (errorTarget) Map(r *mapper.Request) error {
	if r.Op == mapper.OpFlush {
		return nil
	}
	return mapper.ErrIO
}

// TryMap implements mapper.TryMapper: error never blocks.
func (e errorTarget) TryMap(r *mapper.Request) error { return e.Map(r) }

func (errorTarget) Status(mapper.StatusKind) string { return "" }
func (errorTarget) Close() error                    { return nil }

// Allocation reports a hole: nothing is stored (reads fail, so not zero).
func (errorTarget) Allocation(_, sectors uint64) (uint64, mapper.AllocState, error) {
	return sectors, mapper.AllocHole, nil
}
