package mapper

import (
	"errors"
	"fmt"
)

// Error classes, wrapped with %w by the functions of this package so that
// callers (QMP, the CLI) can tell them apart with errors.Is.
var (
	// ErrNotFound is returned when a device, target type or plug-in is unknown.
	ErrNotFound = errors.New("not found")
	// ErrExists is returned when creating a device whose name is taken.
	ErrExists = errors.New("already exists")
	// ErrInvalid is returned for bad input: table text, arguments, messages.
	ErrInvalid = errors.New("invalid argument")
	// ErrBusy is returned when a device is open and the operation needs it closed.
	ErrBusy = errors.New("device or resource busy")
	// ErrCorrupt is returned when on-disk metadata fails validation.
	ErrCorrupt = errors.New("corrupt metadata")
	// ErrIO is returned when I/O fails (the error target, a failing backend).
	ErrIO = errors.New("input/output error")
	// ErrReadOnly is returned for writes to a read-only device.
	ErrReadOnly = errors.New("read-only device")
	// ErrNoTable is returned for I/O or status of a device with no live table.
	ErrNoTable = errors.New("no live table")
	// ErrUnsupported is returned by targets for operations they do not implement.
	ErrUnsupported = errors.New("operation not supported")
)

// classed gives an error a class without changing its text.
type classed struct {
	err   error
	class error
}

func (c classed) Error() string   { return c.err.Error() }
func (c classed) Unwrap() []error { return []error{c.err, c.class} }

// WithClass returns err, unchanged in text, that also matches class with
// errors.Is. It returns nil for a nil err and err itself if it already
// matches class.
func WithClass(err, class error) error {
	if err == nil || errors.Is(err, class) {
		return err
	}
	return classed{err: err, class: class}
}

// Errorf formats an error of the given class: the text is exactly the
// formatted message; errors.Is(err, class) holds.
func Errorf(class error, format string, args ...any) error {
	return WithClass(fmt.Errorf(format, args...), class)
}
