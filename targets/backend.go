package targets

import "github.com/vhostdm/vhostdm/mapper"

// mapBackend performs r at sector of backend b: the common last step of
// targets that pass I/O through unchanged (linear, striped).
func mapBackend(b mapper.Backend, sector uint64, r *mapper.Request) error {
	off := int64(sector << mapper.SectorShift)
	switch r.Op {
	case mapper.OpRead:
		return b.ReadAt(r.Data, off)
	case mapper.OpWrite:
		if err := b.WriteAt(r.Data, off); err != nil {
			return err
		}
		if r.FUA {
			return b.Flush()
		}
		return nil
	case mapper.OpFlush:
		return b.Flush()
	case mapper.OpDiscard:
		return b.Discard(off, int64(r.Bytes()))
	case mapper.OpWriteZeroes:
		return b.WriteZeroes(off, int64(r.Bytes()), r.Unmap)
	}
	return mapper.ErrUnsupported
}
