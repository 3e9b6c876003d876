package targets

import (
	"fmt"

	"github.com/vhostdm/vhostdm/mapper"
)

// linear maps a range of the device onto a range of a backend.
//
//	linear <dev_path> <offset>
//
// INFO is empty; TABLE is "<dev_path> <offset>" exactly as loaded
// ("0 2048 linear /var/lib/vm/root.img 0"). Unlike the kernel, which
// prints major:minor, TABLE echoes the backend name the table used, so
// that the output loads back into vhostdm.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "linear", Version: [3]int{1, 4, 0}, New: newLinear})
}

type linear struct {
	dev    mapper.Backend
	offset uint64 // sectors into dev
	length uint64 // sectors
}

func newLinear(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) != 2 {
		return nil, fmt.Errorf("want 2 arguments <dev_path> <offset>, got %d", len(args))
	}
	offset, err := mapper.ParseUint("device offset", args[1], 0, mapper.MaxSector)
	if err != nil {
		return nil, err
	}
	if offset+c.Length > mapper.MaxSector {
		return nil, fmt.Errorf("device offset %d + length %d: beyond the largest device", offset, c.Length)
	}
	dev, err := c.Open(args[0])
	if err != nil {
		return nil, err
	}
	return &linear{dev: dev, offset: offset, length: c.Length}, nil
}

func (t *linear) Map(r *mapper.Request) error {
	return mapper.MapBackend(t.dev, t.offset+r.Sector, r)
}

// TryMap implements mapper.TryMapper: linear only remaps.
func (t *linear) TryMap(r *mapper.Request) error {
	return mapper.TryMapBackend(t.dev, t.offset+r.Sector, r)
}

// Passthrough implements mapper.Passthrough: Table.TryMap sends linear's
// reads and writes to the backend without calling TryMap.
func (t *linear) Passthrough() (mapper.Backend, uint64) { return t.dev, t.offset }

// Remap implements mapper.Remapper: the asynchronous engine sends linear's
// reads and writes to the backend directly.
func (t *linear) Remap(sector, _ uint64) (mapper.Backend, uint64, bool) {
	return t.dev, t.offset + sector, true
}

func (t *linear) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusTable {
		return fmt.Sprintf("%s %d", t.dev.Name(), t.offset)
	}
	return ""
}

func (t *linear) Close() error { return nil }

// Areas lists the one area of the backend the target uses.
func (t *linear) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	return fn(t.dev, t.offset, t.length)
}

// Allocation asks the backend (a sparse file's holes, a device's table).
func (t *linear) Allocation(sector, sectors uint64) (uint64, mapper.AllocState, error) {
	return mapper.BackendAllocation(t.dev, t.offset+sector, sectors)
}
