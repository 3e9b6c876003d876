package hub

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// Checksums of regions (CSUM_REQ / CSUM_RES, protocol level 2): online
// verify and checksum resync, after DRBD's online verify and csums-alg.
//
// The agent hashes a run of regions under its range lock and answers
// with the point of its write order the checksums belong to: every
// mirrored write numbered below the point is in them, none at or above
// (see repagent/agent/csum.go). The answer comes after every frame
// numbered below the point, so when the engine handles it the journal
// holds all of them; the hub hashes its replica at the same point with
// journal.ReadVolume (the base image and the journaled records up to the
// first numbered at or above the point), so a write racing with the
// verify is on both sides or on neither.
//
// Online verify compares only while the VM's journal is current (no
// resync set open, none opened while the request was out): resync data
// is the source's content at an unnumbered instant. Regions the agent
// flags as dirty (changed, not mirrored yet) are compared again later.
// The verify holds the applier at the journal's end when it asks, so the
// base images never pass the point.
//
// A checksum resync runs inside the VM's resync set: the regions it is
// asked to compare are read with REMOTE_IO_REQ only when the checksums
// differ (or the agent flags them dirty, or it cannot hash them). A
// checksum result only ever adds regions to read, never removes one: a
// region also marked for a plain read is read anyway.

// csumChunkSectors is the length of one CSUM_REQ: the most one request
// may ask for (MaxIOSectors, 8 MiB), so that the hub reads the journal
// once per 8 MiB.
const csumChunkSectors = wire.MaxIOSectors

// csumWindow bounds a volume's outstanding checksum requests.
const csumWindow = 4

// csumConn is a connection's outstanding checksum requests.
type csumConn struct {
	mu   sync.Mutex
	next uint64
	reqs map[uint64]*csumReq
}

// csumReq is one outstanding CSUM_REQ.
type csumReq struct {
	v            *hubVolume
	msg          wire.CsumReq
	first, count uint64 // regions, in the hub's region size
	verify       bool
	epoch        uint64 // the VM's resync epoch when sent (verify)
	volEpoch     uint64 // v.epoch when sent: its store failed since if not current
	// sure is the journal's end when the request was sent: every record
	// before it is before the agent's point. The applier is held there
	// until release.
	sure    int64
	release func()
	done    func(csumResult)
}

// csumResult is what one CSUM_RES says, compared with the replica.
type csumResult struct {
	rq       *csumReq
	matched  *roaring.Bitmap // regions equal on both sides
	differ   *roaring.Bitmap // regions whose checksums differ
	again    *roaring.Bitmap // regions that could not be compared now (verify: ask again)
	err      error           // the request failed (status, connection, store)
	hashedAt uint64          // the point
}

// csumVolume is a volume's checksum resync state; guarded by Hub.mu.
type csumVolume struct {
	need    *roaring.Bitmap // regions to compare
	in      *roaring.Bitmap // regions of outstanding requests
	out     int             // outstanding requests
	matched uint64          // regions found equal since the hub started
	differ  uint64          // regions found different (read since) since the hub started
}

func (cv *csumVolume) init() {
	if cv.need == nil {
		cv.need, cv.in = roaring.New(), roaring.New()
	}
}

// busy reports whether a checksum resync of the volume is not finished.
func (cv *csumVolume) busy() bool {
	return cv.need != nil && (!cv.need.IsEmpty() || !cv.in.IsEmpty())
}

// add registers a request and returns its id.
func (cc *csumConn) add(rq *csumReq) uint64 {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.reqs == nil {
		cc.reqs = map[uint64]*csumReq{}
	}
	cc.next++
	cc.reqs[cc.next] = rq
	rq.msg.ID = cc.next
	return cc.next
}

// take removes and returns the request of id, or nil.
func (cc *csumConn) take(id uint64) *csumReq {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	rq := cc.reqs[id]
	delete(cc.reqs, id)
	return rq
}

// failAll ends every outstanding request with err (the connection ended).
func (cc *csumConn) failAll(err error) {
	cc.mu.Lock()
	reqs := cc.reqs
	cc.reqs = nil
	cc.mu.Unlock()
	for _, rq := range reqs {
		if rq.release != nil {
			rq.release()
		}
		rq.done(csumResult{rq: rq, err: err})
	}
}

// sendCsum registers rq and sends its CSUM_REQ; the applier is held at
// the journal's end until the answer is compared.
func (c *hubConn) sendCsum(rq *csumReq) error {
	c.h.mu.Lock()
	j := c.vm.j
	c.h.mu.Unlock()
	rq.sure = j.End()
	rq.release = j.HoldApply(rq.sure)
	c.csum.add(rq)
	if err := c.send(&rq.msg); err != nil {
		if c.csum.take(rq.msg.ID) != nil {
			if rq.release != nil {
				rq.release()
			}
			rq.done(csumResult{rq: rq, err: fmt.Errorf("%w: %w", errConnEnded, err)})
		}
		return err
	}
	return nil
}

// csumRes handles a CSUM_RES on the engine: it checks it against its
// request, notes the journal position that holds every frame before it,
// and compares in the background.
func (c *hubConn) csumRes(m *wire.CsumRes) error {
	rq := c.csum.take(m.ID)
	if rq == nil {
		return c.bad("%s: unknown request id %d", m.Cmd(), m.ID)
	}
	fail := func(err error) error {
		if rq.release != nil {
			rq.release()
		}
		rq.done(csumResult{rq: rq, err: err})
		return err
	}
	if m.Volume != rq.msg.Volume || m.Alg != rq.msg.Alg {
		return fail(c.bad("%s: request %d was for volume id %d, answer is for %d", m.Cmd(), m.ID, rq.msg.Volume, m.Volume))
	}
	if m.Status == wire.StatusOK && len(m.Sums) != rq.msg.Regions() {
		return fail(c.bad("%s: %d checksums for a request of %d regions", m.Cmd(), len(m.Sums), rq.msg.Regions()))
	}
	if m.Status == wire.StatusOK && m.Point > c.lastSeq+1 {
		return fail(c.bad("%s: point %d, but only frames up to %d arrived before it", m.Cmd(), m.Point, c.lastSeq))
	}
	if m.Status != wire.StatusOK {
		fail(fmt.Errorf("the agent answered status %d", m.Status))
		return nil
	}
	h := c.h
	h.mu.Lock()
	if !rq.verify && rq.volEpoch != rq.v.epoch {
		// Asked before the volume's store failed: protection restarts
		// from the durable state and the agent's dirty regions.
		h.mu.Unlock()
		fail(errConnEnded)
		return nil
	}
	// A frame before this one may have asked for a resync that pump has
	// not opened yet: the volume is then no longer protecting.
	stale := rq.verify && (c.vm.resync || c.vm.resyncEpoch != rq.epoch || len(c.deferred) > 0 ||
		rq.v.state != StateProtecting || rq.v.need.IntersectsWithInterval(rq.first, rq.first+rq.count))
	j := c.vm.j
	h.mu.Unlock()
	at := j.End()
	p := c.lastPending
	// The journal numbers this connection's writes c.seqBase above the
	// agent's own numbers (an agent that restarted counts from 1 again):
	// the agent's point is compared in the journal's numbering.
	go c.compare(rq, m, c.seqBase+m.Point, j, at, p, stale)
	return nil
}

// compare hashes the replica at the answer's point and reports the
// result to the request's owner.
func (c *hubConn) compare(rq *csumReq, m *wire.CsumRes, before uint64, j *journal.Journal, at int64, p *journal.Pending, stale bool) {
	res := csumResult{rq: rq, matched: roaring.New(), differ: roaring.New(), again: roaring.New(), hashedAt: m.Point}
	defer func() {
		if rq.release != nil {
			rq.release()
		}
		rq.done(res)
	}()
	if stale {
		res.again.AddRange(rq.first, rq.first+rq.count)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-c.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	if p != nil {
		if _, err := p.Wait(ctx); err != nil {
			res.err = fmt.Errorf("journal: %w", err)
			if ctx.Err() != nil {
				res.err = errConnEnded // asked again once the agent is back
			}
			return
		}
	}
	buf := make([]byte, int(rq.msg.Sectors)*wire.SectorSize)
	err := j.ReadVolume(ctx, rq.v.name, []journal.Range{{Off: int64(rq.msg.Sector) * wire.SectorSize, Buf: buf}}, rq.sure, before, at)
	if errors.Is(err, journal.ErrBeforeWindow) {
		res.again.AddRange(rq.first, rq.first+rq.count)
		return
	}
	if err != nil {
		res.err = err
		if ctx.Err() != nil {
			res.err = errConnEnded // asked again once the agent is back
		}
		return
	}
	rb := int(rq.msg.RegionSectors) * wire.SectorSize
	for i := range m.Sums {
		r := rq.first + uint64(i)
		switch {
		case m.Dirty[i] && rq.verify:
			res.again.Add(uint32(r))
		case m.Dirty[i]:
			res.differ.Add(uint32(r))
		case wire.Checksum(buf[i*rb:min((i+1)*rb, len(buf))]) == m.Sums[i]:
			res.matched.Add(uint32(r))
		default:
			res.differ.Add(uint32(r))
		}
	}
}

// csumPlan decides whether a resync that protect planned is done by
// checksums: a seeded replica always (when the agent can), a full resync
// of a replica that holds data when Config.CsumResync is set or the agent
// reported the volume changed (most of a restored backup is what the
// replica holds). It returns whether the resync is still a full read, and
// why. h.mu held.
func (c *hubConn) csumPlan(v *hubVolume, full, fresh, changed bool, reason string, sectors, regions uint64) (bool, string) {
	v.csum.init()
	v.csum.need.Clear()
	v.csum.in.Clear()
	seeded := v.st.Seeded && !fresh && v.st.Sectors == sectors && v.st.RegionSectors == c.h.cfg.RegionSectors
	want := seeded || full && !fresh && (c.h.cfg.CsumResync || changed) && v.st.Synced
	if !want || c.group {
		return full, reason
	}
	if c.peerVersion < 2 {
		v.log.Warn("checksum resync needs protocol level 2; the agent speaks level 1: reading every region", "agent_level", c.peerVersion)
		return true, reason
	}
	if seeded {
		wire.AddExtents(v.csum.need, v.st.CsumNeed, v.st.RegionSectors, c.h.cfg.RegionSectors, regions)
		return false, "checksum resync of a seeded replica: only regions whose checksums differ are read"
	}
	csumAll(v, regions)
	return false, reason + " (by checksums: only regions whose checksums differ are read)"
}

// csumAll plans the comparison of every one of v's regions by checksum.
// The replica holds data to compare with until the resync completes; the
// state is saved with every region still to compare, so that a hub that
// restarts before its first checkpoint compares them all. h.mu held.
func csumAll(v *hubVolume, regions uint64) {
	v.csum.init()
	v.csum.need.AddRange(0, regions)
	v.st.Seeded = true
	v.st.CsumNeed = []wire.Extent{{Start: 0, Count: regions}}
}

// csumPump issues checksum requests of v's checksum resync; h.mu held,
// the resync set open. It returns the requests to send.
func (c *hubConn) csumPump(v *hubVolume) []*csumReq {
	cv := &v.csum
	if !cv.busy() || cv.need.IsEmpty() {
		return nil
	}
	// A region also to be read is read anyway.
	cv.need.AndNot(v.need)
	cv.need.AndNot(v.inRead)
	cand := roaring.AndNot(cv.need, v.held)
	var out []*csumReq
	rs := uint64(c.h.cfg.RegionSectors)
	chunk := uint64(csumChunkSectors) / rs
	for cv.out < csumWindow && !cand.IsEmpty() {
		first, count := nextRun(cand, 0, chunk)
		cand.RemoveRange(first, first+count)
		cv.need.RemoveRange(first, first+count)
		cv.in.AddRange(first, first+count)
		cv.out++
		sector := first * rs
		sectors := min(count*rs, v.sectors-sector)
		out = append(out, &csumReq{v: v, first: first, count: count, done: c.csumResynced, volEpoch: v.epoch,
			msg: wire.CsumReq{Volume: v.id, Sector: sector, Sectors: uint32(sectors), RegionSectors: uint32(rs), Alg: wire.AlgSHA256}})
	}
	return out
}

// csumResynced takes a checksum resync result: regions that differ are
// read like any resync region.
func (c *hubConn) csumResynced(r csumResult) {
	h := c.h
	rq := r.rq
	v := rq.v
	h.mu.Lock()
	cv := &v.csum
	cv.out--
	cv.in.RemoveRange(rq.first, rq.first+rq.count)
	if v.conn != c {
		cv.need.AddRange(rq.first, rq.first+rq.count)
		h.mu.Unlock()
		return
	}
	read := roaring.New()
	if errors.Is(r.err, errConnEnded) {
		cv.need.AddRange(rq.first, rq.first+rq.count)
		h.mu.Unlock()
		return
	}
	if r.err != nil {
		v.log.Warn("checksum request failed: reading its regions", "sector", rq.msg.Sector, "sectors", rq.msg.Sectors, "err", r.err)
		read.AddRange(rq.first, rq.first+rq.count)
	} else {
		read.Or(r.differ)
		read.Or(r.again)
		cv.matched += r.matched.GetCardinality()
		v.syncDone += r.matched.GetCardinality()
	}
	cv.differ += read.GetCardinality()
	if !read.IsEmpty() {
		inFlight := roaring.And(read, v.inRead)
		v.stale.Or(inFlight)
		read.AndNot(v.inRead)
		v.need.Or(read)
	}
	if !cv.busy() && v.st.Seeded {
		v.st.Seeded = false
		v.st.CsumNeed = nil
		v.log.Info("checksum resync compared every region", "matched_regions", cv.matched, "differing_regions", cv.differ)
	}
	v.changed = true
	h.mu.Unlock()
	c.poke()
}

// csumDetach puts the regions of outstanding checksum requests back to
// compare and fails the requests (the connection ended).
func (c *hubConn) csumDetach() {
	c.csum.failAll(errConnEnded)
}

// errConnEnded fails the checksum requests of a connection that ended.
var errConnEnded = errors.New("agent connection ended")
