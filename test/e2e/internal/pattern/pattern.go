// Package pattern defines the self-identifying data that the e2e guest
// writes and the host checks: the "verify" pattern, a function of (seed,
// byte offset) per 512-byte sector, and the "writer" blocks of the
// long-running verified writer, each carrying its sequence number.
//
// The guest (test/e2e/guestinit) and the host (test/e2e/harness) import this
// one package, so both compute the same extents and bytes from the seed.
// Every offset and length here is in bytes.
package pattern

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
)

// SectorSize is the unit of the verify pattern.
const SectorSize = 512

// BlockSize is the unit of extents in a plan and of writer blocks; it is
// also the alignment O_DIRECT needs on the guest's disks.
const BlockSize = 4096

var (
	sectorMagic = [8]byte{'V', 'H', 'D', 'M', 'P', 'A', 'T', 1}
	writerMagic = [8]byte{'V', 'H', 'D', 'M', 'W', 'R', 'T', 1}
)

var le = binary.LittleEndian

// Extent is a byte range of a disk.
type Extent struct {
	Off, Len int64
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Off + e.Len }

// Plan returns the extents the verify workload writes on a disk of
// diskBytes for seed, in the order it writes them. The extents do not
// overlap, are BlockSize-aligned, include the first and the last block of
// the disk, and together cover about coveragePct percent of it; each is at
// most maxBlocks blocks long.
func Plan(seed uint64, diskBytes int64, coveragePct, maxBlocks int) []Extent {
	nb := diskBytes / BlockSize
	if nb <= 0 {
		return nil
	}
	if maxBlocks < 1 {
		maxBlocks = 1
	}
	if coveragePct < 1 {
		coveragePct = 1
	}
	if coveragePct > 100 {
		coveragePct = 100
	}
	r := rand.New(rand.NewPCG(seed, 0x76686f737464))
	used := make([]bool, nb)
	var out []Extent
	take := func(start, n int64) bool {
		if start < 0 || n <= 0 || start+n > nb {
			return false
		}
		for b := start; b < start+n; b++ {
			if used[b] {
				return false
			}
		}
		for b := start; b < start+n; b++ {
			used[b] = true
		}
		out = append(out, Extent{Off: start * BlockSize, Len: n * BlockSize})
		return true
	}
	take(0, 1)
	take(nb-1, 1)
	want := nb * int64(coveragePct) / 100
	covered := int64(len(out))
	for tries := 0; covered < want && tries < int(nb)*4; tries++ {
		n := 1 + r.Int64N(int64(maxBlocks))
		if n > nb {
			n = nb
		}
		start := r.Int64N(nb - n + 1)
		if take(start, n) {
			covered += n
		}
	}
	// Random placement stalls on small gaps near full coverage: fill the
	// remaining gaps in address order.
	for b := int64(0); b < nb && covered < want; {
		if used[b] {
			b++
			continue
		}
		n := int64(1)
		for n < int64(maxBlocks) && b+n < nb && !used[b+n] && covered+n < want {
			n++
		}
		take(b, n)
		covered += n
		b += n
	}
	// Write in a shuffled order, not by address.
	r.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

// splitmix64 is the PRNG step used to fill pattern bytes.
func splitmix64(x *uint64) uint64 {
	*x += 0x9e3779b97f4a7c15
	z := *x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// fillStream fills p from a stream seeded by a and b.
func fillStream(p []byte, a, b uint64) {
	s := a ^ (b * 0x2545f4914f6cdd1d)
	for len(p) >= 8 {
		le.PutUint64(p, splitmix64(&s))
		p = p[8:]
	}
	if len(p) > 0 {
		var t [8]byte
		le.PutUint64(t[:], splitmix64(&s))
		copy(p, t[:])
	}
}

// Fill writes the verify pattern for seed into p, which is the disk's data
// at byte offset off. off and len(p) must be multiples of SectorSize.
// Each sector starts with a magic, the seed and its own offset, so a
// misplaced sector names where it belonged.
func Fill(p []byte, seed uint64, off int64) {
	for i := 0; i+SectorSize <= len(p); i += SectorSize {
		s := p[i : i+SectorSize]
		o := uint64(off) + uint64(i)
		copy(s, sectorMagic[:])
		le.PutUint64(s[8:], seed)
		le.PutUint64(s[16:], o)
		fillStream(s[24:], seed, o)
	}
}

// Check compares p, read from byte offset off, with the verify pattern for
// seed. It returns nil or an error naming the first bad sector and, when
// that sector carries a pattern header, where it came from.
func Check(p []byte, seed uint64, off int64) error {
	want := make([]byte, SectorSize)
	for i := 0; i+SectorSize <= len(p); i += SectorSize {
		o := off + int64(i)
		Fill(want, seed, o)
		got := p[i : i+SectorSize]
		if bytes.Equal(got, want) {
			continue
		}
		return fmt.Errorf("sector at byte %d: %s", o, describe(got))
	}
	return nil
}

// describe says what a sector holds, for error messages.
func describe(s []byte) string {
	if len(s) >= 24 && bytes.Equal(s[:8], sectorMagic[:]) {
		return fmt.Sprintf("holds the pattern of seed %d for byte %d (or is corrupt after its header)",
			le.Uint64(s[8:]), le.Uint64(s[16:]))
	}
	if len(s) >= 32 && bytes.Equal(s[:8], writerMagic[:]) {
		return fmt.Sprintf("holds writer block seed %d seq %d index %d",
			le.Uint64(s[8:]), le.Uint64(s[16:]), le.Uint64(s[24:]))
	}
	if IsZero(s) {
		return "is all zeros"
	}
	return fmt.Sprintf("holds unknown data starting % x", s[:min(16, len(s))])
}

// IsZero reports whether p is all zero bytes.
func IsZero(p []byte) bool {
	for len(p) >= 8 {
		if le.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}
