package targets

import (
	"fmt"

	"github.com/vhostdm/vhostdm/mapper"
)

// zero reads zeros and drops writes, as the kernel's dm-zero.
//
//	zero
//
// INFO and TABLE are empty ("0 2048 zero ").
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "zero", Version: [3]int{1, 1, 0}, New: newZero})
}

type zero struct{}

func newZero(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) != 0 {
		return nil, fmt.Errorf("no arguments required, got %d", len(args))
	}
	return zero{}, nil
}

func (zero) Map(r *mapper.Request) error {
	if r.Op == mapper.OpRead {
		mapper.ZeroBufs(r.Data)
	}
	return nil
}

// TryMap implements mapper.TryMapper: zero never blocks.
func (z zero) TryMap(r *mapper.Request) error { return z.Map(r) }

func (zero) Status(mapper.StatusKind) string { return "" }
func (zero) Close() error                    { return nil }

// Allocation reports a hole that reads as zeros.
func (zero) Allocation(_, sectors uint64) (uint64, mapper.AllocState, error) {
	return sectors, mapper.AllocHole | mapper.AllocZero, nil
}
