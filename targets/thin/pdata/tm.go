package pdata

// TM is the transaction manager: it hands out metadata blocks from the
// metadata space map, shadows (copies on write) blocks of the last
// committed state before they change, and commits.
type TM struct {
	BM *BM
	SM *SpaceMap // the metadata space map

	shadows map[uint64]struct{} // blocks allocated in this transaction
}

// NewTM returns a transaction manager over bm and the metadata space map.
func NewTM(bm *BM, sm *SpaceMap) *TM {
	return &TM{BM: bm, SM: sm, shadows: map[uint64]struct{}{}}
}

// IsShadow reports whether b was allocated in the running transaction.
func (tm *TM) IsShadow(b uint64) bool {
	_, ok := tm.shadows[b]
	return ok
}

// NewBlock allocates a metadata block, returning a zeroed buffer for it.
func (tm *TM) NewBlock(kind Kind) (uint64, []byte, error) {
	b, err := tm.SM.Alloc()
	if err != nil {
		return 0, nil, err
	}
	tm.shadows[b] = struct{}{}
	return b, tm.BM.New(b, kind), nil
}

// Shadow returns a writable copy of block b: b itself when this
// transaction made it and nothing else refers to it, else a new block
// with b's content (and b loses a reference). incChildren tells the caller
// that b was shared, so the copy's children gained a referrer.
func (tm *TM) Shadow(b uint64, kind Kind) (nb uint64, buf []byte, incChildren bool, err error) {
	c, err := tm.SM.Count(b)
	if err != nil {
		return 0, nil, false, err
	}
	incChildren = c > 1
	old, err := tm.BM.Read(b, kind)
	if err != nil {
		return 0, nil, false, err
	}
	if tm.IsShadow(b) && !incChildren {
		tm.BM.Dirty(b, kind)
		return b, old, false, nil
	}
	nb, buf, err = tm.NewBlock(kind)
	if err != nil {
		return 0, nil, false, err
	}
	copy(buf, old)
	if err := tm.SM.Dec(b); err != nil {
		return 0, nil, false, err
	}
	return nb, buf, incChildren, nil
}

// Inc adds a reference to metadata block b.
func (tm *TM) Inc(b uint64) error { return tm.SM.Inc(b) }

// Dec drops a reference to metadata block b.
func (tm *TM) Dec(b uint64) error { return tm.SM.Dec(b) }

// Commit is a transaction prepared by [TM.Prepare]: its blocks are
// stamped and held in memory, and the next transaction may already run
// (it shadows them, and reuses no block freed in this one until
// [Commit.Landed]).
type Commit struct {
	tm     *TM
	data   *SpaceMap
	blocks []BlockWrite

	// MetaRoot and DataRoot are the roots the new superblock must hold.
	MetaRoot, DataRoot Root
}

// Prepare writes the space maps' on-disk forms (the data space map's and
// the metadata space map's, which records its own blocks) into their
// blocks and takes every dirty block for writing. It changes only memory;
// the running transaction ends and the next begins. The caller then runs
// [Commit.Write] (which needs no lock), writes and flushes its superblock
// holding the roots, and calls [Commit.Landed].
func (tm *TM) Prepare(data *SpaceMap) (*Commit, error) {
	if data != nil {
		if _, err := data.stage(tm); err != nil {
			return nil, err
		}
		if err := data.writeBitmaps(tm); err != nil {
			return nil, err
		}
	}
	for {
		progress, err := tm.SM.stage(tm)
		if err != nil {
			return nil, err
		}
		if !progress {
			break
		}
	}
	if err := tm.SM.writeBitmaps(tm); err != nil {
		return nil, err
	}
	c := &Commit{tm: tm, data: data, blocks: tm.BM.TakeDirty(), MetaRoot: tm.SM.Root()}
	clear(tm.shadows)
	for _, sm := range []*SpaceMap{tm.SM, data} {
		if sm != nil {
			for b := range sm.freed {
				sm.freedOld[b] = struct{}{}
			}
			clear(sm.freed)
		}
	}
	if data != nil {
		c.DataRoot = data.Root()
	}
	return c, nil
}

// Write writes the transaction's blocks and flushes the metadata device.
// It touches no state of the TM, so the caller runs it without its lock.
func (c *Commit) Write() error {
	if err := c.tm.BM.WriteBlocks(c.blocks); err != nil {
		return err
	}
	return c.tm.BM.Flush()
}

// Landed ends the commit once the superblock is durable: the blocks join
// the clean cache and blocks freed in the transaction become reusable.
func (c *Commit) Landed() {
	c.tm.BM.Landed(c.blocks)
	for _, sm := range []*SpaceMap{c.tm.SM, c.data} {
		if sm != nil {
			clear(sm.freedOld)
		}
	}
}

// Commit prepares, writes and lands the transaction at once (see
// Prepare); the caller writes its superblock afterwards. Blocks freed
// before Commit become reusable.
func (tm *TM) Commit(data *SpaceMap) (metaRoot, dataRoot Root, err error) {
	c, err := tm.Prepare(data)
	if err != nil {
		return Root{}, Root{}, err
	}
	if err := c.Write(); err != nil {
		return Root{}, Root{}, err
	}
	c.Landed()
	return c.MetaRoot, c.DataRoot, nil
}
