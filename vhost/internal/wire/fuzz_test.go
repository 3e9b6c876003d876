package wire

import (
	"reflect"
	"testing"
)

// FuzzDecodeMessage decodes a header and payload: decoding never panics,
// and what decodes encodes to something that decodes to the same value.
func FuzzDecodeMessage(f *testing.F) {
	msg := func(code ReqCode, pl Payload) []byte {
		p := pl.AppendTo(nil)
		return append(Header{Code: code, Flags: FlagVersion | FlagNeedReply, Size: uint32(len(p))}.AppendTo(nil), p...)
	}
	f.Add(msg(ReqGetFeatures, NoPayload{}))
	f.Add(msg(ReqSetFeatures, U64(1<<32)))
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
			CheckFDs(h.Code, pl, n)
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
