package hub

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/vhostdm/vhostdm/repagent/hub/journal"
)

// Backend is where the hub keeps everything durable: per VM, its
// identity, each volume's state, and the journal's store (segments,
// applied state, replica images). DirBackend (a directory per VM, the
// default) and the Ceph build's RADOS/RBD backend implement it. Its
// methods may be called concurrently.
type Backend interface {
	// String names the backend in logs ("DIR", "ceph:POOL").
	String() string
	// VMs returns the VMs the backend holds and the names of the volumes
	// each has a state for.
	VMs() (map[string][]string, error)
	// GetVM returns VM vm's identity record, or nil when it has none.
	GetVM(vm string) ([]byte, error)
	// PutVM replaces VM vm's identity record atomically and durably.
	PutVM(vm string, b []byte) error
	// GetVolume returns a volume's state, or nil when it has none.
	GetVolume(vm, vol string) ([]byte, error)
	// PutVolume replaces a volume's state atomically and durably.
	PutVolume(vm, vol string, b []byte) error
	// Journal returns the store of VM vm's journal.
	Journal(vm string) journal.Store
	// Replica names a volume's replica image for status (a path, or
	// rbd:POOL/IMAGE).
	Replica(vm, vol string) string
	// Close releases the backend's resources (connections).
	Close() error
}

// DirBackend is the Backend of a directory: one directory per VM,
// holding
//
//	vm.json            {"name", "uuid"}
//	VOLUME.img         the recovery volume (the journal's base image), preallocated
//	VOLUME.state.json  the volume's durable state (volState)
//	state.json, lock, journal/  the journal (see package journal)
//
// Files are replaced atomically (write, fsync, rename, fsync dir).
func DirBackend(root string) Backend { return dirBackend(root) }

type dirBackend string

func (d dirBackend) String() string { return string(d) }

func (d dirBackend) dir(vm string) string { return filepath.Join(string(d), vm) }

func (d dirBackend) VMs() (map[string][]string, error) {
	if err := os.MkdirAll(string(d), 0o700); err != nil {
		return nil, err
	}
	return listStore(string(d))
}

func readOrNil(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return b, err
}

func (d dirBackend) GetVM(vm string) ([]byte, error) {
	return readOrNil(filepath.Join(d.dir(vm), "vm.json"))
}

func (d dirBackend) PutVM(vm string, b []byte) error {
	if err := os.MkdirAll(d.dir(vm), 0o700); err != nil {
		return err
	}
	return writeFileSync(filepath.Join(d.dir(vm), "vm.json"), b)
}

func (d dirBackend) GetVolume(vm, vol string) ([]byte, error) {
	return readOrNil(filepath.Join(d.dir(vm), vol+".state.json"))
}

func (d dirBackend) PutVolume(vm, vol string, b []byte) error {
	return writeFileSync(filepath.Join(d.dir(vm), vol+".state.json"), b)
}

func (d dirBackend) Journal(vm string) journal.Store { return journal.DirStore(d.dir(vm)) }

func (d dirBackend) Replica(vm, vol string) string { return filepath.Join(d.dir(vm), vol+".img") }

func (d dirBackend) Close() error { return nil }
