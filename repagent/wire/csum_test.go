package wire

import (
	"strings"
	"testing"
)

// TestCsumFrameValidation: hostile CSUM_REQ and CSUM_RES frames are
// refused as malformed (the receiver closes that connection), whatever
// their counts and lengths claim, without allocating for them.
func TestCsumFrameValidation(t *testing.T) {
	sum := make([]byte, CsumSize)
	alg := []byte{AlgSHA256, 0, 0, 0}
	tests := []struct {
		name  string
		frame []byte
		want  string
	}{
		{"req seq 0", frame(CmdCsumReq, 0, 0, payload(uint64(1), uint64(0), uint32(8), uint32(8), alg)), "sequence number 0"},
		{"req flags", frame(CmdCsumReq, 1, 1, payload(uint64(1), uint64(0), uint32(8), uint32(8), alg)), "unknown flags"},
		{"req short", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(0))), "payload ends in sectors"},
		{"req volume 0", frame(CmdCsumReq, 0, 1, payload(uint64(0), uint64(0), uint32(8), uint32(8), alg)), "volume id 0"},
		{"req zero sectors", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(0), uint32(0), uint32(8), alg)), "zero sectors"},
		{"req too long", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(0), uint32(MaxIOSectors+1), uint32(8), alg)), "more than 16384"},
		{"req overflow", frame(CmdCsumReq, 0, 1, payload(uint64(1), ^uint64(0)-3, uint32(8), uint32(8), alg)), "out of range"},
		{"req region size", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(0), uint32(8), uint32(12), alg)), "power of two"},
		{"req region 0", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(0), uint32(8), uint32(0), alg)), "power of two"},
		{"req unaligned", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(9), uint32(8), uint32(8), alg)), "region boundary"},
		{"req alg", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(0), uint32(8), uint32(8), []byte{7, 0, 0, 0})), "unknown checksum algorithm 7"},
		{"req pad", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(0), uint32(8), uint32(8), []byte{1, 0, 1, 0})), "padding"},
		{"req trailing", frame(CmdCsumReq, 0, 1, payload(uint64(1), uint64(0), uint32(8), uint32(8), alg, byte(0))), "1 trailing"},
		{"res seq 0", frame(CmdCsumRes, 0, 0, payload(uint64(1), uint32(0), alg, uint64(5), uint32(1), sum, byte(0))), "sequence number 0"},
		{"res volume 0", frame(CmdCsumRes, 0, 1, payload(uint64(0), uint32(0), alg, uint64(5), uint32(1), sum, byte(0))), "volume id 0"},
		{"res too many", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0), alg, uint64(5), uint32(MaxCsumRegions+1))), "more than 2048"},
		{"res huge count", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0), alg, uint64(5), ^uint32(0))), "checksums, more than"},
		{"res count vs bytes", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0), alg, uint64(5), uint32(2), sum, byte(0))), "2 checksums in 33 bytes"},
		{"res no bits", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0), alg, uint64(5), uint32(1), sum)), "1 checksums in 32 bytes"},
		{"res stray bits", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0), alg, uint64(5), uint32(1), sum, byte(2))), "dirty bits set past"},
		{"res sums on error", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(1), alg, uint64(0), uint32(1), sum, byte(0))), "with status 1"},
		{"res empty ok", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0), alg, uint64(5), uint32(0))), "no checksums or point 0"},
		{"res point 0", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0), alg, uint64(0), uint32(1), sum, byte(0))), "no checksums or point 0"},
		{"res alg", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0), []byte{2, 0, 0, 0}, uint64(5), uint32(1), sum, byte(0))), "unknown checksum algorithm"},
		{"res short", frame(CmdCsumRes, 0, 1, payload(uint64(1), uint32(0))), "payload ends in algorithm"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := ParseHeader(tt.frame[:HeaderSize], DefaultMaxPayload)
			var m Message
			if err == nil {
				m, err = Decode(Frame{Header: f, Payload: tt.frame[HeaderSize:]})
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v (%v), want an error containing %q", err, m, tt.want)
			}
		})
	}
}

// TestOldPeerRefusesCsum: a peer of protocol level 1 knows commands up to
// 13 only (and level 2 no CHANGED flag: level 3); the frame header keeps version 1 so that it reads everything
// else, and a level-2 side never sends it CSUM_REQ (the hub checks the
// agent's HELLO first). This pins the numbers an old reader refuses.
func TestOldPeerRefusesCsum(t *testing.T) {
	if Version != 1 || MaxVersion != 3 || CmdCsumReq != 14 || CmdCsumRes != 15 {
		t.Fatalf("frame version %d, level %d, commands %d %d: PROTOCOL.md's numbers changed", Version, MaxVersion, CmdCsumReq, CmdCsumRes)
	}
	if CmdCsumReq.String() != "CSUM_REQ" || CmdCsumRes.String() != "CSUM_RES" {
		t.Fatal(CmdCsumReq.String(), CmdCsumRes.String())
	}
}
