package journal

import (
	"bytes"
	"testing"
	"time"
)

// FuzzDecodeRecord: decoding arbitrary bytes never panics, and a record that
// decodes encodes back to the same bytes.
func FuzzDecodeRecord(f *testing.F) {
	t0 := time.Unix(0, 1700000000000000000)
	for _, r := range []Record{
		{Kind: KindWrite, Volume: "disk0", Offset: 4096, Data: []byte("hello"), Seq: 7, HasSeq: true, Time: t0},
		{Kind: KindZero, Volume: "d", Offset: 0, Length: 512, Time: t0},
		{Kind: KindDiscard, Volume: "d", Offset: 512, Length: 512, Time: t0},
		{Kind: KindVolume, Volume: "d", Size: 1 << 20, Time: t0},
		{Kind: KindCheckpoint, Checkpoint: "nightly", Time: t0},
		{Kind: KindResyncBegin, Time: t0},
		{Kind: KindResyncEnd, Seq: 9, HasSeq: true, Time: t0},
	} {
		f.Add(appendRecord(nil, &r))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < recHeaderLen {
			return
		}
		n, err := headerLen(b)
		if err != nil || n != len(b) {
			return
		}
		r, err := decodeRecord(b)
		if err != nil {
			return
		}
		if got := appendRecord(nil, &r); !bytes.Equal(got, b) {
			t.Fatalf("decode/encode differs:\n%x\n%x", b, got)
		}
	})
}
