package replicator

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/targets/dirtylog"
)

// replicator-dev is a replicated device: its writes go through the log of
// a replicator device to its devices at each site.
//
//	replicator-dev <replicator_device> <dev_nr> {<slink_nr> <#dev_params> <dev_params>... <dlog_type> <#dlog_params> <dlog_params>...}{1..N}
//
// replicator_device is /dev/mapper/NAME of a loaded replicator. dev_nr tags
// the device's entries in the log and is unique per log. Each group names
// the device at one site (blockdev: one parameter, the device path) and its
// dirty log: nolog (no parameters), core <region_size> [sync|nosync] or
// disk <dlog_dev> <region_size> [sync|nosync]. slink 0, the local device,
// is required: reads are served from it.
//
// INFO: "/dev/mapper/rep 1 2 0 /img/l1 16/16 1 core 1 /img/r1 12/16 1 core"
// (<replicator_device> <dev_nr> <#slinks> {<slink_nr> <dev_params>...
// <regions_in_sync>/<regions> <dlog INFO>}). TABLE: "/dev/mapper/rep 1 0 1
// /img/l1 nolog 0 1 1 /img/r1 core 1 64".
type devTarget struct {
	// Immutable.
	device   string
	replName string
	nr       uint32
	length   uint64
	eng      *engine
	local    LocalDevice
	sites    map[uint32]*siteDev
	order    []uint32
	closed   sync.Once
}

func newDev(c *mapper.Ctx, args []string) (mapper.Target, error) {
	a := mapper.NewArgs(args)
	repl, err := a.Next("replicator device")
	if err != nil {
		return nil, err
	}
	name, ok := strings.CutPrefix(repl, mapper.MapperDir)
	if !ok || name == "" {
		return nil, fmt.Errorf("replicator device %q: not %sNAME", repl, mapper.MapperDir)
	}
	nr, err := a.Uint("dev_nr", 0, 1<<32-1)
	if err != nil {
		return nil, err
	}
	type group struct {
		nr         uint32
		devParams  []string
		dlogType   string
		dlogParams []string
	}
	var groups []group
	seen := map[uint32]bool{}
	for a.Len() > 0 {
		var g group
		sn, err := a.Uint("slink number", 0, maxSlinkNr)
		if err != nil {
			return nil, err
		}
		g.nr = uint32(sn)
		if seen[g.nr] {
			return nil, fmt.Errorf("slink %d: given twice", sn)
		}
		seen[g.nr] = true
		k, err := a.Uint("#dev_params", 1, uint64(max(a.Len()-1, 1)))
		if err != nil {
			return nil, err
		}
		for i := uint64(0); i < k; i++ {
			p, _ := a.Next("dev parameter")
			g.devParams = append(g.devParams, p)
		}
		if g.dlogType, err = a.Next("dirty log type"); err != nil {
			return nil, err
		}
		k, err = a.Uint("#dlog_params", 0, uint64(max(a.Len()-1, 0)))
		if err != nil {
			return nil, err
		}
		for i := uint64(0); i < k; i++ {
			p, _ := a.Next("dirty log parameter")
			g.dlogParams = append(g.dlogParams, p)
		}
		groups = append(groups, g)
	}
	if len(groups) == 0 {
		return nil, errors.New("missing site devices: want at least slink 0")
	}
	if !seen[0] {
		return nil, errors.New("slink 0: missing, the local device is required")
	}
	dir := dirOf(c)
	dir.mu.Lock()
	eng := dir.byName[name]
	dir.mu.Unlock()
	if eng == nil {
		return nil, mapper.Errorf(mapper.ErrNotFound, "replicator device %s: no replicator table loaded", repl)
	}
	eng.mu.Lock()
	links := eng.links
	if d := eng.devs[uint32(nr)]; d != nil && d.owner != nil && d.owner.device != c.Device {
		eng.mu.Unlock()
		return nil, mapper.Errorf(mapper.ErrBusy, "dev_nr %d: in use by device %s", nr, d.owner.device)
	}
	eng.mu.Unlock()
	for _, g := range groups {
		l := links[g.nr]
		if l == nil {
			return nil, fmt.Errorf("slink %d: not defined by replicator %s", g.nr, repl)
		}
		if len(g.devParams) != l.DevParams() {
			return nil, fmt.Errorf("slink %d: #dev_params %d, want %d", g.nr, len(g.devParams), l.DevParams())
		}
		if _, err := dirtylog.Types.Lookup(g.dlogType); err != nil && g.dlogType != "nolog" {
			return nil, err
		}
	}
	// Hold the replicator device open: it cannot be removed under us.
	if _, err := c.Open(repl); err != nil {
		return nil, err
	}
	t := &devTarget{device: c.Device, replName: repl, nr: uint32(nr), length: c.Length, eng: eng, sites: map[uint32]*siteDev{}}
	for _, g := range groups {
		dev, err := links[g.nr].OpenDevice(c, g.devParams)
		if err != nil {
			return nil, err
		}
		lg, err := newDirtyLog(c, g.dlogType, g.dlogParams, dev.Flush)
		if err != nil {
			return nil, fmt.Errorf("slink %d dirty log: %w", g.nr, err)
		}
		if g.nr == 0 {
			ld, ok := dev.(LocalDevice)
			if !ok {
				return nil, fmt.Errorf("slink 0: a %T cannot serve reads", dev)
			}
			t.local = ld
		}
		t.sites[g.nr] = &siteDev{dev: dev, log: lg}
		t.order = append(t.order, g.nr)
	}
	return t, nil
}

// backender is a site device over a mapper.Backend.
type backender interface{ backend() mapper.Backend }

// Areas lists the devices at every site and the dirty logs' areas.
func (t *devTarget) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	for _, nr := range t.order {
		sd := t.sites[nr]
		if b, ok := sd.dev.(backender); ok {
			if err := fn(b.backend(), 0, t.length); err != nil {
				return err
			}
		}
		if al, ok := sd.log.(mapper.AreaLister); ok {
			if err := al.Areas(fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// Map reads from the local device and sends writes through the log.
func (t *devTarget) Map(r *mapper.Request) error {
	switch r.Op {
	case mapper.OpRead:
		return t.local.ReadAt(r.Data, int64(r.Sector)<<mapper.SectorShift)
	case mapper.OpFlush:
		return t.eng.flush()
	case mapper.OpDiscard, mapper.OpWriteZeroes:
		d := t.reg()
		if d == nil {
			return notJoined
		}
		return t.eng.submit(d, r.Op, r.Sector, r.Sectors, nil)
	case mapper.OpWrite:
		// The log keeps a copy: request data is not ours to keep.
		d := t.reg()
		if d == nil {
			return notJoined
		}
		chunk := uint64(maxEntryBytes) >> mapper.SectorShift
		for chunk > 1 && !t.eng.log.Fits(int(chunk<<mapper.SectorShift)) {
			chunk /= 2 // a small ring takes smaller entries
		}
		off := 0
		for s, left := r.Sector, r.Sectors; left > 0; {
			n := min(left, chunk)
			buf := make([]byte, n<<mapper.SectorShift)
			pos := 0
			for _, b := range mapper.SliceBufs(nil, r.Data, off, len(buf)) {
				pos += copy(buf[pos:], b)
			}
			if err := t.eng.submit(d, mapper.OpWrite, s, n, buf); err != nil {
				return err
			}
			off += len(buf)
			s += n
			left -= n
		}
		return nil
	}
	return mapper.Errorf(mapper.ErrUnsupported, "%s", r.Op)
}

// notJoined fails writes of a device whose registration failed on resume.
var notJoined = mapper.Errorf(mapper.ErrIO, "device has not joined its replication log")

// reg returns the device's live registration.
func (t *devTarget) reg() *devReg {
	t.eng.mu.Lock()
	defer t.eng.mu.Unlock()
	if d := t.eng.devs[t.nr]; d != nil && d.owner == t {
		return d
	}
	return nil
}

// Presuspend implements mapper.Suspender.
func (t *devTarget) Presuspend(noflush bool) error { return nil }

// Resume implements mapper.Suspender: the device joins the log (replaying
// its entries on the local device first).
func (t *devTarget) Resume() error { return t.eng.register(t) }

// Close implements mapper.Target.
func (t *devTarget) Close() error {
	t.closed.Do(func() { t.eng.unregister(t) })
	var errs []error
	for _, sd := range t.sites {
		errs = append(errs, sd.log.Close())
	}
	return errors.Join(errs...)
}

// Status implements mapper.Target.
func (t *devTarget) Status(kind mapper.StatusKind) string {
	words := []string{t.replName, fmt.Sprint(t.nr)}
	if kind == mapper.StatusInfo {
		words = append(words, fmt.Sprint(len(t.order)))
	}
	for _, nr := range t.order {
		sd := t.sites[nr]
		params := sd.dev.Table()
		if kind == mapper.StatusInfo {
			words = append(words, fmt.Sprint(nr))
			words = append(words, params...)
			inSync := sd.log.SyncCount()
			if nr == 0 { // the source of every resynchronisation
				inSync = sd.log.Regions()
			}
			words = append(words, fmt.Sprintf("%d/%d", inSync, sd.log.Regions()), sd.log.Status(kind))
			continue
		}
		words = append(words, fmt.Sprint(nr), fmt.Sprint(len(params)))
		words = append(words, params...)
		words = append(words, sd.log.Status(kind))
	}
	return strings.Join(words, " ")
}
