package multipath

import (
	"fmt"
	"slices"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// Path is one path of a priority group as its selector sees it. The
// multipath target owns it; a selector keeps its own state per Path.
type Path struct {
	// Name is the device as the table names it (TABLE and status echo it).
	Name string
}

// Selector chooses among the valid paths of one priority group (the
// kernel's struct path_selector). The multipath target serialises AddPath,
// FailPath, ReinstatePath, Select and Status; StartIO and EndIO may run
// concurrently with everything, so a Selector guards its own state.
type Selector interface {
	// AddPath adds a valid path with its per-path table arguments. Errors
	// name the argument: `repeat count "x": not a number`.
	AddPath(p *Path, args []string) error
	// FailPath moves p out of selection; ReinstatePath brings it back.
	FailPath(p *Path)
	ReinstatePath(p *Path)
	// Select returns the path for an I/O of n bytes, or nil if no path is
	// valid.
	Select(n uint64) *Path
	// StartIO and EndIO bracket each I/O of n bytes sent down p.
	StartIO(p *Path, n uint64)
	EndIO(p *Path, n uint64)
	// PathStatus returns p's status words in the INFO or TABLE form,
	// without surrounding spaces ("" for none).
	PathStatus(p *Path, kind mapper.StatusKind) string
}

// SelectorType is a registered path selector (the kernel's struct
// path_selector_type).
type SelectorType struct {
	Name    string
	Version [3]int
	// TableArgs and InfoArgs are the number of per-path status words
	// in TABLE and INFO (the kernel prints them in the group header).
	TableArgs, InfoArgs int
	// New makes the selector of one priority group from its selector
	// arguments (which the kernel's selectors ignore and TABLE omits).
	New func(args []string) (Selector, error)
}

// Selectors is the plug-in registry of path selectors, the same mechanism
// as the mapper's target types.
var Selectors = mapper.NewRegistry[*SelectorType]("path selector")

// RegisterSelector registers a path selector type; call it from init.
func RegisterSelector(t *SelectorType) {
	if t.New == nil {
		panic("multipath: path selector " + t.Name + " has no constructor")
	}
	Selectors.Register(t.Name, t)
}

// pathList keeps a selector's valid and failed paths in the kernel's list
// order, with per-path state of type T.
type pathList[T any] struct {
	mu     sync.Mutex
	valid  []*Path
	failed []*Path
	info   map[*Path]*T
}

func (l *pathList[T]) add(p *Path, info *T) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.info == nil {
		l.info = map[*Path]*T{}
	}
	l.info[p] = info
	l.valid = append(l.valid, p)
}

func (l *pathList[T]) get(p *Path) *T {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.info[p]
}

// fail moves p to the head of the failed list (list_move).
func (l *pathList[T]) fail(p *Path) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.valid = remove(l.valid, p)
	l.failed = append([]*Path{p}, remove(l.failed, p)...)
}

// reinstate moves p to the tail (or, with head, the head) of the valid list.
func (l *pathList[T]) reinstate(p *Path, head bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.failed = remove(l.failed, p)
	l.valid = remove(l.valid, p)
	if head {
		l.valid = append([]*Path{p}, l.valid...)
	} else {
		l.valid = append(l.valid, p)
	}
}

// pick returns the valid path best chooses (best(a, b) reports whether a
// beats b; stop ends the scan early) and moves it to the tail of the list
// so that ties rotate, as the kernel's selectors do.
func (l *pathList[T]) pick(better func(a, b *T) bool, stop func(*T) bool) *Path {
	l.mu.Lock()
	defer l.mu.Unlock()
	var best *Path
	for _, p := range l.valid {
		if best == nil || better(l.info[p], l.info[best]) {
			best = p
		}
		if stop != nil && stop(l.info[best]) {
			break
		}
	}
	if best != nil {
		l.valid = append(remove(l.valid, best), best)
	}
	return best
}

func remove(s []*Path, p *Path) []*Path {
	if i := slices.Index(s, p); i >= 0 {
		return slices.Delete(s, i, i+1)
	}
	return s
}

// repeatCount parses the optional repeat_count path argument all three
// selectors take. Values above 1 are accepted and stored as 1: kernel 6.1
// warns "repeat_count > 1 is deprecated, using 1 instead".
func repeatCount(selector string, args []string) (uint64, error) {
	if len(args) == 0 {
		return 1, nil
	}
	n, err := mapper.ParseUint(selector+" repeat count", args[0], 0, 1<<32-1)
	if err != nil {
		return 0, err
	}
	return min(n, 1), nil
}

func tooMany(selector string, args []string, max int) error {
	if len(args) > max {
		return fmt.Errorf("%s: want at most %d path arguments, got %d", selector, max, len(args))
	}
	return nil
}
