package pattern

import (
	"bytes"
	"fmt"
)

// Writer describes the block sequence of the long-running verified writer:
// write number seq (from 0) goes to block Index(seq) of a region of Blocks
// BlockSize blocks starting at byte 0 of the disk, and holds WriterBlock(seq).
// Within each run of Blocks consecutive writes every block is written once,
// so writes issued concurrently never share a block.
type Writer struct {
	Seed   uint64
	Blocks int64
	stride int64
	rot    int64
}

// NewWriter returns the writer sequence for seed on a disk of diskBytes.
func NewWriter(seed uint64, diskBytes int64) Writer {
	nb := diskBytes / BlockSize
	w := Writer{Seed: seed, Blocks: nb}
	if nb <= 0 {
		return w
	}
	// An odd stride coprime with nb makes seq -> index a permutation of each
	// run of nb writes.
	s := int64(seed%uint64(nb)) | 1
	for gcd(s, nb) != 1 {
		s += 2
	}
	w.stride = s % nb
	if w.stride == 0 {
		w.stride = 1
	}
	w.rot = int64((seed >> 17) % uint64(nb))
	return w
}

func gcd(a, b int64) int64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// Index returns the block that write seq goes to.
func (w Writer) Index(seq int64) int64 {
	return ((seq%w.Blocks)*w.stride + w.rot) % w.Blocks
}

// Fill writes the block of write seq into p (len BlockSize).
func (w Writer) Fill(p []byte, seq int64) {
	idx := w.Index(seq)
	copy(p, writerMagic[:])
	le.PutUint64(p[8:], w.Seed)
	le.PutUint64(p[16:], uint64(seq))
	le.PutUint64(p[24:], uint64(idx))
	fillStream(p[32:BlockSize], w.Seed^0x5752, uint64(seq))
}

// Decode checks that p (one block read from block index idx) is a complete
// writer block of this writer for that index and returns its sequence
// number, or -1 if p is all zeros (never written).
func (w Writer) Decode(p []byte, idx int64) (int64, error) {
	if IsZero(p) {
		return -1, nil
	}
	if !bytes.Equal(p[:8], writerMagic[:]) {
		return 0, fmt.Errorf("block %d: not a writer block: %s", idx, describe(p))
	}
	if s := le.Uint64(p[8:]); s != w.Seed {
		return 0, fmt.Errorf("block %d: written with seed %d, want %d", idx, s, w.Seed)
	}
	seq := int64(le.Uint64(p[16:]))
	if got := int64(le.Uint64(p[24:])); got != idx || seq < 0 || w.Index(seq) != idx {
		return 0, fmt.Errorf("block %d: holds write %d for block %d (misplaced)", idx, seq, got)
	}
	want := make([]byte, BlockSize)
	w.Fill(want, seq)
	if !bytes.Equal(p[:BlockSize], want) {
		for i := range want {
			if p[i] != want[i] {
				return 0, fmt.Errorf("block %d: write %d torn or corrupt from byte %d", idx, seq, i)
			}
		}
	}
	return seq, nil
}

// LastWrites returns, for every block, the sequence number of the last of
// the writes 0..n-1 to it, or -1.
func (w Writer) LastWrites(n int64) []int64 {
	last := make([]int64, w.Blocks)
	for i := range last {
		last[i] = -1
	}
	start := max(0, n-w.Blocks)
	for seq := start; seq < n; seq++ {
		last[w.Index(seq)] = seq
	}
	return last
}

// CheckDurable checks the blocks of a disk image after a fault: read(idx)
// returns block idx. Every write below acked (the writes a completed flush
// covered) must be present or superseded by a later write, and no block may
// hold a write at or beyond issued (never sent). It returns at most
// maxErrs errors.
func (w Writer) CheckDurable(read func(idx int64) ([]byte, error), acked, issued int64, maxErrs int) []error {
	last := w.LastWrites(acked)
	var errs []error
	for idx := int64(0); idx < w.Blocks && len(errs) < maxErrs; idx++ {
		p, err := read(idx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		seq, err := w.Decode(p, idx)
		switch {
		case err != nil:
			errs = append(errs, err)
		case seq < last[idx]:
			errs = append(errs, fmt.Errorf("block %d: holds write %d, but write %d was acknowledged by a flush (lost write)", idx, seq, last[idx]))
		case issued >= 0 && seq >= issued:
			errs = append(errs, fmt.Errorf("block %d: holds write %d, beyond the %d writes issued", idx, seq, issued))
		}
	}
	return errs
}
