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

// TestReportGenerations: an agent of protocol level 3 numbers its reports;
// the hub's START_PROTECT names the report it answers, and a report whose
// generation does not increase (or any generation from an agent below
// level 3) closes the connection.
func TestReportGenerations(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	dial := func(level uint16) (net.Conn, *wire.Reader, func(wire.Message)) {
		nc, err := net.Dial("tcp", r.Addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		nc.SetDeadline(time.Now().Add(20 * time.Second))
		send := func(m wire.Message) { nc.Write(wire.AppendFrame(nil, m)) }
		send(&wire.Hello{MaxVersion: level, Session: 1, Name: "vm-gen"})
		return nc, wire.NewReader(nc, 0), send
	}
	// nextCmd returns the next frame of the hub that is not HELLO or a
	// heartbeat, or nil once the connection is closed.
	nextCmd := func(rd *wire.Reader) wire.Message {
		for {
			f, err := rd.ReadFrame()
			if err != nil {
				return nil
			}
			m, err := wire.Decode(f)
			if err != nil {
				t.Fatal(err)
			}
			if c := m.Cmd(); c != wire.CmdHello && c != wire.CmdHeartbeat {
				return m
			}
		}
	}
	_, rd, send := dial(3)
	send(&wire.ReportVolumes{Gen: 4, Volumes: []wire.VolumeInfo{{Name: "disk", Sectors: 64}}})
	if sp, ok := nextCmd(rd).(*wire.StartProtect); !ok || sp.Gen != 4 || sp.Name != "disk" {
		t.Fatalf("answer to report 4: %+v", sp)
	}
	send(&wire.ReportVolumes{Gen: 9, Volumes: []wire.VolumeInfo{{Name: "disk", Sectors: 64}, {Name: "more", Sectors: 64}}})
	if sp, ok := nextCmd(rd).(*wire.StartProtect); !ok || sp.Gen != 9 || sp.Name != "more" {
		t.Fatalf("answer to report 9: %+v", sp)
	}
	send(&wire.ReportVolumes{Gen: 9, Volumes: []wire.VolumeInfo{{Name: "disk", Sectors: 64}}})
	if m := nextCmd(rd); m != nil {
		t.Fatalf("a report repeating generation 9: the hub answered %+v, want the connection closed", m)
	}

	_, rd, send = dial(2)
	send(&wire.ReportVolumes{Gen: 1, Volumes: []wire.VolumeInfo{{Name: "disk", Sectors: 64}}})
	if m := nextCmd(rd); m != nil {
		t.Fatalf("a generation from a level-2 agent: the hub answered %+v, want the connection closed", m)
	}
	_, rd, send = dial(2)
	send(&wire.ReportVolumes{Volumes: []wire.VolumeInfo{{Name: "disk", Sectors: 64}}})
	if sp, ok := nextCmd(rd).(*wire.StartProtect); !ok || sp.Gen != 0 {
		t.Fatalf("answer to a level-2 report: %+v, want generation 0", sp)
	}
}
