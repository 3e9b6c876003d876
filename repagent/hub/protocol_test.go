package hub_test

import (
	"net"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestHubRefusesBadFrames: an agent that breaks the protocol is
// disconnected; the hub goes on serving.
func TestHubRefusesBadFrames(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	dial := func() (net.Conn, *wire.Reader) {
		nc, err := net.Dial("tcp", r.Addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		return nc, wire.NewReader(nc, 0)
	}
	closed := func(nc net.Conn, rd *wire.Reader) bool {
		for {
			if _, err := rd.ReadFrame(); err != nil {
				return true
			}
		}
	}
	hello := wire.AppendFrame(nil, &wire.Hello{MaxVersion: 1, Session: 1, Name: "vm1"})
	cases := map[string][]byte{
		"garbage":            []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		"write before hello": wire.AppendFrame(nil, &wire.StopProtect{Volume: 1}),
		"unknown volume":     append(append([]byte{}, hello...), wire.AppendFrame(nil, &wire.ProtectedWrite{Seq: 1, Volume: 9, Sector: 0, Sectors: 1, Zeroes: true})...),
		"hub command":        append(append([]byte{}, hello...), wire.AppendFrame(nil, &wire.WriteAck{Seq: 1})...),
	}
	for name, b := range cases {
		nc, rd := dial()
		nc.Write(b)
		if !closed(nc, rd) {
			t.Errorf("%s: connection kept", name)
		}
	}
	// Out of range after a real report.
	nc, rd := dial()
	nc.Write(hello)
	nc.Write(wire.AppendFrame(nil, &wire.ReportVolumes{Volumes: []wire.VolumeInfo{{Name: "root", Sectors: 64, Protect: true}}}))
	nc.Write(wire.AppendFrame(nil, &wire.DirtyMap{Seq: 1, Volume: 1, Initial: true, RegionSectors: 8}))
	nc.Write(wire.AppendFrame(nil, &wire.ProtectedWrite{Seq: 2, Volume: 1, Sector: 60, Sectors: 8, Zeroes: true}))
	if !closed(nc, rd) {
		t.Errorf("write past the end: connection kept")
	}
}
