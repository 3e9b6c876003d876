package targets

import "github.com/vhostdm/vhostdm/mapper"

// errorTarget fails every I/O, flushes and discards included, as the
// kernel's dm-error.
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

func (errorTarget) Map(*mapper.Request) error       { return mapper.ErrIO }
func (errorTarget) Status(mapper.StatusKind) string { return "" }
func (errorTarget) Close() error                    { return nil }
