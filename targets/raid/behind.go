package raid

import (
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// Write-behind (md's raid1 write-behind, dm-raid's max_write_behind): on
// a raid1 with a write-intent bitmap, writes to write_mostly legs complete
// in the background, after the guest's write was acknowledged by the other
// legs. Each write-mostly leg has a FIFO queue served by one goroutine, so
// that its writes land in the order they were issued (md serialises
// overlapping behind writes the same way); a full queue makes the next
// write wait (the limit of writes behind). The guest's data is copied
// (the guest may reuse its buffer once acknowledged), and the regions'
// bitmap bits stay set until the behind write is done, so that a crash or
// a failure of the other legs loses nothing the bitmap does not mark.
// Reads go to a write-mostly leg only when no other leg can serve them,
// and then after its queue drained to that point; sync actions, discards
// and suspend drain the queues first.

// behindWrite is one write queued for a write-mostly leg.
type behindWrite struct {
	data      []byte
	sector, n uint64
	seq       uint64
}

// behindQueue is the write-behind queue of one write-mostly leg.
type behindQueue struct {
	q      chan behindWrite
	sendMu sync.Mutex // held while queueing: the queue order is the sequence order

	mu   sync.Mutex
	cond *sync.Cond
	enq  uint64 // writes queued so far
	done uint64 // writes completed so far, in order
}

// maxBehind is the number of writes behind a write-mostly leg may be:
// dm-raid passes max_write_behind (sectors) to md halved, as kB, and md
// counts it as writes.
func maxBehind(v int64) int {
	return int(max(1, min(v/2, bitmapCounterMax)))
}

// startBehind sets up the queues when write-behind applies: raid1, a
// bitmap, max_write_behind given and write_mostly legs.
func (r *raid) startBehind() {
	if r.geo != nil || r.bm == nil || r.p.maxWriteBehind <= 0 {
		return
	}
	for i, m := range r.devs {
		if !m.writeMostly || m.dev == nil {
			continue
		}
		if r.behind == nil {
			r.behind = make([]*behindQueue, len(r.devs))
		}
		b := &behindQueue{q: make(chan behindWrite, maxBehind(r.p.maxWriteBehind))}
		b.cond = sync.NewCond(&b.mu)
		r.behind[i] = b
		go r.serveBehind(i, b)
	}
}

// serveBehind writes leg i's queued writes in order until the queue is
// closed.
func (r *raid) serveBehind(i int, b *behindQueue) {
	m := r.devs[i]
	for w := range b.q {
		if !m.faulty.Load() {
			if err := m.dev.WriteAt([][]byte{w.data}, int64(w.sector<<mapper.SectorShift)); err != nil {
				r.fail(i, err)
			}
		}
		r.bm.endWrite(w.sector, w.sector+w.n)
		b.mu.Lock()
		b.done = w.seq
		b.cond.Broadcast()
		b.mu.Unlock()
	}
}

// queueBehind copies bufs and queues them for write-mostly leg i; the
// regions' bitmap bits are held until the write is done.
func (r *raid) queueBehind(i int, sector, n uint64, bufs [][]byte) {
	b := r.behind[i]
	data := make([]byte, 0, n<<mapper.SectorShift)
	for _, p := range bufs {
		data = append(data, p...)
	}
	r.bm.hold(sector, sector+n)
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.mu.Lock()
	b.enq++
	w := behindWrite{data: data, sector: sector, n: n, seq: b.enq}
	b.mu.Unlock()
	b.q <- w // waits while the leg is max_write_behind writes behind
}

// drainBehind waits until every write queued so far for leg i (every
// write-mostly leg when i < 0) is done.
func (r *raid) drainBehind(i int) {
	for j, b := range r.behind {
		if b == nil || (i >= 0 && j != i) {
			continue
		}
		b.mu.Lock()
		target := b.enq
		for b.done < target {
			b.cond.Wait()
		}
		b.mu.Unlock()
	}
}

// stopBehind drains the queues and stops their goroutines; no I/O may
// follow.
func (r *raid) stopBehind() {
	r.drainBehind(-1)
	for _, b := range r.behind {
		if b != nil {
			close(b.q)
		}
	}
}

// behindLeg reports whether leg i writes behind.
func (r *raid) behindLeg(i int) bool { return r.behind != nil && r.behind[i] != nil }

// primaryInService reports whether a leg that does not write behind is in
// service and in sync: only then may writes to the others complete later.
func (r *raid) primaryInService() bool {
	for i, m := range r.devs {
		if !r.behindLeg(i) && !m.faulty.Load() && m.inSync.Load() {
			return true
		}
	}
	return false
}
