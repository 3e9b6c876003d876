package journal

import (
	"bytes"
	"errors"
	"fmt"
	"io"
)

// SeedSource is one volume's initial data for SeedStore.
type SeedSource struct {
	Name string      // the volume's name (ValidName)
	Size int64       // bytes: a positive multiple of 512
	Data io.ReaderAt // the image (read from 0 to Size)
}

// seedChunk is how much SeedStore reads and writes at a time.
const seedChunk = 4 << 20

// SeedStore is Seed over any Store (the Ceph store's RBD images): each
// source is written into its volume's new base image — chunks that are
// all zeroes are skipped, a new image reading as zeroes, so a sparse
// source stays thin — and an empty journal follows. The store is locked
// meanwhile (a hub holding it makes SeedStore fail with ErrInUse), must
// hold no journal state yet, and no base image of the volumes.
func SeedStore(st Store, srcs []SeedSource) error {
	lk, err := st.Lock()
	if err != nil {
		return fmt.Errorf("seed %s: %w", st, err)
	}
	defer lk.Close()
	if b, err := st.GetState(); err != nil || b != nil {
		if err == nil {
			err = errors.New("a journal exists there")
		}
		return fmt.Errorf("seed %s: %w", st, err)
	}
	state := state{Version: stateVersion}
	seen := map[string]bool{}
	for _, s := range srcs {
		if !ValidName(s.Name) || seen[s.Name] {
			return fmt.Errorf("seed: volume name %q: letters, digits, '.', '_', '-', once each", s.Name)
		}
		seen[s.Name] = true
		if s.Size <= 0 || s.Size%512 != 0 || s.Size > MaxVolumeSize {
			return fmt.Errorf("seed %s: want a positive multiple of 512 bytes, got %d bytes", s.Name, s.Size)
		}
	}
	for _, s := range srcs {
		if err := seedImage(st, s); err != nil {
			return fmt.Errorf("seed %s: %w", s.Name, err)
		}
		state.Volumes = append(state.Volumes, Volume{Name: s.Name, Size: s.Size})
	}
	if err := st.SyncImages(); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	a := &applier{j: &Journal{dir: st.String(), store: st}}
	if err := a.saveState(state); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	return nil
}

// seedImage creates s's base image in st and copies s into it.
func seedImage(st Store, s SeedSource) error {
	if img, err := st.OpenImage(s.Name, false); err == nil {
		name := img.Name()
		img.Close()
		return fmt.Errorf("%s exists", name)
	}
	img, err := st.OpenImage(s.Name, true)
	if err != nil {
		return err
	}
	defer img.Close()
	if err := img.Resize(s.Size); err != nil {
		return err
	}
	buf := make([]byte, seedChunk)
	for off := int64(0); off < s.Size; off += seedChunk {
		b := buf[:min(seedChunk, s.Size-off)]
		n, err := s.Data.ReadAt(b, off)
		if n < len(b) {
			if err == nil || errors.Is(err, io.EOF) {
				err = fmt.Errorf("the source ends at %d bytes, want %d", off+int64(n), s.Size)
			}
			return err
		}
		if isZero(b) {
			continue
		}
		if _, err := img.WriteAt(b, off); err != nil {
			return err
		}
	}
	return img.Sync()
}

// isZero reports whether b holds only zero bytes.
func isZero(b []byte) bool {
	var zero [4096]byte
	for len(b) > 0 {
		n := min(len(b), len(zero))
		if !bytes.Equal(b[:n], zero[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
