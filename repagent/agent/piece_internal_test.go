package agent

import (
	"testing"

	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestPieceLen: the sender's vectored writes keep a frame's header with its
// data (a 1 MiB write is one writev, not a header alone and then the data),
// cover the whole batch in order, and stay near writePiece bytes each so a
// write deadline bounds a stall, not a whole large backlog.
func TestPieceLen(t *testing.T) {
	hdr := make([]byte, 48)
	mib := make([]byte, 1<<20)
	maxData := make([]byte, wire.MaxIOSectors*wire.SectorSize)
	small := make([]byte, 4096)
	for _, tc := range []struct {
		name   string
		bufs   [][]byte
		pieces []int
	}{
		{"one 1 MiB write", [][]byte{hdr, mib}, []int{2}},
		{"a largest write", [][]byte{hdr, maxData}, []int{2}},
		{"two 1 MiB writes", [][]byte{hdr, mib, hdr, mib}, []int{2, 2}},
		{"headers only", [][]byte{hdr}, []int{1}},
		{"one huge buffer", [][]byte{maxData, hdr, small}, []int{1, 2}},
		{"many 4 KiB writes", repeat([][]byte{hdr, small}, 200), []int{400}},
		// 254 writes of 4144 bytes reach 1 MiB.
		{"a backlog of 4 KiB writes", repeat([][]byte{hdr, small}, 600), []int{508, 508, 184}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []int
			for bufs := tc.bufs; len(bufs) > 0; {
				n := pieceLen(bufs)
				if n < 1 || n > len(bufs) {
					t.Fatalf("pieceLen = %d of %d buffers", n, len(bufs))
				}
				size := 0
				for _, b := range bufs[:n-1] {
					size += len(b)
				}
				if size >= writePiece {
					t.Fatalf("a piece goes on after %d bytes (writePiece %d)", size, writePiece)
				}
				got = append(got, n)
				bufs = bufs[n:]
			}
			if len(got) != len(tc.pieces) {
				t.Fatalf("pieces %v, want %v", got, tc.pieces)
			}
			for i := range got {
				if got[i] != tc.pieces[i] {
					t.Fatalf("pieces %v, want %v", got, tc.pieces)
				}
			}
		})
	}
	if n := pieceLen(nil); n != 0 {
		t.Fatalf("pieceLen(nil) = %d", n)
	}
}

func repeat(b [][]byte, n int) [][]byte {
	var out [][]byte
	for range n {
		out = append(out, b...)
	}
	return out
}
