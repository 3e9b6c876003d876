package agent

import (
	"errors"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// Checksums for the hub's online verify and checksum resync (CSUM_REQ,
// protocol level 2).
//
// The answer must name the point of the write order its checksums
// belong to, or a write racing with the read would look like a mismatch
// (or, worse, hide one). A protected write holds its volume's range lock
// from before its local write until its mirror sequence number is
// assigned (submitOne), so reading a run of regions under the same lock
// and noting the next sequence number before releasing it gives regions
// that hold every mirrored write numbered below that point and none at
// or above it. The answer is queued behind every frame numbered below
// the point (the send queue is in sequence order), so the hub has those
// frames when it compares. Regions in the dirty bitmap at that moment
// changed without a mirrored write: they are flagged, their checksum
// says nothing about what the hub holds.

// csumReq checks a CSUM_REQ and serves it in the background. A request
// for an unknown volume or a range outside it breaks the protocol and
// ends the connection; one for an unprotected volume is answered
// "denied", one for a volume detached since the hub gave its id failed.
func (c *agentConn) csumReq(m *wire.CsumReq) error {
	res := &wire.CsumRes{ID: m.ID, Volume: m.Volume, Alg: m.Alg, Sums: [][wire.CsumSize]byte{}, Dirty: []bool{}}
	v, err := c.requestVolume(m.Cmd(), m.Volume, m.Sector, uint64(m.Sectors))
	if errors.Is(err, errVolumeGone) {
		c.log.Info("checksums for a detached volume failed", "id", m.Volume, "sector", m.Sector, "sectors", m.Sectors)
		res.Status = wire.StatusIOError
		return c.send(res)
	}
	if err != nil {
		return err
	}
	if !v.opts.Protect {
		v.log.Warn("checksums refused: the volume is not protected", "sector", m.Sector, "sectors", m.Sectors)
		res.Status = wire.StatusDenied
		return c.send(res)
	}
	c.sem <- struct{}{}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() { <-c.sem }()
		c.serveCsum(v, m, res)
	}()
	return nil
}

// serveCsum reads, hashes and queues the answer of one CSUM_REQ.
func (c *agentConn) serveCsum(v *agentVolume, m *wire.CsumReq, res *wire.CsumRes) {
	a := c.a
	data := make([]byte, int(m.Sectors)*wire.SectorSize)
	n := m.Regions()
	rs := uint64(m.RegionSectors)
	dirty := make([]bool, n)
	v.rl.lock(m.Sector, uint64(m.Sectors))
	err := v.dev.Submit(&mapper.Request{Op: mapper.OpRead, Sector: m.Sector, Sectors: uint64(m.Sectors), Data: [][]byte{data}})
	a.mu.Lock()
	point := a.nextSeq
	ars := uint64(a.cfg.RegionSectors)
	for i := range n {
		s := m.Sector + uint64(i)*rs
		e := min(s+rs, m.Sector+uint64(m.Sectors))
		dirty[i] = v.dirty.IntersectsWithInterval(s/ars, (e-1)/ars+1)
	}
	a.mu.Unlock()
	v.rl.unlock(m.Sector, uint64(m.Sectors))
	if err != nil {
		v.log.Warn("checksum read failed", "sector", m.Sector, "sectors", m.Sectors, "err", err)
		res.Status = wire.StatusIOError
		if err := c.send(res); err != nil {
			c.shut()
		}
		return
	}
	res.Point = point
	res.Sums = make([][wire.CsumSize]byte, n)
	res.Dirty = dirty
	for i := range n {
		off := i * int(rs) * wire.SectorSize
		end := min(off+int(rs)*wire.SectorSize, len(data))
		res.Sums[i] = wire.Checksum(data[off:end])
	}
	a.mu.Lock()
	v.stats.CsumRegions += uint64(n)
	v.stats.CsumBytes += uint64(len(data))
	if a.conn == c {
		// Behind every frame numbered below the point.
		a.enqueue(&qitem{msg: res, t: time.Now()}, true)
		a.broadcast()
	}
	a.mu.Unlock()
}
