package multipath

import (
	"strconv"

	"github.com/vhostdm/vhostdm/mapper"
)

// round-robin sends each I/O down the next valid path in turn (kernel
// dm-round-robin 1.2). Path arguments: [<repeat_count>], stored as 1 when
// larger, as kernel 6.1 does. INFO has no per-path words; TABLE has the
// repeat count.
func init() {
	RegisterSelector(&SelectorType{Name: "round-robin", Version: [3]int{1, 2, 0}, TableArgs: 1, InfoArgs: 0,
		New: func([]string) (Selector, error) { return &roundRobin{}, nil }})
}

type rrInfo struct{ repeat uint64 }

type roundRobin struct{ l pathList[rrInfo] }

func (s *roundRobin) AddPath(p *Path, args []string) error {
	if err := tooMany("round-robin", args, 1); err != nil {
		return err
	}
	n, err := repeatCount("round-robin", args)
	if err != nil {
		return err
	}
	s.l.add(p, &rrInfo{repeat: n})
	return nil
}

func (s *roundRobin) FailPath(p *Path) { s.l.fail(p) }

// ReinstatePath puts p first, as rr_reinstate_path's list_move does.
func (s *roundRobin) ReinstatePath(p *Path) { s.l.reinstate(p, true) }

// Select takes the first valid path and moves it to the back.
func (s *roundRobin) Select(uint64) *Path {
	return s.l.pick(func(a, b *rrInfo) bool { return false }, func(*rrInfo) bool { return true })
}

func (s *roundRobin) StartIO(*Path, uint64) {}
func (s *roundRobin) EndIO(*Path, uint64)   {}

func (s *roundRobin) PathStatus(p *Path, kind mapper.StatusKind) string {
	if kind == mapper.StatusTable {
		return strconv.FormatUint(s.l.get(p).repeat, 10)
	}
	return ""
}
