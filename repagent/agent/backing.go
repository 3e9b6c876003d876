package agent

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// Backing tracking. The hub trusts that a protected volume holds, when the
// agent comes back, what it held when the agent left plus the writes the
// agent tells of (mirrored, or in its dirty map and activity log). Data
// written by anything else meanwhile — a backup restored into the image
// while the VM was down, an export re-pointed at another image — breaks
// that trust silently: the hub would report a replica "protecting" that
// is not a copy of the source. DRBD detects this with generation
// identifiers kept in its metadata beside the data; vhostdm keeps, beside
// the activity log (PATH.backing), what each protected volume maps (a
// digest of its tables) and the identity, size and times of every file
// it opens, taken after the daemon's last write to them. A volume whose
// backing changed is reported to the hub as changed (REPORT_VM_VOLUMES'
// CHANGED, protocol level 3), and the hub resynchronises it in full,
// reading only the regions whose checksums differ. The mark stays in the
// record until the hub has acknowledged the DIRTY_MAP that answers it, so
// a crash in between loses nothing.
//
// A block device's node keeps its times when the device is written; for
// one the record holds the kernel's count of sectors written to it and
// discarded (mapper.BackingFile.Written), taken once the daemon's writes
// to it are on the device (settleBlocks).
//
// Storage that is not a file (an rbd: image) is marked instead
// (mapper.Marker: a snapshot) after the daemon's last write to it, and
// compared with the mark at the next attach, which drops the mark; a
// volume stopped without a mark of such storage counts as changed.
//
// What is not seen: a block device written while the host was restarted
// in between (the kernel's count starts again), a partition or logical
// volume written through the disk beneath it (the count is the node's
// own), a write made while the daemon ran or after a crash of it (its
// own writes move the times and counts too; only a change of file or
// table shows then, or of an rbd: image marked before the crash).
// `repagent-hub verify` finds those differences.

// backingVolume is what the agent keeps of one protected volume's
// backing.
type backingVolume struct {
	Table  string               `json:"table"` // hex mapper.Backing.Table
	Files  []mapper.BackingFile `json:"files"`
	Opaque []string             `json:"opaque,omitempty"`
	// Stopped: the files' sizes and times were taken after the
	// daemon's last write to them (a clean stop, or the volume's export
	// was removed); otherwise only their identities count.
	Stopped bool `json:"stopped,omitempty"`
	// Changed, when set, is why the hub has still to be told that the
	// volume's data changed.
	Changed string `json:"changed,omitempty"`
	// Marks are the marks of the storage that is not files (rbd:
	// snapshots), made after the daemon's last write to it.
	Marks []mapper.BackingMark `json:"marks,omitempty"`
}

// backingRecord is the content of the backing file.
type backingRecord struct {
	Version int                       `json:"version"`
	Volumes map[string]*backingVolume `json:"volumes"`
}

const backingVersion = 1

// backingPath returns the file beside the activity log at logPath that
// keeps the protected volumes' backings.
func backingPath(logPath string) string { return logPath + ".backing" }

// BackingCheck is a look at the protected volumes' backing files taken at
// a daemon's start, before its tables open (and may write) them: what
// changed since the daemon last stopped writing them. CheckBacking takes
// it; ActivityLog.Backing hands it to New.
type BackingCheck struct {
	rec      *backingRecord    // nil: no record could be read
	why      string            // why rec is nil
	modified map[string]string // volume name → how its files changed
	unknown  map[string]string // volume name → why writes to its block devices cannot be told
}

// CheckBacking reads the backing record kept beside the activity log at
// logPath and compares the files of every volume that was stopped with
// what they are now.
func CheckBacking(logPath string) *BackingCheck {
	path := backingPath(logPath)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return &BackingCheck{why: fmt.Sprintf("no record of the volumes' backings (%s does not exist)", path)}
	case err != nil:
		return &BackingCheck{why: fmt.Sprintf("the record of the volumes' backings cannot be read: %v", err)}
	}
	var rec backingRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return &BackingCheck{why: fmt.Sprintf("the record of the volumes' backings %s is corrupt: %v", path, err)}
	}
	if rec.Version != backingVersion {
		return &BackingCheck{why: fmt.Sprintf("the record of the volumes' backings %s has version %d, not %d", path, rec.Version, backingVersion)}
	}
	if rec.Volumes == nil {
		rec.Volumes = map[string]*backingVolume{}
	}
	c := &BackingCheck{rec: &rec, modified: map[string]string{}, unknown: map[string]string{}}
	for name, bv := range rec.Volumes {
		if bv == nil {
			delete(rec.Volumes, name)
			continue
		}
		if !bv.Stopped {
			continue
		}
		for _, f := range bv.Files {
			now, err := mapper.StatBacking(f.Path)
			if err != nil {
				c.modified[name] = err.Error()
				break
			}
			if why := fileChange(f, now); why != "" {
				c.modified[name] = why
				break
			}
			if f.SameStorage(now) && !f.Comparable(now) && c.unknown[name] == "" {
				c.unknown[name] = uncountable(f, now)
			}
		}
	}
	return c
}

// uncountable says why the writes to the block device now, the one was
// describes, cannot be told.
func uncountable(was, now mapper.BackingFile) string {
	switch {
	case now.Boot == "":
		return fmt.Sprintf("the kernel's count of the writes to block device %s cannot be read (/sys/dev/block)", now.Path)
	case was.Boot == "":
		return fmt.Sprintf("the record holds no count of the writes to block device %s (an older vhostdm made it, or /sys/dev/block could not be read)", now.Path)
	}
	return fmt.Sprintf("the host restarted since vhostdm stopped writing block device %s: the kernel's count of its writes started again", now.Path)
}

// fileChange says how now differs from was, the same file looked at after
// the daemon's last write to it; "" if it does not, or if that cannot be
// told (a block device across a restart of the host).
func fileChange(was, now mapper.BackingFile) string {
	switch {
	case !was.SameStorage(now):
		return otherFile(was, now)
	case !was.Comparable(now), was.Unchanged(now):
		return ""
	case was.Block:
		return fmt.Sprintf("block device %s was written while vhostdm did not serve it (the kernel counts %d sectors written or discarded since; size %d bytes, at the stop %d)",
			now.Path, now.Written-was.Written, now.Size, was.Size)
	default:
		return fmt.Sprintf("%s was written while vhostdm did not serve it (size %d, modified %s; at the stop: %d, %s)",
			now.Path, now.Size, now.Mtime.UTC().Format(time.RFC3339Nano), was.Size, was.Mtime.UTC().Format(time.RFC3339Nano))
	}
}

// otherFile says that now is not the file was.
func otherFile(was, now mapper.BackingFile) string {
	return fmt.Sprintf("%s is another file than the one served before (device %d inode %d, was %d %d)", now.Path, now.Dev, now.Ino, was.Dev, was.Ino)
}

// newBackingVolume is the record of the backing b, changed for why ("" if
// not).
func newBackingVolume(b mapper.Backing, why string) *backingVolume {
	return &backingVolume{Table: hex.EncodeToString(b.Table[:]), Files: b.Files, Opaque: b.Opaque, Changed: why}
}

// backingChange says how the backing cur differs in what it maps from
// was; "" if it maps the same storage the same way.
func backingChange(was *backingVolume, cur mapper.Backing) string {
	if was.Table != hex.EncodeToString(cur.Table[:]) {
		return "its table maps other storage or maps it otherwise than the one served before"
	}
	if len(was.Files) != len(cur.Files) {
		return fmt.Sprintf("it opens %d files, not %d as before", len(cur.Files), len(was.Files))
	}
	for i, f := range cur.Files {
		if !f.SameStorage(was.Files[i]) {
			return otherFile(was.Files[i], f)
		}
	}
	if !slices.Equal(was.Opaque, cur.Opaque) {
		return fmt.Sprintf("it uses %s, not %s as before", strings.Join(cur.Opaque, ","), strings.Join(was.Opaque, ","))
	}
	return ""
}

// openBacking starts tracking backings beside the activity log at logPath
// with the start's check (taken now if nil). Called by New.
func (a *Agent) openBacking(logPath string, c *BackingCheck) {
	if c == nil {
		c = CheckBacking(logPath)
	}
	a.backPath = backingPath(logPath)
	a.backCheck = c
	a.backNow = map[string]*backingVolume{}
	if c.rec != nil {
		// Volumes not attached in this run keep what they had.
		maps.Copy(a.backNow, c.rec.Volumes)
	}
}

// backingAttach decides whether a protected volume being attached as name
// changed behind the agent's back, records its backing and returns why it
// changed ("" if not). It must run before the volume's first write.
func (a *Agent) backingAttach(name string, o VolumeOptions) (string, error) {
	if a.backPath == "" || !o.Protect || o.Backing == nil {
		return "", nil
	}
	cur, err := o.Backing()
	if err != nil {
		return "", fmt.Errorf("repagent: volume %q: its backing: %w", name, err)
	}
	a.backMu.Lock()
	marked := a.backNow[name]
	a.backMu.Unlock()
	markWhy := compareMarks(marked, o)
	a.backMu.Lock()
	defer a.backMu.Unlock()
	was := a.backNow[name]
	seen := a.backSeen[name] // attached before in this run
	var why string
	switch {
	case was == nil && !seen && a.backCheck.rec == nil:
		why = a.backCheck.why
	case was == nil:
		why = "no record of the volume's backing: it was not served as a protected volume here before"
	case was.Changed != "":
		why = was.Changed
	case !seen && a.backCheck.modified[name] != "":
		why = a.backCheck.modified[name]
	default:
		why = backingChange(was, cur)
		if why == "" && was.Stopped && seen {
			// Detached and attached again in this run: was holds
			// the files as the daemon left them.
			for i, f := range cur.Files {
				if why = fileChange(was.Files[i], f); why != "" {
					break
				}
			}
		}
	}
	if why == "" {
		why = markWhy
	}
	if why == "" && !seen && a.backCheck.unknown[name] != "" {
		a.log.Info("whether the protected volume's block device was written while vhostdm was stopped cannot be told: taken as unchanged (repagent-hub verify compares it)",
			"volume", name, "why", a.backCheck.unknown[name])
	}
	now := newBackingVolume(cur, why)
	if a.backSeen == nil {
		a.backSeen = map[string]bool{}
	}
	a.backSeen[name] = true
	if a.backMark == nil {
		a.backMark = map[string]markFunc{}
	}
	a.backMark[name] = o.MarkBacking
	a.backNow[name] = now
	if err := a.saveBackingLocked(); err != nil {
		// Without the record a crash could forget the change.
		if was == nil {
			delete(a.backNow, name)
		} else {
			a.backNow[name] = was
		}
		return "", fmt.Errorf("repagent: volume %q: saving its backing record: %w", name, err)
	}
	return why, nil
}

// compareMarks compares the storage of a volume being attached (options
// o) whose record was is with the marks the daemon left when it stopped
// writing it, and drops them: it says how the storage changed ("" if
// not). A volume stopped without a mark of storage that takes one (the
// mark failed, or an older vhostdm stopped it) cannot be compared: that
// is a change. Without marks after a crash, nothing is compared. Called
// without backMu: the comparison asks the storage (a Ceph cluster).
func compareMarks(was *backingVolume, o VolumeOptions) string {
	if was == nil || o.ChangedSince == nil || !was.Stopped && len(was.Marks) == 0 {
		return ""
	}
	why, err := o.ChangedSince(was.Marks)
	if err != nil {
		return fmt.Sprintf("its storage cannot be compared with the mark vhostdm left when it stopped writing it: %v", err)
	}
	return why
}

// markStopped marks the storage of names that is not files (rbd:
// images), which the daemon no longer writes, for the next attach to
// compare, and saves the marks at once: a crash before the stop is
// recorded must not leave a mark (a snapshot, which costs a copy of
// every object the guest writes next) that nothing drops. It runs
// without backMu: a cluster that hangs holds up only this. A failure is
// logged; the next start then compares the volume by checksum.
func (a *Agent) markStopped(names []string) {
	type job struct {
		name string
		mark markFunc
	}
	a.backMu.Lock()
	var jobs []job
	for _, name := range names {
		if mark := a.backMark[name]; a.servingLocked(name) != nil && mark != nil {
			jobs = append(jobs, job{name, mark})
		}
	}
	a.backMu.Unlock()
	for _, j := range jobs {
		marks, err := j.mark(a.markTag(j.name))
		if err != nil {
			a.log.Warn("marking a protected volume's storage for the next start failed: the next start compares it with the hub's replica by checksum",
				"volume", j.name, "err", err)
		}
		if len(marks) == 0 {
			continue
		}
		a.backMu.Lock()
		if bv := a.servingLocked(j.name); bv != nil {
			nv := *bv
			nv.Marks = marks
			a.backNow[j.name] = &nv
			if err := a.saveBackingLocked(); err != nil {
				a.log.Warn("saving the backing record", "path", a.backPath, "err", err)
			}
		}
		a.backMu.Unlock()
	}
}

// markFunc marks a volume's storage under a tag (VolumeOptions.MarkBacking).
type markFunc = func(tag string) ([]mapper.BackingMark, error)

// markTag is the tag of volume name's marks (in an rbd: snapshot's
// name: vhostdm-stopped.VM.VOLUME).
func (a *Agent) markTag(name string) string { return a.cfg.VM + "." + name }

// backingReloaded compares what v maps after its device made a new table
// live with what it mapped: a table over other storage, or over the same
// otherwise, marks v changed, and the whole volume goes to the hub as
// dirty (it re-reads it; sequenced with the writes, so none is lost). The
// mark is saved first: a crash before the hub has the dirty map resyncs
// the volume at the next start.
func (a *Agent) backingReloaded(v *agentVolume) {
	cur, err := v.opts.Backing()
	a.backMu.Lock()
	was := a.backNow[v.name]
	var why string
	switch {
	case err != nil:
		why = fmt.Sprintf("a table reload: its backing cannot be told: %v", err)
	case was == nil:
		why = "a table reload: no record of its backing"
	default:
		if c := backingChange(was, cur); c != "" {
			why = "a table reload: " + c
		}
	}
	if why == "" {
		a.backMu.Unlock()
		return
	}
	nv := newBackingVolume(cur, why)
	if err != nil {
		// Keep what was known of it.
		nv = &backingVolume{Changed: why}
		if was != nil {
			nv.Table, nv.Files, nv.Opaque = was.Table, was.Files, was.Opaque
		}
	}
	a.backNow[v.name] = nv
	if err := a.saveBackingLocked(); err != nil {
		a.log.Error("saving the backing record: a crash before the hub has re-read the volume may leave its replica stale", "path", a.backPath, "volume", v.name, "err", err)
	}
	a.backMu.Unlock()

	a.mu.Lock()
	defer a.mu.Unlock()
	if a.vols[v.name] != v {
		return // detached meanwhile
	}
	v.changed = why
	v.log.Warn("a table reload changed what the protected volume maps: the hub re-reads it in full", "why", why,
		"bytes", v.dev.Size()*wire.SectorSize)
	switch {
	case a.conn == nil:
		// The next connection's first report says CHANGED.
	case a.hubLevel >= 3:
		// The next report says CHANGED (again, if one said it
		// before the reload): the hub compares by checksum.
		v.changedAgain = true
		a.reported = false
		a.broadcast()
	case !v.mirror:
		// The START_PROTECT with MIRROR to come resyncs it in full
		// (changedResync).
	default:
		v.log.Warn("the hub speaks protocol level 2 or less: the changed volume is read again in full", "hub_level", a.hubLevel)
		v.dirty.AddRange(0, wire.RegionCount(v.dev.Size(), a.cfg.RegionSectors))
		v.noteDirty(time.Now(), "backing changed: "+why)
		v.changedMap = true // its acknowledgement ends the change
		a.queueDirtyMap(v, false)
	}
}

// markChanged sets CHANGED in the report for the protected volumes whose
// backing changed and that no report on this connection has said so for
// since: the first report naming the volume, or the first after a table
// reload changed it while it mirrored. a.mu held.
func (c *agentConn) markChanged(r *wire.ReportVolumes) {
	a := c.a
	if a.hubLevel < 3 {
		return
	}
	for i := range r.Volumes {
		vi := &r.Volumes[i]
		v := a.vols[vi.Name]
		if v == nil || !vi.Protect || v.changed == "" || c.told[v] && !v.changedAgain {
			continue
		}
		vi.Changed = true
		c.told[v] = true
		v.changedAfter = a.nextSeq // frames queued from now on follow the report
		if v.changedAgain {
			v.changedAgain = false
			v.changedMark = true
		}
	}
}

// queueChangedMarks queues, after a report that said CHANGED for volumes
// that mirror, a DIRTY_MAP for each: the hub read the report before it, so
// its acknowledgement says that the hub has saved the resync the report
// asked for. a.mu held.
func (c *agentConn) queueChangedMarks() {
	a := c.a
	if a.conn != c {
		return
	}
	for _, n := range a.order {
		v := a.vols[n]
		if !v.changedMark {
			continue
		}
		v.changedMark = false
		if !v.mirror {
			continue // START_PROTECT will answer it (changedResync)
		}
		v.noteChecksumResync()
		v.changedMap = true
		a.queueDirtyMap(v, false)
	}
}

// backingStopped records that the daemon wrote name's files for the last
// time (its export went, or the daemon is stopping): their sizes and
// times now are what the next attach compares with. A file that is no
// longer the one served marks the volume changed.
func (a *Agent) backingStopped(name string) {
	if a.backPath == "" {
		return
	}
	a.settleBlocks([]string{name})
	a.markStopped([]string{name})
	a.backMu.Lock()
	defer a.backMu.Unlock()
	a.stopBackingLocked(name)
	if err := a.saveBackingLocked(); err != nil {
		a.log.Warn("saving the backing record", "path", a.backPath, "err", err)
	}
}

// stopBackingLocked is backingStopped without the settling and the save;
// backMu held.
func (a *Agent) stopBackingLocked(name string) {
	bv := a.servingLocked(name)
	if bv == nil {
		return
	}
	nv := *bv
	nv.Files = slices.Clone(bv.Files)
	nv.Stopped = true
	for i, f := range nv.Files {
		now, err := mapper.StatBacking(f.Path)
		switch {
		case err != nil:
			nv.Changed = err.Error()
		case !f.SameStorage(now):
			nv.Changed = fmt.Sprintf("%s was replaced by another file while vhostdm served it", f.Path)
		default:
			nv.Files[i] = now
		}
	}
	a.backNow[name] = &nv
}

// servingLocked returns the record of name if the daemon has served the
// volume in this run and not yet stopped; nil otherwise. backMu held.
func (a *Agent) servingLocked(name string) *backingVolume {
	if bv := a.backNow[name]; bv != nil && !bv.Stopped && a.backSeen[name] {
		return bv
	}
	return nil
}

// settleBlocks makes the writes to the block devices of names, which the
// daemon no longer serves, reach the devices, so that the kernel's counts
// taken next hold them: the daemon's buffered writes would otherwise be
// written back, and counted, after the stop, as if another program had
// written the device. (The last close of a block device writes its dirty
// pages back, but the daemon may not be the last to hold it open, and a
// removed export's device stays open.) It runs without backMu: a device
// that hangs holds up only this. A failure is logged: at worst a later
// count differs and the volume is compared by checksum.
func (a *Agent) settleBlocks(names []string) {
	a.backMu.Lock()
	var paths []string
	for _, name := range names {
		if bv := a.servingLocked(name); bv != nil {
			for _, f := range bv.Files {
				if f.Block {
					paths = append(paths, f.Path)
				}
			}
		}
	}
	a.backMu.Unlock()
	for _, path := range paths {
		if err := syncBlock(path); err != nil {
			a.log.Warn("writing a block device's cached writes back before counting them", "path", path, "err", err)
		}
	}
}

// syncBlock writes back the page cache of the block device at path. It
// opens without blocking and syncs only a block device: what is at the
// path now may be something else.
func syncBlock(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil // not the device any more: the count is not taken from it
	}
	if err := unix.Fsync(fd); err != nil {
		return &fs.PathError{Op: "fsync", Path: path, Err: err}
	}
	return nil
}

// MarkBackings marks the storage of every protected volume served in this
// run that is not files (rbd: images, with a snapshot), for the next
// start to compare: call it once nothing writes the volumes any more and
// before their devices close. RecordStop follows, after the close.
// Errors are logged.
func (a *Agent) MarkBackings() {
	if a.backPath == "" {
		return
	}
	a.markStopped(a.backNames())
}

// backNames returns the names of the volumes in the record, sorted.
func (a *Agent) backNames() []string {
	a.backMu.Lock()
	defer a.backMu.Unlock()
	return slices.Sorted(maps.Keys(a.backNow))
}

// RecordStop records, for the next start, the backing files of every
// protected volume as the daemon leaves them: call it once the daemon's
// devices are closed (nothing writes them any more). A start after a stop
// without it (a crash) can tell only a change of file or table, not a
// write. Errors are logged.
func (a *Agent) RecordStop() {
	if a.backPath == "" {
		return
	}
	names := a.backNames()
	a.settleBlocks(names)
	a.backMu.Lock()
	defer a.backMu.Unlock()
	for _, name := range names {
		a.stopBackingLocked(name)
	}
	if err := a.saveBackingLocked(); err != nil {
		a.log.Warn("saving the backing record", "path", a.backPath, "err", err)
		return
	}
	a.backDone = true
}

// backingTold records that the hub acknowledged the DIRTY_MAP answering
// the report that said name's data changed: the hub resynchronises it
// from now on whatever happens to the agent. The record is saved in the
// background (a.mu is held by the caller).
func (a *Agent) backingTold(name string) {
	if a.backPath == "" {
		return
	}
	go a.clearChanged(name)
}

// clearChanged drops name's changed mark from the record and saves it.
func (a *Agent) clearChanged(name string) {
	a.backMu.Lock()
	defer a.backMu.Unlock()
	if bv := a.backNow[name]; bv != nil && bv.Changed != "" {
		nv := *bv
		nv.Changed = ""
		a.backNow[name] = &nv
		if err := a.saveBackingLocked(); err != nil {
			a.log.Warn("saving the backing record", "path", a.backPath, "err", err)
		}
	}
}

// saveBackingLocked writes the record durably; backMu held. After
// RecordStop nothing more is written.
func (a *Agent) saveBackingLocked() error {
	if a.backDone {
		return nil
	}
	b, err := json.MarshalIndent(backingRecord{Version: backingVersion, Volumes: a.backNow}, "", "\t")
	if err != nil {
		return err
	}
	return writeFileSync(a.backPath, append(b, '\n'))
}

// changedResync is the resync the agent asks for a volume whose backing
// changed (v.changed): the hub compares every region by checksum, or,
// a hub below protocol level 3 that cannot be told, reads the whole
// volume. a.mu held, from startProtect.
func (c *agentConn) changedResync(v *agentVolume) {
	a := c.a
	if v.changed == "" {
		return
	}
	size := v.dev.Size() * wire.SectorSize
	if a.hubLevel < 3 {
		v.log.Warn("the volume's backing changed and the hub speaks protocol level 2 or less: resyncing it by reading it in full",
			"why", v.changed, "hub_level", a.hubLevel, "bytes", size)
		v.dirty.AddRange(0, wire.RegionCount(v.dev.Size(), a.cfg.RegionSectors))
		v.noteDirty(time.Now(), "backing changed: "+v.changed)
	} else {
		v.log.Warn("the volume's backing changed: the hub compares every region by checksum and copies those that differ",
			"why", v.changed, "bytes", size)
		v.noteChecksumResync()
	}
	v.changedMap = true
}

// noteChecksumResync records that the hub compares the whole of v, whose
// backing changed, by checksum; a.mu held.
func (v *agentVolume) noteChecksumResync() {
	v.resync = ResyncInfo{Reason: "checksum resync: backing changed: " + v.changed, Bytes: v.dev.Size() * wire.SectorSize}
	v.stats.ResyncRequests++
	v.stats.ResyncBytes += v.resync.Bytes
}
