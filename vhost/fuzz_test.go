package vhost

import (
	"reflect"
	"testing"
	"unsafe"
)

// FuzzDecodeMessage decodes a header and payload: decoding never panics,
// and what decodes encodes to something that decodes to the same value.
func FuzzDecodeMessage(f *testing.F) {
	msg := func(code ReqCode, pl Payload) []byte {
		p := pl.AppendTo(nil)
		return append(Header{Code: code, Flags: FlagVersion | FlagNeedReply, Size: uint32(len(p))}.AppendTo(nil), p...)
	}
	f.Add(msg(ReqGetFeatures, NoPayload{}))
	f.Add(msg(ReqSetFeatures, U64(FeatureVersion1)))
	f.Add(msg(ReqSetVringAddr, VringAddr{Index: 1, Flags: 1, Desc: 0x1000, Used: 0x3000, Avail: 0x2000, Log: 0x3000}))
	f.Add(msg(ReqSetMemTable, MemTable{Regions: []MemRegion{{GPA: 0, Size: 1 << 20, UserAddr: 0x7f0000000000}, {GPA: 1 << 20, Size: 4096, Offset: 4096}}}))
	f.Add(msg(ReqAddMemReg, SingleMemRegion{Region: MemRegion{GPA: 0, Size: 4096}}))
	f.Add(msg(ReqGetConfig, ConfigMsg{Size: 8, Data: make([]byte, 8)}))
	f.Add(msg(ReqSetInflightFD, InflightDesc{MmapSize: 4096, NumQueues: 1, QueueSize: 128}))
	f.Add(msg(ReqSetVringKick, VringFD{Index: 3, NoFD: true}))
	f.Add(msg(ReqSetLogBase, LogDesc{Size: 4096}))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < HeaderSize {
			if _, err := DecodeHeader(data); err == nil {
				t.Fatal("short header decoded")
			}
			return
		}
		h, err := DecodeHeader(data[:HeaderSize])
		if err != nil {
			return
		}
		if h.Size > MaxPayload {
			t.Fatal("oversized header accepted")
		}
		p := data[HeaderSize:]
		pl, err := DecodePayload(h.Code, p)
		if err != nil {
			return
		}
		for n := 0; n <= MaxFDs+1; n++ {
			checkFDs(h.Code, pl, n)
		}
		enc := pl.AppendTo(nil)
		pl2, err := DecodePayload(h.Code, enc)
		if err != nil {
			t.Fatalf("%s: re-decoding %x: %v", h.Code, enc, err)
		}
		if !reflect.DeepEqual(normalize(pl), normalize(pl2)) {
			t.Fatalf("%s: %+v re-decodes as %+v", h.Code, pl, pl2)
		}
		if h2, err := DecodeHeader(h.AppendTo(nil)); err != nil || h2 != h {
			t.Fatalf("header %+v re-decodes as %+v, %v", h, h2, err)
		}
	})
}

// normalize makes empty and nil config data compare equal.
func normalize(p Payload) Payload {
	if c, ok := p.(ConfigMsg); ok && len(c.Data) == 0 {
		c.Data = nil
		return c
	}
	return p
}

// fuzzMemGPA is where FuzzDescriptorChain's guest memory starts.
const fuzzMemGPA = 0x1000

// FuzzDescriptorChain walks descriptor chains of arbitrary tables in a
// 64 KiB guest memory: the walker never panics, stops at the queue size,
// and every segment it returns lies in guest memory.
func FuzzDescriptorChain(f *testing.F) {
	mem := make([]byte, 512)
	// A 3-descriptor chain: header, data, status.
	writeDesc(mem[0:], Desc{Addr: fuzzMemGPA + 0x1000, Len: 16, Flags: DescFlagNext, Next: 1})
	writeDesc(mem[16:], Desc{Addr: fuzzMemGPA + 0x2000, Len: 4096, Flags: DescFlagWrite | DescFlagNext, Next: 2})
	writeDesc(mem[32:], Desc{Addr: fuzzMemGPA + 0x3000, Len: 1, Flags: DescFlagWrite})
	f.Add(append([]byte(nil), mem...), uint8(3), uint16(0), false)
	// An indirect table at 0x100 in the same memory.
	ind := make([]byte, 512)
	writeDesc(ind[0:], Desc{Addr: fuzzMemGPA + 0x100, Len: 48, Flags: DescFlagIndirect})
	writeDesc(ind[0x100:], Desc{Addr: fuzzMemGPA + 0x1000, Len: 16, Flags: DescFlagNext, Next: 1})
	writeDesc(ind[0x110:], Desc{Addr: fuzzMemGPA + 0x2000, Len: 512, Flags: DescFlagNext, Next: 2})
	writeDesc(ind[0x120:], Desc{Addr: fuzzMemGPA + 0x3000, Len: 1, Flags: DescFlagWrite})
	f.Add(ind, uint8(2), uint16(0), true)
	// A loop.
	loop := make([]byte, 64)
	writeDesc(loop[0:], Desc{Addr: fuzzMemGPA, Len: 16, Flags: DescFlagNext, Next: 1})
	writeDesc(loop[16:], Desc{Addr: fuzzMemGPA, Len: 16, Flags: DescFlagNext, Next: 0})
	f.Add(loop, uint8(1), uint16(1), true)
	f.Fuzz(func(t *testing.T, data []byte, qexp uint8, head uint16, indirect bool) {
		gm := make([]byte, 64<<10)
		copy(gm, data)
		m := NewMemFromBytes(fuzzMemGPA, gm)
		num := uint16(1) << (qexp % 9)
		desc := gm[:int(num)*descSize]
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
