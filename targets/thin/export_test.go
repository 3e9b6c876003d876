package thin

import (
	"os"
	"time"

	"github.com/vhostdm/vhostdm/targets/thin/pdata"
)

// SetNoSpaceTimeout sets the no-space timeout of the pools made from now
// on (the kernel's no_space_timeout module parameter) and returns a
// function restoring it.
func SetNoSpaceTimeout(d time.Duration) func() {
	old := noSpaceTimeout
	noSpaceTimeout = d
	return func() { noSpaceTimeout = old }
}

// SetNeedsCheck sets the needs_check flag in the superblock of the
// metadata file path, as the kernel does when a metadata operation fails.
func SetNeedsCheck(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	sb := make([]byte, pdata.BlockSize)
	if _, err := f.ReadAt(sb, 0); err != nil {
		return err
	}
	putU32(sb, offFlags, getU32(sb, offFlags)|flagNeedsCheck)
	putU32(sb, 0, pdata.Checksum(sb, pdata.SuperblockSalt))
	if _, err := f.WriteAt(sb, 0); err != nil {
		return err
	}
	return f.Sync()
}
