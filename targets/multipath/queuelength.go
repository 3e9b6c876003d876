package multipath

import (
	"strconv"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/mapper"
)

// queue-length sends each I/O down the valid path with the fewest I/Os in
// flight, the first such path in list order, and moves the chosen path to
// the back of the list so that equally loaded paths take turns (kernel
// dm-queue-length 0.2). Path arguments: [<repeat_count>], stored as 1
// when larger. INFO per path: the in-flight count; TABLE: the repeat count.
func init() {
	RegisterSelector(&SelectorType{Name: "queue-length", Version: [3]int{0, 2, 0}, TableArgs: 1, InfoArgs: 1,
		New: func([]string) (Selector, error) { return &queueLength{}, nil }})
}

type qlInfo struct {
	repeat uint64
	qlen   atomic.Int64
}

type queueLength struct{ l pathList[qlInfo] }

func (s *queueLength) AddPath(p *Path, args []string) error {
	if err := tooMany("queue-length", args, 1); err != nil {
		return err
	}
	n, err := repeatCount("queue-length", args)
	if err != nil {
		return err
	}
	s.l.add(p, &qlInfo{repeat: n})
	return nil
}

func (s *queueLength) FailPath(p *Path)      { s.l.fail(p) }
func (s *queueLength) ReinstatePath(p *Path) { s.l.reinstate(p, false) }

// Select picks the least loaded path; a path with nothing in flight ends
// the search at once.
func (s *queueLength) Select(uint64) *Path {
	return s.l.pick(func(a, b *qlInfo) bool { return a.qlen.Load() < b.qlen.Load() },
		func(best *qlInfo) bool { return best.qlen.Load() == 0 })
}

func (s *queueLength) StartIO(p *Path, _ uint64) { s.l.get(p).qlen.Add(1) }
func (s *queueLength) EndIO(p *Path, _ uint64)   { s.l.get(p).qlen.Add(-1) }

func (s *queueLength) PathStatus(p *Path, kind mapper.StatusKind) string {
	pi := s.l.get(p)
	if kind == mapper.StatusTable {
		return strconv.FormatUint(pi.repeat, 10)
	}
	return strconv.FormatInt(pi.qlen.Load(), 10)
}
