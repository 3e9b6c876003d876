//go:build ceph

package cephstore

/*
#cgo LDFLAGS: -lrados
#include <stdlib.h>
#include <rados/librados.h>
*/
import "C"

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/ceph/go-ceph/rados"
	"golang.org/x/sys/unix"
)

// stateWrite is a change of a VM object: omap keys set and removed and,
// when full is non-nil, its data replaced.
type stateWrite struct {
	set  map[string][]byte
	rm   []string
	full []byte
}

// lockExclusive is cls_lock's LOCK_EXCLUSIVE.
const lockExclusive = 1

// assertLockedInput encodes cls_lock_assert_op{name, exclusive, cookie,
// tag ""} as cls_lock's assert_locked takes it: version 1, compat 1, the
// length, then the fields (strings as a 32-bit length and the bytes).
func assertLockedInput(name, cookie string) []byte {
	str := func(b []byte, s string) []byte {
		return append(binary.LittleEndian.AppendUint32(b, uint32(len(s))), s...)
	}
	var p []byte
	p = str(p, name)
	p = append(p, lockExclusive)
	p = str(p, cookie)
	p = str(p, "")
	out := binary.LittleEndian.AppendUint32([]byte{1, 1}, uint32(len(p)))
	return append(out, p...)
}

// operateLocked applies w to oid in one RADOS write operation whose first
// step asserts (cls lock assert_locked) that this client holds the
// exclusive lock lockName with cookie: the OSD applies all of it or
// nothing, so a hub whose lease ended (expired, broken, taken by another
// hub) changes nothing. A failed assertion is ErrNotHeld.
func operateLocked(ioctx *rados.IOContext, oid, cookie string, w stateWrite) error {
	op := C.rados_create_write_op()
	defer C.rados_release_write_op(op)
	var frees []unsafe.Pointer
	defer func() {
		for _, p := range frees {
			C.free(p)
		}
	}()
	cstr := func(s string) *C.char {
		p := C.CString(s)
		frees = append(frees, unsafe.Pointer(p))
		return p
	}
	cbytes := func(b []byte) *C.char {
		if len(b) == 0 {
			return nil
		}
		p := C.CBytes(b)
		frees = append(frees, p)
		return (*C.char)(p)
	}
	// librados keeps prval until the operation completes: C memory.
	prval := (*C.int)(C.malloc(C.size_t(unsafe.Sizeof(C.int(0)))))
	frees = append(frees, unsafe.Pointer(prval))
	*prval = 0
	in := assertLockedInput(lockName, cookie)
	C.rados_write_op_exec(op, cstr("lock"), cstr("assert_locked"), cbytes(in), C.size_t(len(in)), prval)
	if n := len(w.set); n > 0 {
		ptr := C.size_t(unsafe.Sizeof(uintptr(0)))
		keys := C.malloc(C.size_t(n) * ptr)
		vals := C.malloc(C.size_t(n) * ptr)
		lens := C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(C.size_t(0))))
		frees = append(frees, keys, vals, lens)
		ks := unsafe.Slice((**C.char)(keys), n)
		vs := unsafe.Slice((**C.char)(vals), n)
		ls := unsafe.Slice((*C.size_t)(lens), n)
		i := 0
		for k, v := range w.set {
			ks[i], vs[i], ls[i] = cstr(k), cbytes(v), C.size_t(len(v))
			i++
		}
		C.rados_write_op_omap_set(op, (**C.char)(keys), (**C.char)(vals), (*C.size_t)(lens), C.size_t(n))
	}
	if n := len(w.rm); n > 0 {
		keys := C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(uintptr(0))))
		frees = append(frees, keys)
		ks := unsafe.Slice((**C.char)(keys), n)
		for i, k := range w.rm {
			ks[i] = cstr(k)
		}
		C.rados_write_op_omap_rm_keys(op, (**C.char)(keys), C.size_t(n))
	}
	if w.full != nil {
		C.rados_write_op_write_full(op, cbytes(w.full), C.size_t(len(w.full)))
	}
	ret := C.rados_write_op_operate(op, C.rados_ioctx_t(ioctx.Pointer()), cstr(oid), nil, 0)
	if ret == 0 {
		return nil
	}
	if *prval != 0 {
		// The assertion failed: EBUSY (another holder, or none: expired or
		// broken), ENOENT (no object: no lock either).
		return fmt.Errorf("%w (lock %q, cookie %s, on %s: %w)", ErrNotHeld, lockName, cookie, oid, unix.Errno(-*prval))
	}
	return unix.Errno(-ret)
}
