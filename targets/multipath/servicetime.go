package multipath

import (
	"fmt"
	"sync/atomic"

	"github.com/vhostdm/vhostdm/mapper"
)

// service-time sends each I/O down the valid path with the shortest
// estimated service time, (in-flight bytes + the I/O's bytes) / relative
// throughput, and moves the chosen path to the back of the list (kernel
// dm-service-time 0.3). Path arguments: [<repeat_count>
// [<relative_throughput>]]; the repeat count is stored as 1 when larger,
// the relative throughput is 0 to 100 (default 1), and a path of
// throughput 0 is used only when no path of positive throughput is valid.
// Comparisons follow st_compare_load: equal throughputs compare in-flight
// bytes; equal loads, or one throughput 0, prefer the higher throughput;
// otherwise the cross-multiplied service times decide, ties going to the
// higher throughput. INFO per path: "<in-flight bytes> <throughput>";
// TABLE: "<repeat count> <throughput>".
func init() {
	RegisterSelector(&SelectorType{Name: "service-time", Version: [3]int{0, 3, 0}, TableArgs: 2, InfoArgs: 2,
		New: func([]string) (Selector, error) { return &serviceTime{}, nil }})
}

const stMaxThroughput = 100

type stInfo struct {
	repeat     uint64
	throughput uint64
	inFlight   atomic.Uint64 // bytes
}

type serviceTime struct{ l pathList[stInfo] }

func (s *serviceTime) AddPath(p *Path, args []string) error {
	if err := tooMany("service-time", args, 2); err != nil {
		return err
	}
	n, err := repeatCount("service-time", args)
	if err != nil {
		return err
	}
	pi := &stInfo{repeat: n, throughput: 1}
	if len(args) == 2 {
		if pi.throughput, err = mapper.ParseUint("service-time relative throughput", args[1], 0, stMaxThroughput); err != nil {
			return err
		}
	}
	s.l.add(p, pi)
	return nil
}

func (s *serviceTime) FailPath(p *Path)      { s.l.fail(p) }
func (s *serviceTime) ReinstatePath(p *Path) { s.l.reinstate(p, false) }

// Select picks the path with the least estimated service time for n bytes.
func (s *serviceTime) Select(n uint64) *Path {
	return s.l.pick(func(a, b *stInfo) bool { return stCompare(a, b, n) < 0 }, nil)
}

// stCompare returns <0 if a serves an I/O of incoming bytes sooner than b,
// >0 if b does, 0 if they are equal.
func stCompare(a, b *stInfo, incoming uint64) int {
	sz1, sz2 := a.inFlight.Load(), b.inFlight.Load()
	if a.throughput == b.throughput {
		return cmp64(sz1, sz2)
	}
	if sz1 == sz2 || a.throughput == 0 || b.throughput == 0 {
		return cmp64(b.throughput, a.throughput)
	}
	sz1 += incoming
	sz2 += incoming
	const shift = 7 // keep the products below 2^64
	if sz1 >= 1<<(64-shift) || sz2 >= 1<<(64-shift) {
		sz1 >>= shift
		sz2 >>= shift
	}
	if st1, st2 := sz1*b.throughput, sz2*a.throughput; st1 != st2 {
		return cmp64(st1, st2)
	}
	return cmp64(b.throughput, a.throughput)
}

func cmp64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (s *serviceTime) StartIO(p *Path, n uint64) { s.l.get(p).inFlight.Add(n) }
func (s *serviceTime) EndIO(p *Path, n uint64)   { s.l.get(p).inFlight.Add(-n) }

func (s *serviceTime) PathStatus(p *Path, kind mapper.StatusKind) string {
	pi := s.l.get(p)
	if kind == mapper.StatusTable {
		return fmt.Sprintf("%d %d", pi.repeat, pi.throughput)
	}
	return fmt.Sprintf("%d %d", pi.inFlight.Load(), pi.throughput)
}
