package mapper

import (
	"errors"
	"log/slog"

	"github.com/vhostdm/vhostdm/internal/imagelock"
)

// LockMode is whether a device's files and block devices carry QEMU's
// image locks (internal/imagelock: as a QEMU guest disk takes them, write
// not shared), its locking option.
type LockMode = imagelock.Mode

// The lock modes.
const (
	LockAuto = imagelock.Auto // where the file system takes OFD locks (default)
	LockOn   = imagelock.On   // and fail where it does not
	LockOff  = imagelock.Off  // none
)

// ParseLockMode parses "auto" (or ""), "on" or "off".
func ParseLockMode(s string) (LockMode, error) {
	m, err := imagelock.Parse(s)
	if err != nil {
		return m, WithClass(err, ErrInvalid)
	}
	return m, nil
}

// lockImage takes the image locks of the open file b (read-only or not)
// and returns what releases them (nil for LockOff). Another process that
// forbids this use is ErrBusy, naming the permission.
func lockImage(b *fileBackend, readOnly bool, mode LockMode, log *slog.Logger) (func(), error) {
	release, err := imagelock.Lock(b.fd, b.name, !readOnly, mode, log)
	if errors.Is(err, imagelock.ErrInUse) {
		return nil, Errorf(ErrBusy, "%w; stop it, or set locking = \"off\" on this device", err)
	}
	return release, err
}
