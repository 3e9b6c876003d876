package mapper

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Persistent bitmaps live in the manager's state directory, one file per
// device: STATEDIR/NAME.bitmaps, JSON. As QEMU's qcow2 bitmaps carry an
// IN_USE flag while the image is open, the file says "in-use": true from
// the moment the device's first table goes live until a clean stop
// (Manager.Close, dm-remove) writes the final bits with "in-use": false. A
// file found in use when a device starts is what a crash left: its bitmaps
// are loaded inconsistent (reported, never recording, refused for backup,
// only removable), as QEMU does.

// bitmapFileVersion is the version of the file format.
const bitmapFileVersion = 1

type bitmapFile struct {
	Version int             `json:"version"`
	InUse   bool            `json:"in-use"`
	Sectors uint64          `json:"sectors"`
	Bitmaps []bitmapFileBit `json:"bitmaps"`
}

type bitmapFileBit struct {
	Name         string `json:"name"`
	Granularity  uint64 `json:"granularity"`
	Enabled      bool   `json:"enabled"`
	Inconsistent bool   `json:"inconsistent,omitempty"`
	Bits         string `json:"bits"` // base64 of little-endian 64-bit words
}

// BitmapFile returns the path of device name's persistent bitmaps, "" without
// a state directory.
func (m *Manager) BitmapFile(name string) string {
	if m.stateDir == "" {
		return ""
	}
	return filepath.Join(m.stateDir, name+".bitmaps")
}

// loadBitmaps loads d's persistent bitmaps when its first table goes live,
// and marks the file in use.
func (m *Manager) loadBitmaps(d *Device) {
	path := m.BitmapFile(d.name)
	if path == "" {
		return
	}
	d.bitmaps.mu.Lock()
	defer d.bitmaps.mu.Unlock()
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		d.log.Error("persistent bitmaps: cannot read; none loaded", "file", path, "err", err)
		return
	}
	var f bitmapFile
	if err := json.Unmarshal(data, &f); err != nil || f.Version != bitmapFileVersion {
		d.log.Error("persistent bitmaps: bad file; none loaded", "file", path, "err", err, "version", f.Version)
		return
	}
	size := d.Size()
	for _, fb := range f.Bitmaps {
		g := fb.Granularity
		if fb.Name == "" || g < MinBitmapGranularity || g > MaxBitmapGranularity || g&(g-1) != 0 {
			d.log.Error("persistent bitmaps: bad entry skipped", "file", path, "bitmap", fb.Name)
			continue
		}
		if _, err := d.Bitmap(fb.Name); err == nil {
			continue
		}
		b := newBitmap(fb.Name, g, true, f.Sectors)
		raw, err := base64.StdEncoding.DecodeString(fb.Bits)
		w := *b.words.Load()
		if err != nil || len(raw) != 8*len(w) {
			d.log.Error("persistent bitmaps: bad bits; bitmap marked inconsistent", "file", path, "bitmap", fb.Name)
			b.inconsistent.Store(true)
		} else {
			for i := range w {
				w[i].Store(binary.LittleEndian.Uint64(raw[8*i:]))
			}
		}
		if f.InUse || fb.Inconsistent {
			b.inconsistent.Store(true)
		}
		b.enabled.Store(fb.Enabled)
		if f.Sectors != size {
			b.resize(size)
		}
		d.insertBitmap(b)
		d.log.Info("persistent bitmap loaded", "bitmap", fb.Name, "granularity", g, "inconsistent", b.Inconsistent())
	}
	m.persistBitmaps(d, true)
}

// persistBitmaps writes d's persistent bitmaps with the in-use flag; with
// none, the file is removed. The caller holds d.bitmaps.mu.
func (m *Manager) persistBitmaps(d *Device, inUse bool) {
	path := m.BitmapFile(d.name)
	if path == "" {
		return
	}
	f := bitmapFile{Version: bitmapFileVersion, InUse: inUse, Sectors: d.Size()}
	for _, b := range d.Bitmaps() {
		if !b.persistent {
			continue
		}
		words := b.snapshot()
		raw := make([]byte, 8*len(words))
		for i, v := range words {
			binary.LittleEndian.PutUint64(raw[8*i:], v)
		}
		f.Bitmaps = append(f.Bitmaps, bitmapFileBit{Name: b.name, Granularity: b.gran, Enabled: b.enabled.Load(),
			Inconsistent: b.Inconsistent(), Bits: base64.StdEncoding.EncodeToString(raw)})
	}
	if len(f.Bitmaps) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			d.log.Error("persistent bitmaps: cannot remove file", "file", path, "err", err)
		}
		return
	}
	data, err := json.Marshal(f)
	if err == nil {
		err = writeFileSync(path, data)
	}
	if err != nil {
		d.log.Error("persistent bitmaps: cannot save", "file", path, "err", err)
	}
}

// saveBitmaps writes d's persistent bitmaps for a clean stop.
func (m *Manager) saveBitmaps(d *Device) {
	d.bitmaps.mu.Lock()
	defer d.bitmaps.mu.Unlock()
	if m.BitmapFile(d.name) == "" || d.bitmaps.list.Load() == nil {
		return
	}
	m.persistBitmaps(d, false)
}

// writeFileSync replaces path with data durably: a temporary file, fsync,
// rename, fsync of the directory.
func writeFileSync(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(data)
	if werr == nil {
		werr = tmp.Sync()
	}
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp.Name(), path)
	}
	if werr != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", path, werr)
	}
	if df, err := os.Open(dir); err == nil {
		df.Sync()
		df.Close()
	}
	return nil
}
