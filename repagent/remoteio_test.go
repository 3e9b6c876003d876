package repagent

import (
	"bytes"
	"net"
	"os"
	"testing"
	"time"
)

// fakeHub accepts one agent connection and answers its HELLO.
func fakeHub(t *testing.T) (net.Listener, func() (net.Conn, *Reader, *ReportVolumes)) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accept := func() (net.Conn, *Reader, *ReportVolumes) {
		nc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		nc.SetDeadline(time.Now().Add(20 * time.Second))
		r := NewReader(nc, 0)
		if m := next(t, r); m.Cmd() != CmdHello {
			t.Fatalf("first frame %s", m.Cmd())
		}
		nc.Write(AppendFrame(nil, &Hello{Reply: true, MaxVersion: 1, Name: "fake"}))
		rep, ok := next(t, r).(*ReportVolumes)
		if !ok {
			t.Fatalf("no volume report")
		}
		return nc, r, rep
	}
	return ln, accept
}

// next returns the next frame that is not a heartbeat.
func next(t *testing.T, r *Reader) Message {
	t.Helper()
	for {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		m, err := Decode(f)
		if err != nil {
			t.Fatal(err)
		}
		if m.Cmd() != CmdHeartbeat {
			return m
		}
	}
}

// TestRemoteIO: reads on any reported volume, writes only where allowed,
// and a bad request closes the connection.
func TestRemoteIO(t *testing.T) {
	r := newRig(t)
	ro := r.addVolume("plain", 1<<20)
	rw := r.addVolume("recovery", 1<<20)
	os.WriteFile(ro.backing, pattern(5, 1<<20), 0o600)
	ln, accept := fakeHub(t)
	r.addr = ln.Addr().String()
	r.startAgent(map[*rigVol]VolumeOptions{ro: {}, rw: {AllowRemoteWrite: true}})
	nc, rd, rep := accept()
	if len(rep.Volumes) != 2 || rep.Volumes[0].Protect || !rep.Volumes[1].RemoteWrite || rep.Volumes[0].Sectors != 2048 {
		t.Fatalf("report %+v", rep.Volumes)
	}
	send := func(m Message) { nc.Write(AppendFrame(nil, m)) }
	send(&StartProtect{Volume: 1, Name: "plain"})
	send(&StartProtect{Volume: 2, Name: "recovery"})
	send(&RemoteIOReq{ID: 1, Volume: 1, Sector: 8, Sectors: 16})
	res := next(t, rd).(*RemoteIORes)
	if res.ID != 1 || res.Status != StatusOK || !bytes.Equal(res.Data[0], pattern(5, 1<<20)[8*512:24*512]) {
		t.Errorf("remote read: id %d status %d", res.ID, res.Status)
	}
	send(&RemoteIOReq{ID: 2, Volume: 2, Sector: 0, Sectors: 8})
	if res := next(t, rd).(*RemoteIORes); !res.Zero || res.Status != StatusOK {
		t.Errorf("read of zeros: %+v", res)
	}
	send(&RemoteIOReq{ID: 3, Volume: 1, Sector: 0, Sectors: 1, Write: true, Data: [][]byte{make([]byte, 512)}})
	if res := next(t, rd).(*RemoteIORes); res.Status != StatusDenied {
		t.Errorf("remote write without allow-remote-write: status %d", res.Status)
	}
	data := pattern(6, 4096)
	send(&RemoteIOReq{ID: 4, Volume: 2, Sector: 16, Sectors: 8, Write: true, Data: [][]byte{data}})
	if res := next(t, rd).(*RemoteIORes); res.Status != StatusOK {
		t.Errorf("allowed remote write: status %d", res.Status)
	}
	got := make([]byte, 4096)
	if err := rw.client.ReadAt(testContext(t), 0, got, 16); err != nil || !bytes.Equal(got, data) {
		t.Errorf("the guest does not see the remote write: %v", err)
	}
	// Outside the volume: the agent closes the connection.
	send(&RemoteIOReq{ID: 5, Volume: 1, Sector: 2040, Sectors: 16})
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		if _, err := rd.ReadFrame(); err != nil {
			break
		}
	}
	// And reconnects.
	nc2, _, _ := accept()
	nc2.Close()
}

// TestHubRefusesBadFrames: an agent that breaks the protocol is
// disconnected; the hub goes on serving.
func TestHubRefusesBadFrames(t *testing.T) {
	r := newRig(t)
	r.startHub()
	dial := func() (net.Conn, *Reader) {
		nc, err := net.Dial("tcp", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		return nc, NewReader(nc, 0)
	}
	closed := func(nc net.Conn, rd *Reader) bool {
		for {
			if _, err := rd.ReadFrame(); err != nil {
				return true
			}
		}
	}
	hello := AppendFrame(nil, &Hello{MaxVersion: 1, Session: 1, Name: "vm1"})
	cases := map[string][]byte{
		"garbage":            []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		"write before hello": AppendFrame(nil, &StopProtect{Volume: 1}),
		"unknown volume":     append(append([]byte{}, hello...), AppendFrame(nil, &ProtectedWrite{Seq: 1, Volume: 9, Sector: 0, Sectors: 1, Zeroes: true})...),
		"hub command":        append(append([]byte{}, hello...), AppendFrame(nil, &WriteAck{Seq: 1})...),
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
	nc.Write(AppendFrame(nil, &ReportVolumes{Volumes: []VolumeInfo{{Name: "root", Sectors: 64, Protect: true}}}))
	nc.Write(AppendFrame(nil, &DirtyMap{Seq: 1, Volume: 1, Initial: true, RegionSectors: 8}))
	nc.Write(AppendFrame(nil, &ProtectedWrite{Seq: 2, Volume: 1, Sector: 60, Sectors: 8, Zeroes: true}))
	if !closed(nc, rd) {
		t.Errorf("write past the end: connection kept")
	}
}
