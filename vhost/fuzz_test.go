package vhost

import (
	"testing"
	"unsafe"

	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// fuzzMemGPA is where FuzzDescriptorChain's guest memory starts.
const fuzzMemGPA = 0x1000

// FuzzDescriptorChain walks descriptor chains of arbitrary tables in a
// 64 KiB guest memory: the walker never panics, stops at the queue size,
// and every segment it returns lies in guest memory.
func FuzzDescriptorChain(f *testing.F) {
	mem := make([]byte, 512)
	// A 3-descriptor chain: header, data, status.
	virtio.WriteDesc(mem[0:], virtio.Desc{Addr: fuzzMemGPA + 0x1000, Len: 16, Flags: virtio.DescFlagNext, Next: 1})
	virtio.WriteDesc(mem[16:], virtio.Desc{Addr: fuzzMemGPA + 0x2000, Len: 4096, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: 2})
	virtio.WriteDesc(mem[32:], virtio.Desc{Addr: fuzzMemGPA + 0x3000, Len: 1, Flags: virtio.DescFlagWrite})
	f.Add(append([]byte(nil), mem...), uint8(3), uint16(0), false)
	// An indirect table at 0x100 in the same memory.
	ind := make([]byte, 512)
	virtio.WriteDesc(ind[0:], virtio.Desc{Addr: fuzzMemGPA + 0x100, Len: 48, Flags: virtio.DescFlagIndirect})
	virtio.WriteDesc(ind[0x100:], virtio.Desc{Addr: fuzzMemGPA + 0x1000, Len: 16, Flags: virtio.DescFlagNext, Next: 1})
	virtio.WriteDesc(ind[0x110:], virtio.Desc{Addr: fuzzMemGPA + 0x2000, Len: 512, Flags: virtio.DescFlagNext, Next: 2})
	virtio.WriteDesc(ind[0x120:], virtio.Desc{Addr: fuzzMemGPA + 0x3000, Len: 1, Flags: virtio.DescFlagWrite})
	f.Add(ind, uint8(2), uint16(0), true)
	// A loop.
	loop := make([]byte, 64)
	virtio.WriteDesc(loop[0:], virtio.Desc{Addr: fuzzMemGPA, Len: 16, Flags: virtio.DescFlagNext, Next: 1})
	virtio.WriteDesc(loop[16:], virtio.Desc{Addr: fuzzMemGPA, Len: 16, Flags: virtio.DescFlagNext, Next: 0})
	f.Add(loop, uint8(1), uint16(1), true)
	f.Fuzz(func(t *testing.T, data []byte, qexp uint8, head uint16, indirect bool) {
		gm := make([]byte, 64<<10)
		copy(gm, data)
		m := NewMemFromBytes(fuzzMemGPA, gm)
		num := uint16(1) << (qexp % 9)
		desc := gm[:int(num)*virtio.DescSize]
		var c chain
		err := walkChain(m, desc, num, head, indirect, &c)
		lo := uintptr(unsafe.Pointer(unsafe.SliceData(gm)))
		hi := lo + uintptr(len(gm))
		var r, w uint64
		for i, s := range c.segs {
			p := uintptr(unsafe.Pointer(unsafe.SliceData(s.b)))
			if len(s.b) == 0 || p < lo || p+uintptr(len(s.b)) > hi {
				t.Fatalf("segment %d outside guest memory", i)
			}
			if s.gpa-fuzzMemGPA != uint64(p-lo) {
				t.Fatalf("segment %d: gpa %#x does not match its bytes", i, s.gpa)
			}
			if i < c.nRead && s.write || i >= c.nRead && !s.write {
				t.Fatalf("segment %d out of order", i)
			}
			if s.write {
				w += uint64(len(s.b))
			} else {
				r += uint64(len(s.b))
			}
		}
		if len(c.segs) > maxSegments {
			t.Fatalf("%d segments", len(c.segs))
		}
		if err == nil && (r != c.rBytes || w != c.wBytes) {
			t.Fatalf("byte counts %d/%d, segments add up to %d/%d", c.rBytes, c.wBytes, r, w)
		}
		if b, gpa, ok := salvageStatus(m, desc, num, head, indirect); ok {
			if len(b) != 1 || gpa < fuzzMemGPA || gpa >= fuzzMemGPA+uint64(len(gm)) {
				t.Fatalf("status at %#x outside guest memory", gpa)
			}
		}
		if _, _, ok := c.lastWritable(); ok && w == 0 {
			t.Fatal("status byte found without writable bytes")
		}
	})
}
