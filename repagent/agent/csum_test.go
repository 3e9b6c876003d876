package agent_test

import (
	"os"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestCsumRequests: the agent hashes protected volumes region by region
// and names the point of its write order (every frame below it sent
// first); it refuses unprotected volumes, and a hostile request (unknown
// volume, range outside it, bad encoding) closes that connection, after
// which the agent reconnects.
func TestCsumRequests(t *testing.T) {
	r := reptest.New(t)
	pv := r.AddVolume("prot", 1<<20)
	un := r.AddVolume("plain", 1<<20)
	src := reptest.Pattern(5, 1<<20)
	os.WriteFile(pv.Backing, src, 0o600)
	ln, accept := fakeHub(t)
	r.Addr = ln.Addr().String()
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{pv: {Protect: true}, un: {}})
	nc, rd, _ := accept()
	send := func(m wire.Message) { nc.Write(wire.AppendFrame(nil, m)) }
	send(&wire.StartProtect{Volume: 1, Name: "prot", Mirror: true})
	send(&wire.StartProtect{Volume: 2, Name: "plain"})
	dm, ok := next(t, rd).(*wire.DirtyMap)
	if !ok || !dm.Initial {
		t.Fatalf("want the initial dirty map, got %#v", dm)
	}
	// 300 sectors at 256 in regions of 128: 3 checksums, the last of 44
	// sectors.
	send(&wire.CsumReq{ID: 7, Volume: 1, Sector: 256, Sectors: 300, RegionSectors: 128, Alg: wire.AlgSHA256})
	res, ok := next(t, rd).(*wire.CsumRes)
	if !ok || res.ID != 7 || res.Status != wire.StatusOK || len(res.Sums) != 3 {
		t.Fatalf("checksums: %#v", res)
	}
	if res.Point <= dm.Seq {
		t.Errorf("point %d is not after the initial dirty map's sequence %d", res.Point, dm.Seq)
	}
	for i, want := range []struct{ off, n int }{{256, 128}, {384, 128}, {512, 44}} {
		if res.Sums[i] != wire.Checksum(src[want.off*512:(want.off+want.n)*512]) || res.Dirty[i] {
			t.Errorf("region %d: wrong checksum or dirty %v", i, res.Dirty[i])
		}
	}
	send(&wire.CsumReq{ID: 8, Volume: 2, Sector: 0, Sectors: 8, RegionSectors: 8, Alg: wire.AlgSHA256})
	if res, ok := next(t, rd).(*wire.CsumRes); !ok || res.Status != wire.StatusDenied || len(res.Sums) != 0 {
		t.Errorf("checksums of an unprotected volume: %#v", res)
	}
	hostile := map[string][]byte{
		"unknown volume": wire.AppendFrame(nil, &wire.CsumReq{ID: 9, Volume: 5, Sector: 0, Sectors: 8, RegionSectors: 8, Alg: wire.AlgSHA256}),
		"past the end":   wire.AppendFrame(nil, &wire.CsumReq{ID: 9, Volume: 1, Sector: 2040, Sectors: 16, RegionSectors: 8, Alg: wire.AlgSHA256}),
		"bad algorithm": func() []byte {
			b := wire.AppendFrame(nil, &wire.CsumReq{ID: 9, Volume: 1, Sector: 0, Sectors: 8, RegionSectors: 8, Alg: wire.AlgSHA256})
			b[wire.HeaderSize+24] = 9
			return b
		}(),
		"answer from a hub": wire.AppendFrame(nil, &wire.CsumRes{ID: 9, Volume: 1, Alg: wire.AlgSHA256, Point: 1, Sums: make([][wire.CsumSize]byte, 1), Dirty: []bool{false}}),
	}
	for name, b := range hostile {
		nc.Write(b)
		nc.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			if _, err := rd.ReadFrame(); err != nil {
				break
			}
		}
		var rep *wire.ReportVolumes
		nc, rd, rep = accept()
		if len(rep.Volumes) != 2 {
			t.Fatalf("%s: after reconnecting, report %+v", name, rep)
		}
		send(&wire.StartProtect{Volume: 1, Name: "prot", Mirror: true})
		if dm, ok := next(t, rd).(*wire.DirtyMap); !ok || !dm.Initial {
			t.Fatalf("%s: want the initial dirty map, got %#v", name, dm)
		}
	}
}
