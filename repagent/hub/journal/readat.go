package journal

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Reading a volume at a point of its write order, for the hub's online
// verify and checksum resync: the base image overlaid with the journal's
// records up to the point, without materialising anything.

// Range is a byte range of a volume and the buffer that receives it.
type Range struct {
	Off int64
	Buf []byte
}

// End returns the journal's end position, counting records submitted and
// not yet durable.
func (j *Journal) End() int64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.pEnd
}

// HoldApply keeps the applier from applying records that end after pos
// until release is called, so that the base images stay at or before
// pos. Holds are short: an online verify takes one per request.
func (j *Journal) HoldApply(pos int64) (release func()) {
	a := &j.applier
	a.mu.Lock()
	if a.holds == nil {
		a.holds = map[int]int64{}
	}
	a.nextPin++
	id := a.nextPin
	a.holds[id] = pos
	a.mu.Unlock()
	return func() {
		a.mu.Lock()
		delete(a.holds, id)
		a.mu.Unlock()
	}
}

// holdLimit returns the lowest held position, or -1; a.mu held.
func (a *applier) holdLimit() int64 {
	lim := int64(-1)
	for _, p := range a.holds {
		if lim < 0 || p < lim {
			lim = p
		}
	}
	return lim
}

// ReadVolume fills each range's buffer with volume vol's bytes after the
// durable records before position sure, and after it those up to the
// first record whose sequence number is beforeSeq or above, and not past
// position end: the state of the volume at the point of the agent's
// write order where every write numbered below beforeSeq is applied and
// none above, given that every record before sure is before that point
// (sequence numbers are compared only from sure on: an agent that
// restarted numbers its writes from 1 again). Bytes beyond the volume
// read as zero. It fails with ErrBeforeWindow when the base images are
// past sure (HoldApply(sure) prevents it), and with ErrNoPoint when end
// is not durable yet.
func (j *Journal) ReadVolume(ctx context.Context, vol string, ranges []Range, sure int64, beforeSeq uint64, end int64) error {
	a := &j.applier
	a.run.RLock()
	a.mu.Lock()
	st, aerr := a.st, a.err
	a.mu.Unlock()
	if aerr != nil && st.Target != st.Base {
		a.run.RUnlock()
		return fmt.Errorf("read %s: base images may be mid-apply: %w", vol, aerr)
	}
	if st.Base.Pos > sure || sure > end {
		a.run.RUnlock()
		return fmt.Errorf("read %s: the base images are at %d, past %d: %w", vol, st.Base.Pos, sure, ErrBeforeWindow)
	}
	j.mu.Lock()
	durable := j.durable
	j.mu.Unlock()
	if end > durable {
		a.run.RUnlock()
		return fmt.Errorf("read %s: position %d is not durable yet (%d): %w", vol, end, durable, ErrNoPoint)
	}
	id := a.pin(st.Base.Pos)
	defer a.unpin(id)
	err := readBase(j.store, vol, ranges)
	a.run.RUnlock()
	if err != nil {
		return fmt.Errorf("read %s: %w", vol, err)
	}
	if end <= st.Base.Pos {
		return nil
	}
	r, err := newReader(j.segments(), st.Base.Pos, end, nil)
	if err != nil {
		return fmt.Errorf("read %s: %w", vol, err)
	}
	defer r.close()
	for n := 0; ; n++ {
		if n%1024 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		rec, start, _, err := r.next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", vol, err)
		}
		if start >= sure && rec.HasSeq && rec.Seq >= beforeSeq {
			return nil
		}
		if rec.Volume != vol {
			continue
		}
		switch rec.Kind {
		case KindWrite:
			overlay(ranges, rec.Offset, int64(len(rec.Data)), rec.Data)
		case KindZero, KindDiscard:
			overlay(ranges, rec.Offset, rec.Length, nil)
		case KindVolume:
			// Bytes past a shrunk volume read as zero; a grown one
			// reads zero where nothing was written.
			if rec.Size < 0 {
				continue
			}
			overlay(ranges, rec.Size, 1<<62, nil)
		}
	}
}

// overlay copies data (zeros when nil) of [off, off+n) into the ranges it
// overlaps.
func overlay(ranges []Range, off, n int64, data []byte) {
	for _, rg := range ranges {
		lo := max(off, rg.Off)
		hi := min(off+n, rg.Off+int64(len(rg.Buf)))
		if lo >= hi {
			continue
		}
		dst := rg.Buf[lo-rg.Off : hi-rg.Off]
		if data == nil {
			clear(dst)
		} else {
			copy(dst, data[lo-off:hi-off])
		}
	}
}

// readBase reads the ranges from a base image; a missing image or bytes
// past its end read as zero.
func readBase(store Store, vol string, ranges []Range) error {
	f, err := store.OpenImage(vol, false)
	if errors.Is(err, os.ErrNotExist) {
		for _, rg := range ranges {
			clear(rg.Buf)
		}
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	for _, rg := range ranges {
		n, err := f.ReadAt(rg.Buf, rg.Off)
		if err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		clear(rg.Buf[n:])
	}
	return nil
}

// SeedImage is an existing image that Seed makes a volume's base image.
type SeedImage struct {
	Name string // the volume's name (ValidName)
	Path string // the image; its size is the volume's, a multiple of 512
}

// Seed creates the journal of a VM in dir, which must not hold one yet,
// from existing images: each becomes a volume's base image (a copy,
// reflinked where the file system can, holes kept), with an empty
// journal after it. The hub then resynchronises the volumes by checksums
// instead of copying them (a failback, or a replica seeded from a copy).
func Seed(dir string, imgs []SeedImage) error {
	if _, err := os.Stat(filepath.Join(dir, stateFile)); err == nil {
		return fmt.Errorf("seed %s: a journal exists there", dir)
	}
	if err := os.MkdirAll(filepath.Join(dir, segDirName), 0o700); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	st := state{Version: stateVersion}
	for _, im := range imgs {
		if !ValidName(im.Name) {
			return fmt.Errorf("seed: volume name %q: letters, digits, '.', '_', '-'", im.Name)
		}
		fi, err := os.Stat(im.Path)
		if err != nil {
			return fmt.Errorf("seed %s: %w", im.Name, err)
		}
		size := fi.Size()
		if !fi.Mode().IsRegular() || size <= 0 || size%512 != 0 || size > MaxVolumeSize {
			return fmt.Errorf("seed %s: %s: want a regular file of a positive multiple of 512 bytes, got %d bytes", im.Name, im.Path, size)
		}
		f, err := copyImage(im.Path, filepath.Join(dir, im.Name+imageSuffix), size)
		if err != nil {
			return fmt.Errorf("seed %s: %w", im.Name, err)
		}
		err = f.Sync()
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("seed %s: %w", im.Name, err)
		}
		st.Volumes = append(st.Volumes, Volume{Name: im.Name, Size: size})
	}
	a := &applier{j: &Journal{dir: dir, store: DirStore(dir)}}
	if err := a.saveState(st); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	return nil
}
