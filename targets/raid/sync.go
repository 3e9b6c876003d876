package raid

import (
	"bytes"
	"math"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// The sync actions run in one background goroutine, a unit (raid4/5/6: a
// stripe; raid1: raid1Unit sectors) at a time under the unit's lock:
//
//   - resync recomputes parity from data (raid1: copies the first leg to
//     the others) from resyncCP on, or only the regions the write-intent
//     bitmap marks dirty;
//   - recover rebuilds devices not in sync from the others, from
//     recoveryCP on, then marks them in sync;
//   - check counts mismatches in sectors as md does (raid4/5/6: by 4 KiB
//     rows; raid1 and raid10: by sync request, 64 KiB or a raid10 chunk,
//     for each copy that differs) and repair also rewrites the parity
//     (raid1, raid10: the other copies).

// needsRecovery reports whether a device in service is not in sync.
func (r *raid) needsRecovery() bool {
	for _, m := range r.devs {
		if m.dev != nil && !m.faulty.Load() && !m.inSync.Load() {
			return true
		}
	}
	return false
}

// startNeeded starts a pending recovery or resync unless an action runs,
// the array is frozen or suspended.
func (r *raid) startNeeded() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.suspended || r.action != "idle" {
		return
	}
	switch {
	case r.needsRecovery():
		r.startLocked("recover", r.recoveryCP.Load())
	case r.resyncCP < r.syncSectors:
		r.startLocked("resync", r.resyncCP)
	case r.bm != nil && r.bm.needsResync():
		r.startLocked("resync", 0)
	}
}

// startLocked starts action from device sector from; r.mu is held.
func (r *raid) startLocked(action string, from uint64) {
	stop, done := make(chan struct{}), make(chan struct{})
	r.action, r.progress, r.stop, r.done = action, from, stop, done
	bitmapOnly := r.bm != nil && (action == "resync" && r.resyncCP >= r.syncSectors ||
		action == "recover" && r.bm.partialRecovery())
	r.invalidate()
	go r.run(action, from, bitmapOnly, stop, done)
}

// stopWorker stops the running action, if any, and waits for it.
func (r *raid) stopWorker() {
	r.mu.Lock()
	stop, done := r.stop, r.done
	r.stop, r.done = nil, nil
	if stop != nil {
		r.action = "idle"
	}
	r.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

// run runs action from device sector from; with bitmapOnly, only over the
// regions the bitmap marked at load.
func (r *raid) run(action string, from uint64, bitmapOnly bool, stop, done chan struct{}) {
	defer close(done)
	defer r.invalidate()
	unit := r.chunk
	th := r.newThrottle()
	for pos := from; pos < r.syncSectors; pos += unit {
		select {
		case <-stop:
			return
		default:
		}
		if bitmapOnly && !r.bm.resyncWanted(pos, pos+unit) {
			r.mu.Lock()
			r.progress = pos + unit
			if action == "recover" {
				r.recoveryCP.Store(pos + unit)
			}
			r.mu.Unlock()
			continue
		}
		var mism uint64
		var err error
		switch {
		case r.r10 != nil:
			mism, err = r.syncR10Unit(action, pos/unit)
		case r.geo == nil:
			mism, err = r.syncMirrorUnit(action, pos/unit)
		default:
			mism, err = r.syncStripe(action, pos/unit)
		}
		if err != nil {
			r.log.Warn("raid sync step failed", "action", action, "sector", pos, "err", err)
		}
		if r.survives() != nil {
			r.mu.Lock()
			if r.stop == stop {
				r.stop, r.done, r.action = nil, nil, "idle"
			}
			r.mu.Unlock()
			return
		}
		r.mu.Lock()
		r.progress = pos + unit
		switch {
		case action == "resync" && !bitmapOnly:
			r.setResyncCP(pos + unit)
		case action == "recover":
			r.recoveryCP.Store(pos + unit)
		case action == "check" || action == "repair":
			r.mismatches += mism
		}
		r.mu.Unlock()
		if !th.wait(unit, stop) {
			return
		}
	}
	switch action {
	case "recover":
		for _, m := range r.devs {
			if m.dev != nil && !m.faulty.Load() {
				m.inSync.Store(true)
			}
		}
		r.recoveryCP.Store(0)
		if r.bm != nil {
			r.bm.recoveryDone()
		}
	case "resync":
		r.mu.Lock()
		r.setResyncCP(math.MaxUint64)
		r.mu.Unlock()
		if bitmapOnly {
			r.bm.resyncDone()
		}
	}
	if r.bm != nil && (action == "resync" || action == "recover") {
		if err := r.bm.writeSuper(r); err != nil {
			r.log.Warn("raid metadata write failed", "err", err)
		}
	}
	r.mu.Lock()
	mine := r.stop == stop
	if mine {
		r.stop, r.done, r.action = nil, nil, "idle"
	}
	r.mu.Unlock()
	if action == "resync" || action == "recover" {
		r.event("in-sync", nil)
	}
	if mine {
		go r.startNeeded()
	}
}

// syncStripe runs one step of action on stripe s and returns the
// mismatched sectors found.
func (r *raid) syncStripe(action string, s uint64) (uint64, error) {
	g := r.geo
	m := g.stripe(s)
	l := r.lock(s)
	l.Lock()
	defer l.Unlock()
	r.invalidateStripe(s)
	end := (s + 1) * r.chunk
	size := int(r.chunk << mapper.SectorShift)
	need := make([]bool, g.n)
	switch action {
	case "resync":
		for _, dev := range m.data {
			need[dev] = true
		}
		rows, err := r.loadRows(s, m, 0, r.chunk, need)
		if err != nil {
			return 0, err
		}
		rows[m.pd] = make([]byte, size)
		if m.qd >= 0 {
			rows[m.qd] = make([]byte, size)
		}
		g.parity(m, rows)
		r.writeRows(s, rows, []int{m.pd, m.qd})
		return 0, nil
	case "recover":
		var targets []int
		for i, d := range r.devs {
			if d.dev != nil && !d.faulty.Load() && !r.readable(i, end) {
				need[i] = true
				targets = append(targets, i)
			}
		}
		if len(targets) == 0 {
			return 0, nil
		}
		rows, err := r.loadRows(s, m, 0, r.chunk, need)
		if err != nil {
			return 0, err
		}
		r.writeRows(s, rows, targets)
		return 0, nil
	}
	// check and repair
	for i := range need {
		if !r.readable(i, end) {
			return 0, nil // degraded stripe: nothing to compare
		}
		need[i] = true
	}
	rows, err := r.loadRows(s, m, 0, r.chunk, need)
	if err != nil {
		return 0, err
	}
	want := make([][]byte, g.n)
	copy(want, rows)
	want[m.pd] = make([]byte, size)
	if m.qd >= 0 {
		want[m.qd] = make([]byte, size)
	}
	g.parity(m, want)
	var mism uint64
	const row = mismatchUnit << mapper.SectorShift
	for off := 0; off < size; off += row {
		bad := !bytes.Equal(want[m.pd][off:off+row], rows[m.pd][off:off+row])
		if m.qd >= 0 && !bytes.Equal(want[m.qd][off:off+row], rows[m.qd][off:off+row]) {
			bad = true
		}
		if bad {
			mism += mismatchUnit
		}
	}
	if action == "repair" && mism > 0 {
		r.writeRows(s, want, []int{m.pd, m.qd})
	}
	return mism, nil
}

// writeRows writes whole-chunk rows of stripe s to the devices in which
// (entries below 0 are skipped); failing devices leave service.
func (r *raid) writeRows(s uint64, rows [][]byte, which []int) {
	for _, i := range which {
		if i < 0 || r.devs[i].faulty.Load() {
			continue
		}
		if err := r.devs[i].dev.WriteAt([][]byte{rows[i]}, r.devOffset(s, 0)); err != nil {
			r.fail(i, err)
		}
	}
}

// syncMirrorUnit runs one step of action on raid1 unit u.
func (r *raid) syncMirrorUnit(action string, u uint64) (uint64, error) {
	l := r.lock(u)
	l.Lock()
	defer l.Unlock()
	r.drainBehind(-1)
	start := u * raid1Unit
	n := min(raid1Unit, r.devSectors-start)
	end := start + raid1Unit
	off := int64(start << mapper.SectorShift)
	size := int(n << mapper.SectorShift)
	src := -1 // the first leg in sync, write-mostly legs last (as md)
	for i, m := range r.devs {
		if m.inSync.Load() && r.readable(i, end) && (src < 0 || r.devs[src].writeMostly && !m.writeMostly) {
			src = i
		}
	}
	if src < 0 {
		return 0, mapper.Errorf(mapper.ErrIO, "unit %d: no leg in sync", u)
	}
	data := make([]byte, size)
	if err := r.devs[src].dev.ReadAt([][]byte{data}, off); err != nil {
		r.fail(src, err)
		return 0, err
	}
	var mism uint64
	for i, m := range r.devs {
		if i == src || m.faulty.Load() {
			continue
		}
		write := false
		switch action {
		case "resync":
			write = true
		case "recover":
			write = !r.readable(i, end)
		case "check", "repair":
			if !r.readable(i, end) {
				continue
			}
			other := make([]byte, size)
			if err := m.dev.ReadAt([][]byte{other}, off); err != nil {
				r.fail(i, err)
				continue
			}
			// md's raid1 counts its whole sync request (64 KiB, a unit
			// here) for each leg that differs.
			if k := countMismatches(data, other, raid1Unit); k > 0 {
				mism += k
				write = action == "repair"
			}
		}
		if write {
			if err := m.dev.WriteAt([][]byte{data}, off); err != nil {
				r.fail(i, err)
			}
		}
	}
	return mism, nil
}

// throttle paces a sync action between min_recovery_rate and
// max_recovery_rate, as md paces its sync thread between sync_speed_min
// and sync_speed_max: above the maximum it sleeps; above the minimum it
// gives way to guest I/O, waiting while requests keep arriving; at or
// below the minimum it runs whatever the guest does. Speeds are per
// device, in kB/s, measured over a window restarted every syncWindow.
type throttle struct {
	r        *raid
	min, max float64 // kB/s; <0 when not given
	start    time.Time
	done     uint64 // sectors since start
}

// syncWindow is how long a throttle measures speed before restarting.
const syncWindow = 3 * time.Second

// guestPause is how long the guest must have sent no request for a sync
// action above its minimum speed to go on (a busy guest's requests come
// far closer; a descheduled one can pause for milliseconds).
const guestPause = 100 * time.Millisecond

func (r *raid) newThrottle() *throttle {
	return &throttle{r: r, min: float64(r.p.minRate), max: float64(r.p.maxRate), start: time.Now()}
}

// wait accounts for n sectors done and sleeps as the rates ask; it returns
// false when stop closed meanwhile.
func (th *throttle) wait(n uint64, stop chan struct{}) bool {
	th.done += n
	for {
		el := time.Since(th.start)
		if el > syncWindow {
			th.start, th.done = time.Now(), 0
			return true
		}
		kb := float64(th.done*mapper.SectorSize) / 1024
		speed := kb / max(el.Seconds(), 1e-6)
		var d time.Duration
		switch {
		case th.max > 0 && speed > th.max:
			d = time.Duration((kb/th.max - el.Seconds()) * float64(time.Second))
		case th.min >= 0 && speed > th.min:
			idle := time.Duration(time.Now().UnixNano() - th.r.guestAt.Load())
			if idle >= guestPause {
				return true // the guest paused
			}
			d = min(guestPause-idle, 10*time.Millisecond)
		default:
			return true
		}
		select {
		case <-stop:
			return false
		case <-time.After(max(d, time.Millisecond)):
		}
	}
}
