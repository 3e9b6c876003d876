package agent_test

import (
	"bytes"
	"net"
	"os"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// fakeHub accepts one agent connection and answers its HELLO.
func fakeHub(t *testing.T) (net.Listener, func() (net.Conn, *wire.Reader, *wire.ReportVolumes)) {
	return fakeHubLevel(t, 1)
}

// fakeHubLevel is fakeHub answering HELLO with protocol level level.
func fakeHubLevel(t *testing.T, level uint16) (net.Listener, func() (net.Conn, *wire.Reader, *wire.ReportVolumes)) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accept := func() (net.Conn, *wire.Reader, *wire.ReportVolumes) {
		nc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		nc.SetDeadline(time.Now().Add(20 * time.Second))
		r := wire.NewReader(nc, 0)
		if m := next(t, r); m.Cmd() != wire.CmdHello {
			t.Fatalf("first frame %s", m.Cmd())
		}
		nc.Write(wire.AppendFrame(nil, &wire.Hello{Reply: true, MaxVersion: level, Name: "fake"}))
		rep, ok := next(t, r).(*wire.ReportVolumes)
		if !ok {
			t.Fatalf("no volume report")
		}
		return nc, r, rep
	}
	return ln, accept
}

// next returns the next frame that is not a heartbeat.
func next(t *testing.T, r *wire.Reader) wire.Message {
	t.Helper()
	for {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		m, err := wire.Decode(f)
		if err != nil {
			t.Fatal(err)
		}
		if m.Cmd() != wire.CmdHeartbeat {
			return m
		}
	}
}

// TestRemoteIO: reads only on protected volumes (or those the hub may
// write), writes only where allowed, and a bad request closes the
// connection.
func TestRemoteIO(t *testing.T) {
	r := reptest.New(t)
	ro := r.AddVolume("prot", 1<<20)
	rw := r.AddVolume("recovery", 1<<20)
	un := r.AddVolume("plain", 1<<20)
	os.WriteFile(ro.Backing, reptest.Pattern(5, 1<<20), 0o600)
	os.WriteFile(un.Backing, reptest.Pattern(7, 1<<20), 0o600)
	ln, accept := fakeHub(t)
	r.Addr = ln.Addr().String()
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{ro: {Protect: true}, rw: {AllowRemoteWrite: true}, un: {}})
	nc, rd, rep := accept()
	if len(rep.Volumes) != 3 || !rep.Volumes[0].Protect || !rep.Volumes[1].RemoteWrite || rep.Volumes[2].Protect || rep.Volumes[0].Sectors != 2048 {
		t.Fatalf("report %+v", rep.Volumes)
	}
	send := func(m wire.Message) { nc.Write(wire.AppendFrame(nil, m)) }
	send(&wire.StartProtect{Volume: 1, Name: "prot"})
	send(&wire.StartProtect{Volume: 2, Name: "recovery"})
	send(&wire.StartProtect{Volume: 3, Name: "plain"})
	send(&wire.RemoteIOReq{ID: 1, Volume: 1, Sector: 8, Sectors: 16})
	res := next(t, rd).(*wire.RemoteIORes)
	if res.ID != 1 || res.Status != wire.StatusOK || !bytes.Equal(res.Data[0], reptest.Pattern(5, 1<<20)[8*512:24*512]) {
		t.Errorf("remote read: id %d status %d", res.ID, res.Status)
	}
	// A volume deliberately left unprotected is not the hub's to read.
	send(&wire.RemoteIOReq{ID: 9, Volume: 3, Sector: 8, Sectors: 16})
	if res := next(t, rd).(*wire.RemoteIORes); res.ID != 9 || res.Status != wire.StatusDenied || len(res.Data) != 0 {
		t.Errorf("remote read of an unprotected volume: id %d status %d, %d data buffers", res.ID, res.Status, len(res.Data))
	}
	send(&wire.RemoteIOReq{ID: 2, Volume: 2, Sector: 0, Sectors: 8})
	if res := next(t, rd).(*wire.RemoteIORes); !res.Zero || res.Status != wire.StatusOK {
		t.Errorf("read of zeros: %+v", res)
	}
	send(&wire.RemoteIOReq{ID: 3, Volume: 1, Sector: 0, Sectors: 1, Write: true, Data: [][]byte{make([]byte, 512)}})
	if res := next(t, rd).(*wire.RemoteIORes); res.Status != wire.StatusDenied {
		t.Errorf("remote write without allow-remote-write: status %d", res.Status)
	}
	data := reptest.Pattern(6, 4096)
	send(&wire.RemoteIOReq{ID: 4, Volume: 2, Sector: 16, Sectors: 8, Write: true, Data: [][]byte{data}})
	if res := next(t, rd).(*wire.RemoteIORes); res.Status != wire.StatusOK {
		t.Errorf("allowed remote write: status %d", res.Status)
	}
	got := make([]byte, 4096)
	if err := rw.Client.ReadAt(reptest.Context(t), 0, got, 16); err != nil || !bytes.Equal(got, data) {
		t.Errorf("the guest does not see the remote write: %v", err)
	}
	// Outside the volume: the agent closes the connection.
	send(&wire.RemoteIOReq{ID: 5, Volume: 1, Sector: 2040, Sectors: 16})
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
