package replicator

import (
	"fmt"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/targets/dirtylog"
)

// nolog is the seed's "nolog" dirty log, which package dirtylog does not
// have: the device starts in sync and nothing is tracked, so the whole
// device is one region and resynchronises whole when its site has failed.
// It is used when dirtylog.Types has no "nolog" of its own.
type nolog struct {
	length uint64

	mu     sync.Mutex
	inSync bool
	busy   bool
	search bool
}

func newNolog(c *mapper.Ctx, args []string) (dirtylog.Log, error) {
	if len(args) != 0 {
		return nil, fmt.Errorf("nolog: takes no parameters, got %d", len(args))
	}
	return &nolog{length: c.Length, inSync: true}, nil
}

// newDirtyLog makes a dirty log of the named type: "nolog" here unless
// package dirtylog has one, other types from dirtylog.Types.
func newDirtyLog(c *mapper.Ctx, typ string, args []string, flushData func() error) (dirtylog.Log, error) {
	if _, err := dirtylog.Types.Lookup(typ); err != nil && typ == "nolog" {
		return newNolog(c, args)
	}
	return dirtylog.New(c, typ, args, flushData)
}

func (l *nolog) RegionSize() uint64 { return l.length }
func (l *nolog) Regions() uint64    { return 1 }
func (l *nolog) Resume() error {
	l.mu.Lock()
	l.search = false
	l.mu.Unlock()
	return nil
}
func (l *nolog) IsClean(uint64) bool { return true }
func (l *nolog) InSync(uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inSync
}
func (l *nolog) MarkRegion(uint64)  {}
func (l *nolog) ClearRegion(uint64) {}
func (l *nolog) Flush() error       { return nil }
func (l *nolog) ResyncWork() (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inSync || l.busy || l.search {
		return 0, false
	}
	l.busy, l.search = true, true
	return 0, true
}
func (l *nolog) SetRegionSync(_ uint64, inSync bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.busy = false
	l.inSync = inSync
}
func (l *nolog) SyncCount() uint64 {
	if l.InSync(0) {
		return 1
	}
	return 0
}
func (l *nolog) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusTable {
		return "nolog 0"
	}
	return "1 nolog"
}
func (l *nolog) Close() error { return nil }
