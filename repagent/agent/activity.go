package agent

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vhostdm/vhostdm/repagent/agent/actlog"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// ActivityLog configures the agent's on-disk activity log of hot extents
// (package actlog): with one, a crash of the agent's process resyncs only
// the extents that were hot, not whole volumes.
type ActivityLog struct {
	// Path is the log file. Its session is kept in Path+".session".
	Path string
	// Extents is al-extents (default actlog.DefaultExtents); ExtentSize
	// the extent size in bytes (default actlog.DefaultExtentSize).
	Extents    int
	ExtentSize uint64
	// Volumes are the protected volumes the log covers, by the name they
	// are attached with and their size in bytes. A volume attached later,
	// or with another size, is not covered: after a crash it is
	// resynchronised in full.
	Volumes []actlog.Volume
	// Backing is the look at the volumes' backing files taken before
	// the daemon's tables opened them (CheckBacking); nil: New takes it.
	Backing *BackingCheck
}

// sessionFile returns the file that keeps the agent's session number
// across restarts with a trusted activity log.
func sessionFile(logPath string) string { return logPath + ".session" }

// openActivityLog opens the activity log and chooses the session: the one
// of the last run when the log could be trusted (the hub then trusts this
// run's dirty map, which holds the log's extents), a new one otherwise (the
// hub resyncs every volume in full). Called by New.
func (a *Agent) openActivityLog(c ActivityLog) error {
	l, rec, err := actlog.Open(c.Path, actlog.Config{Volumes: c.Volumes, Extents: c.Extents, ExtentSize: c.ExtentSize})
	if err != nil {
		return err
	}
	session := uint64(0)
	sf := sessionFile(c.Path)
	if rec.Err == nil {
		if b, err := os.ReadFile(sf); err == nil {
			if x, err := hex.DecodeString(strings.TrimSpace(string(b))); err == nil && len(x) == 8 {
				session = binary.BigEndian.Uint64(x)
			}
		}
		if session == 0 {
			rec.Err = fmt.Errorf("%s: no session saved with the log", sf)
			for i := range rec.Volumes {
				rec.Volumes[i].Full, rec.Volumes[i].Reason = true, rec.Err.Error()
				rec.Volumes[i].Ranges, rec.Volumes[i].Bytes = nil, c.Volumes[i].Size
			}
		}
	}
	if session == 0 {
		var sb [8]byte
		rand.Read(sb[:])
		session = binary.BigEndian.Uint64(sb[:]) | 1
		if err := writeFileSync(sf, []byte(fmt.Sprintf("%016x\n", session))); err != nil {
			l.Close()
			return fmt.Errorf("activity log session %s: %w", sf, err)
		}
	}
	a.session = session
	a.al = l
	a.alPath = c.Path
	a.alVols = map[string]int{}
	a.alRec = map[string]actlog.VolumeRecovery{}
	for i, v := range c.Volumes {
		a.alVols[v.Name] = i
		a.alRec[v.Name] = rec.Volumes[i]
	}
	switch {
	case rec.Err != nil:
		a.log.Warn("activity log not trusted: every volume it covers is resynchronised in full", "path", c.Path, "reason", rec.Err)
	case rec.Clean:
		a.log.Info("activity log clean: no resync", "path", c.Path)
	default:
		var total uint64
		for _, v := range rec.Volumes {
			total += v.Bytes
		}
		a.log.Warn("agent restarted after a crash: resyncing the activity log's hot extents", "path", c.Path, "bytes", total)
	}
	return nil
}

// writeFileSync writes a small file durably: temporary file, fsync,
// rename, fsync of the directory.
func writeFileSync(path string, b []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".new*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// attachActivity ties a newly attached volume to its entry in the activity
// log and puts what the log recovered for it into its dirty bitmap; a.mu
// held.
func (a *Agent) attachActivity(v *agentVolume) {
	v.alVol = -1
	if a.al == nil || !v.opts.Protect {
		return
	}
	i, ok := a.alVols[v.name]
	if !ok || a.alSizes[i] != v.dev.Size()*wire.SectorSize {
		v.log.Warn("volume not covered by the activity log: a crash resyncs it in full")
		return
	}
	v.alVol = i
	rec, ok := a.alRec[v.name]
	if !ok {
		return
	}
	delete(a.alRec, v.name) // once per process
	regions := wire.RegionCount(v.dev.Size(), a.cfg.RegionSectors)
	switch {
	case rec.Full:
		v.dirty.AddRange(0, regions)
		v.alFull = true
		v.resync = ResyncInfo{Reason: "full resync: " + rec.Reason, Bytes: rec.Bytes}
	case len(rec.Ranges) > 0:
		for _, r := range rec.Ranges {
			wire.AddSectors(v.dirty, r.Off/wire.SectorSize, r.Len/wire.SectorSize, a.cfg.RegionSectors)
		}
		v.resync = ResyncInfo{Reason: "the agent crashed: resync of the activity log's hot extents", Bytes: rec.Bytes}
	default:
		return
	}
	v.noteDirty(time.Now(), v.resync.Reason)
	v.log.Warn("resync after restart", "reason", v.resync.Reason, "bytes", v.resync.Bytes)
}

// ResyncInfo says why the agent last asked the hub to resync a volume and
// how many bytes that resync covers at most.
type ResyncInfo struct {
	Reason string `json:"reason"`
	Bytes  uint64 `json:"bytes"`
}

// alBegin admits a protected write into the activity log; ok is false when
// the volume is not logged.
func (a *Agent) alBegin(v *agentVolume, sector, sectors uint64) (actlog.Token, bool) {
	if v.alVol < 0 || a.alLost.Load() || sectors == 0 {
		return actlog.Token{}, false
	}
	tok, err := a.al.Begin(v.alVol, sector*wire.SectorSize, sectors*wire.SectorSize)
	if err != nil {
		a.loseActivityLog(err)
		return actlog.Token{}, false
	}
	return tok, true
}

// loseActivityLog stops using the activity log after an error and removes
// the file, so that a crash from now on resyncs every volume in full rather
// than trusting a log that misses writes.
func (a *Agent) loseActivityLog(err error) {
	if a.alLost.Swap(true) {
		return
	}
	rmErr := os.Remove(a.alPath)
	if rmErr == nil {
		if d, err := os.Open(filepath.Dir(a.alPath)); err == nil {
			rmErr = d.Sync()
			d.Close()
		}
	}
	a.log.Error("activity log abandoned: a crash now resyncs every protected volume in full", "path", a.alPath, "err", err, "remove_err", rmErr)
}

// alHold keeps the extents of a byte range hot until cleaned: its data is
// in the dirty bitmap, not with the hub.
func (a *Agent) alHold(v *agentVolume, sector, sectors uint64) {
	if v.alVol < 0 || a.alLost.Load() || sectors == 0 {
		return
	}
	if err := a.al.Dirty(v.alVol, sector*wire.SectorSize, sectors*wire.SectorSize); err != nil && !errors.Is(err, actlog.ErrClosed) {
		a.loseActivityLog(err)
	}
}

// alDirtyMapAcked releases the extents of an acknowledged DIRTY_MAP: the
// hub has recorded its regions durably and resyncs them even if the agent
// crashes now. Extents that still have a region in the dirty bitmap or in
// a later unacknowledged DIRTY_MAP stay held; a.mu held.
func (a *Agent) alDirtyMapAcked(v *agentVolume, it *qitem) {
	if v.alVol < 0 || a.alLost.Load() {
		return
	}
	if it.alFull {
		if err := a.al.FullResyncDone(v.alVol); err != nil && !errors.Is(err, actlog.ErrClosed) {
			a.loseActivityLog(err)
			return
		}
	}
	es := a.al.ExtentSize()
	rs := uint64(a.cfg.RegionSectors) * wire.SectorSize
	size := v.dev.Size() * wire.SectorSize
	perExt := max(es/rs, 1)
	var last uint64 = ^uint64(0)
	for _, e := range it.extents {
		for off := e.Start * rs; off < (e.Start+e.Count)*rs && off < size; {
			x := off / es
			next := (x + 1) * es
			if x != last {
				last = x
				r0 := x * es / rs
				busy := v.dirty.IntersectsWithInterval(r0, r0+perExt)
				for _, p := range v.pending {
					if busy {
						break
					}
					if p.seq > it.seq && p.msg != nil && !p.write {
						for _, pe := range p.extents {
							if pe.Start < r0+perExt && r0 < pe.Start+pe.Count {
								busy = true
								break
							}
						}
					}
				}
				if !busy {
					a.al.Clean(v.alVol, x*es, min(es, size-x*es))
				}
			}
			off = next
		}
	}
}
