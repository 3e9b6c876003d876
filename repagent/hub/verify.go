package hub

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/vhostdm/vhostdm/repagent/wire"
)

// VerifyOptions select what Hub.Verify compares.
type VerifyOptions struct {
	VM     string
	Volume string // "" for every protected volume of the VM
	// Rate bounds the source bytes hashed per second (0: unlimited).
	Rate uint64
	// Wait bounds how long the verify waits for a volume to be in sync
	// (protecting, no resync set open) before it compares; default 1 min.
	Wait time.Duration
}

// ByteRange is a byte range of a volume.
type ByteRange struct {
	Offset uint64 `json:"offset"`
	Length uint64 `json:"length"`
}

// VolumeVerify is the result of an online verify of one volume.
type VolumeVerify struct {
	Volume        string    `json:"volume"`
	Start         time.Time `json:"start"`
	Seconds       float64   `json:"seconds"`
	RegionBytes   uint64    `json:"region-bytes"`
	VerifiedBytes uint64    `json:"verified-bytes"` // compared
	// Mismatches counts the regions whose checksums differ;
	// MismatchRanges lists them as byte ranges (adjacent regions merged).
	Mismatches     uint64      `json:"mismatches"`
	MismatchBytes  uint64      `json:"mismatch-bytes"`
	MismatchRanges []ByteRange `json:"mismatch-ranges"`
	// Skipped counts regions not compared: written without a mirror or
	// resynchronising each time they were asked for.
	Skipped uint64 `json:"skipped"`
}

// VerifyReport is the result of Hub.Verify.
type VerifyReport struct {
	VM      string         `json:"vm"`
	Volumes []VolumeVerify `json:"volumes"`
}

// verifyRetries bounds how often a region is asked for again (dirty at
// the agent, or a resync set opened meanwhile) before it is skipped.
const verifyRetries = 8

// Verify compares the VM's protected volumes (or one) with their sources
// by per-region checksums without moving data (DRBD's online verify):
// the agent hashes its regions, the hub hashes the replica at the same
// point of the write order (see csum.go), and regions that differ are
// reported (byte ranges), logged at WARN and counted in the status. The
// agent must be connected and speak protocol level 2; a volume is
// compared while it is protecting.
func (h *Hub) Verify(ctx context.Context, o VerifyOptions) (VerifyReport, error) {
	if o.Wait <= 0 {
		o.Wait = time.Minute
	}
	rep := VerifyReport{VM: o.VM, Volumes: []VolumeVerify{}}
	h.mu.Lock()
	vm := h.vms[o.VM]
	if vm == nil {
		h.mu.Unlock()
		return rep, fmt.Errorf("vm %q not found", o.VM)
	}
	c := vm.conn
	var names []string
	for n, v := range vm.vols {
		if v.mirror && v.conn == c && (o.Volume == "" || o.Volume == n) {
			names = append(names, n)
		}
	}
	h.mu.Unlock()
	switch {
	case c == nil:
		return rep, fmt.Errorf("vm %q: the agent is not connected: verify compares with the source", o.VM)
	case c.group:
		return rep, fmt.Errorf("vm %q: a consistency group is fed from its source's replication log: verify it there", o.VM)
	case c.peerVersion < 2:
		return rep, fmt.Errorf("vm %q: the agent speaks repagent protocol level %d; verify needs level 2 (upgrade vhostdm)", o.VM, c.peerVersion)
	case len(names) == 0 && o.Volume != "":
		return rep, fmt.Errorf("vm %q: volume %q is not protected on this connection", o.VM, o.Volume)
	}
	slices.Sort(names)
	for _, n := range names {
		vr, err := h.verifyVolume(ctx, c, n, o)
		if err != nil {
			return rep, fmt.Errorf("verify %s/%s: %w", o.VM, n, err)
		}
		rep.Volumes = append(rep.Volumes, vr)
	}
	return rep, nil
}

// verifyVolume runs the online verify of one volume on connection c.
func (h *Hub) verifyVolume(ctx context.Context, c *hubConn, name string, o VerifyOptions) (VolumeVerify, error) {
	h.mu.Lock()
	v := c.vm.vols[name]
	sectors := v.sectors
	h.mu.Unlock()
	rs := uint64(h.cfg.RegionSectors)
	regions := wire.RegionCount(sectors, uint32(rs))
	vr := VolumeVerify{Volume: name, Start: time.Now(), RegionBytes: rs * wire.SectorSize, MismatchRanges: []ByteRange{}}
	todo := roaring.New()
	todo.AddRange(0, regions)
	mismatch := roaring.New()
	tries := map[uint32]int{}
	results := make(chan csumResult, csumWindow)
	chunk := uint64(csumChunkSectors) / rs
	out := 0
	var cursor uint64
	next := time.Now()
	var waitSince time.Time
	defer func() {
		// Outstanding requests end with the connection or answer.
		for ; out > 0; out-- {
			<-results
		}
	}()
	for !todo.IsEmpty() || out > 0 {
		for out < csumWindow && !todo.IsEmpty() {
			h.mu.Lock()
			if v.conn != c && v.conn != nil && v.conn.peerVersion >= 2 {
				// The agent reconnected: go on with the regions left.
				c = v.conn
			}
			gone := v.conn != c || !v.mirror
			ready := !gone && v.state == StateProtecting && !c.vm.resync && len(c.deferred) == 0
			epoch, id := c.vm.resyncEpoch, v.id
			h.mu.Unlock()
			if !ready {
				if waitSince.IsZero() {
					waitSince = time.Now()
				} else if time.Since(waitSince) > o.Wait {
					if gone {
						return vr, fmt.Errorf("the agent connection ended and did not come back within %v", o.Wait)
					}
					return vr, fmt.Errorf("the volume was not in sync for %v", o.Wait)
				}
				break
			}
			waitSince = time.Time{}
			first, count := nextRun(todo, cursor, chunk)
			todo.RemoveRange(first, first+count)
			cursor = first + count
			sector := first * rs
			n := min(count*rs, sectors-sector)
			if o.Rate > 0 {
				if d := time.Until(next); d > 0 {
					select {
					case <-time.After(d):
					case <-ctx.Done():
						return vr, ctx.Err()
					}
				}
				if now := time.Now(); now.After(next) {
					next = now
				}
				next = next.Add(time.Duration(float64(n*wire.SectorSize) / float64(o.Rate) * float64(time.Second)))
			}
			rq := &csumReq{v: v, first: first, count: count, verify: true, epoch: epoch,
				msg:  wire.CsumReq{Volume: id, Sector: sector, Sectors: uint32(n), RegionSectors: uint32(rs), Alg: wire.AlgSHA256},
				done: func(r csumResult) { results <- r }}
			out++
			if err := c.sendCsum(rq); err != nil {
				// done was called: the regions are asked for again.
				break
			}
		}
		if out == 0 {
			select {
			case <-time.After(50 * time.Millisecond):
				continue
			case <-ctx.Done():
				return vr, ctx.Err()
			}
		}
		var r csumResult
		select {
		case r = <-results:
			out--
		case <-ctx.Done():
			return vr, ctx.Err()
		}
		if errors.Is(r.err, errConnEnded) {
			// Asked again once the agent is back.
			todo.AddRange(r.rq.first, r.rq.first+r.rq.count)
			continue
		}
		if r.err != nil {
			return vr, r.err
		}
		mismatch.Or(r.differ)
		vr.VerifiedBytes += (r.matched.GetCardinality() + r.differ.GetCardinality()) * rs * wire.SectorSize
		it := r.again.Iterator()
		for it.HasNext() {
			x := it.Next()
			if tries[x]++; tries[x] < verifyRetries {
				todo.Add(x)
			} else {
				vr.Skipped++
			}
		}
	}
	vr.VerifiedBytes = min(vr.VerifiedBytes, sectors*wire.SectorSize)
	vr.Seconds = time.Since(vr.Start).Seconds()
	vr.Mismatches = mismatch.GetCardinality()
	for _, e := range wire.ExtentsOf(mismatch) {
		off := e.Start * rs * wire.SectorSize
		end := min((e.Start+e.Count)*rs, sectors) * wire.SectorSize
		vr.MismatchRanges = append(vr.MismatchRanges, ByteRange{Offset: off, Length: end - off})
		vr.MismatchBytes += end - off
	}
	log := v.log.With("verified_bytes", vr.VerifiedBytes, "seconds", vr.Seconds, "skipped_regions", vr.Skipped)
	if vr.Mismatches > 0 {
		var b strings.Builder
		for i, r := range vr.MismatchRanges {
			if i == 8 {
				fmt.Fprintf(&b, " ... (%d more)", len(vr.MismatchRanges)-i)
				break
			}
			fmt.Fprintf(&b, " %d+%d", r.Offset, r.Length)
		}
		log.Warn("online verify: replica differs from the source", "mismatching_regions", vr.Mismatches,
			"mismatch_bytes", vr.MismatchBytes, "ranges", strings.TrimSpace(b.String()))
	} else {
		log.Info("online verify: replica matches the source")
	}
	h.mu.Lock()
	v.lastVerify = &vr
	v.verifyRuns++
	v.verifyMismatches += vr.Mismatches
	h.mu.Unlock()
	return vr, nil
}
