package agent_test

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestStartProtectCrossesDetach: a START_PROTECT for a volume detached
// since a report named it crossed the report that drops it (a reload
// replaced or removed the export): the agent ignores it and keeps the
// connection; a volume attached again under that name takes the id of
// the last START_PROTECT; remote IO and checksums for the id of a
// detached volume fail without ending the connection. One naming a
// volume no report carried still closes the connection.
func TestStartProtectCrossesDetach(t *testing.T) {
	r := reptest.New(t)
	gone := r.AddVolume("gone", 1<<20)
	kept := r.AddVolume("kept", 1<<20)
	os.WriteFile(kept.Backing, reptest.Pattern(5, 1<<20), 0o600)
	ln, accept := fakeHub(t)
	r.Addr = ln.Addr().String()
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{gone: {}, kept: {Protect: true}})
	nc, rd, rep := accept()
	if len(rep.Volumes) != 2 {
		t.Fatalf("report %+v", rep.Volumes)
	}
	send := func(m wire.Message) { nc.Write(wire.AppendFrame(nil, m)) }

	// The export goes while the hub answers the report that named it.
	r.Agent.Detach("gone")
	send(&wire.StartProtect{Volume: 1, Name: "gone"})
	if rep, ok := next(t, rd).(*wire.ReportVolumes); !ok || len(rep.Volumes) != 1 || rep.Volumes[0].Name != "kept" {
		t.Fatalf("after the detach: %+v, want a report of kept alone", rep)
	}
	// Remote IO and checksums for it, sent before the hub read the
	// report, fail; the connection goes on.
	send(&wire.RemoteIOReq{ID: 9, Volume: 1, Sector: 0, Sectors: 8})
	if res, ok := next(t, rd).(*wire.RemoteIORes); !ok || res.ID != 9 || res.Status != wire.StatusIOError {
		t.Fatalf("remote read of the detached volume: %+v, want an I/O error", res)
	}
	send(&wire.CsumReq{ID: 10, Volume: 1, Sector: 0, Sectors: 8, RegionSectors: 8, Alg: wire.AlgSHA256})
	if res, ok := next(t, rd).(*wire.CsumRes); !ok || res.ID != 10 || res.Status != wire.StatusIOError {
		t.Fatalf("checksums of the detached volume: %+v, want an I/O error", res)
	}
	// The other volume is served.
	send(&wire.StartProtect{Volume: 2, Name: "kept"})
	send(&wire.RemoteIOReq{ID: 1, Volume: 2, Sector: 8, Sectors: 16})
	if res, ok := next(t, rd).(*wire.RemoteIORes); !ok || res.ID != 1 || res.Status != wire.StatusOK {
		t.Fatalf("remote read after the crossing START_PROTECT: %+v", res)
	}

	// The export comes back (unprotected now): the START_PROTECTs meant
	// for its predecessor may still come first; the last one is its own.
	if _, err := r.Agent.Attach("gone", gone.Dev, agent.VolumeOptions{AllowRemoteWrite: true}); err != nil {
		t.Fatal(err)
	}
	if rep, ok := next(t, rd).(*wire.ReportVolumes); !ok || len(rep.Volumes) != 2 {
		t.Fatalf("after the attach: %+v, want a report of both", rep)
	}
	send(&wire.StartProtect{Volume: 1, Name: "gone", Mirror: true})
	send(&wire.StartProtect{Volume: 1, Name: "gone"})
	send(&wire.StartProtect{Volume: 4, Name: "gone"})
	send(&wire.RemoteIOReq{ID: 2, Volume: 4, Sector: 0, Sectors: 8})
	if res, ok := next(t, rd).(*wire.RemoteIORes); !ok || res.ID != 2 || res.Status != wire.StatusOK {
		t.Fatalf("remote read of the attached volume under its own id: %+v", res)
	}

	// A name no report carried breaks the protocol.
	send(&wire.StartProtect{Volume: 3, Name: "never"})
	waitClosed(t, nc, rd, "START_PROTECT of a volume never reported")
	nc2, _, _ := accept()
	nc2.Close()
}

// TestReattachStartsProtection: a protected volume detached and attached
// again before the next report (a reload replaced its export) is dropped
// and reported anew, so that the hub starts protecting the new one under
// a new id; it took it for the old one and never started it.
func TestReattachStartsProtection(t *testing.T) {
	r := reptest.New(t)
	v := r.AddVolume("a", 1<<20)
	r.StartHub()
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(20*time.Second, v)
	id := r.Agent.Status().Volumes[0].ID
	for round := range 5 {
		r.Agent.Detach("a")
		if _, err := r.Agent.Attach("a", v.Dev, agent.VolumeOptions{Protect: true}); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			st := r.Agent.Status()
			if len(st.Volumes) == 1 && st.Volumes[0].Mirroring && st.Volumes[0].ID != id {
				id = st.Volumes[0].ID
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the re-attached volume is not mirrored under a new id (was %d): agent %+v\nhub %+v", round, id, st, r.Hub.Status())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if c := r.Agent.Status().Connects; c != 1 {
		t.Errorf("the agent connected %d times, want 1", c)
	}
}

// TestDetachSendsQueuedWritesFirst: a protected export deleted while its
// writes are queued (a reload that removes it) is reported gone only
// after them: the hub answered writes for a volume id it had dropped with
// "unknown volume" and the connection was lost, the other volumes' queue
// with it.
func TestDetachSendsQueuedWritesFirst(t *testing.T) {
	r := reptest.New(t)
	gone := r.AddVolume("gone", 4<<20)
	r.AddVolume("kept", 1<<20)
	ln, accept := fakeHub(t)
	r.Addr = ln.Addr().String()
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{gone: {Protect: true}, r.Vols[1]: {}})
	nc, rd, _ := accept()
	nc.Write(wire.AppendFrame(nil, &wire.StartProtect{Volume: 7, Name: "gone", Mirror: true}))
	nc.Write(wire.AppendFrame(nil, &wire.StartProtect{Volume: 8, Name: "kept"}))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, gone)
	defer func() { close(stop); wait() }()
	// Mirrored writes flow; the hub acknowledges none, so some are
	// queued behind the ones sent when the export goes.
	for n := 0; n < 50; {
		if pw, ok := next(t, rd).(*wire.ProtectedWrite); ok && pw.Volume == 7 {
			n++
		}
	}
	r.Agent.Detach("gone")
	reported := false
	// The agent gives a hub that never answers a heartbeat up after
	// about a second; what follows the report comes well before.
	nc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	for {
		f, err := rd.ReadFrame()
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		m, err := wire.Decode(f)
		if err != nil {
			t.Fatal(err)
		}
		switch m := m.(type) {
		case *wire.ReportVolumes:
			if len(m.Volumes) != 1 || m.Volumes[0].Name != "kept" {
				t.Fatalf("report %+v, want kept alone", m.Volumes)
			}
			reported = true
		case *wire.ProtectedWrite:
			if reported && m.Volume == 7 {
				t.Fatalf("a write of the deleted volume (seq %d) came after the report that drops it", m.Seq)
			}
		}
	}
	if !reported {
		t.Fatal("no report after the detach")
	}
}

// TestStartProtectForPredecessor: with report generations (protocol level
// 3) the agent tells which report a START_PROTECT answers. A protected
// volume replaced (detached and attached again) while the hub was
// answering the report that carried its predecessor gets that answer
// first — with MIRROR — then its own: the first is ignored and the
// volume mirrors under its own id. (Without generations the first made
// it mirror under the predecessor's id, and its own then broke the
// connection.)
func TestStartProtectForPredecessor(t *testing.T) {
	r := reptest.New(t)
	a := r.AddVolume("a", 1<<20)
	ln, accept := fakeHubLevel(t, wire.MaxVersion)
	r.Addr = ln.Addr().String()
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{a: {Protect: true}})
	nc, rd, rep := accept()
	if rep.Gen == 0 || len(rep.Volumes) != 1 {
		t.Fatalf("first report %+v: want a generation and volume a", rep)
	}
	first := rep.Gen
	send := func(m wire.Message) { nc.Write(wire.AppendFrame(nil, m)) }

	// The export is replaced before the hub answers the first report.
	r.Agent.Detach("a")
	if _, err := r.Agent.Attach("a", a.Dev, agent.VolumeOptions{Protect: true}); err != nil {
		t.Fatal(err)
	}
	drop, ok := next(t, rd).(*wire.ReportVolumes)
	if !ok || len(drop.Volumes) != 0 || drop.Gen <= first {
		t.Fatalf("after the replacement: %+v, want a report without a, a later generation", drop)
	}
	again, ok := next(t, rd).(*wire.ReportVolumes)
	if !ok || len(again.Volumes) != 1 || again.Gen <= drop.Gen {
		t.Fatalf("then: %+v, want a report of a, a later generation", again)
	}
	// The hub's answers, in its order: the first report's, then the last's.
	send(&wire.StartProtect{Volume: 1, Name: "a", Mirror: true, Gen: first})
	send(&wire.StartProtect{Volume: 2, Name: "a", Mirror: true, Gen: again.Gen})
	dm, ok := next(t, rd).(*wire.DirtyMap)
	if !ok || !dm.Initial || dm.Volume != 2 {
		t.Fatalf("first frame after the answers: %+v, want the initial DIRTY_MAP of volume id 2", dm)
	}
	// A remote read for the predecessor's id fails alone; the volume's
	// own id is served.
	send(&wire.RemoteIOReq{ID: 1, Volume: 1, Sector: 0, Sectors: 8})
	if res, ok := next(t, rd).(*wire.RemoteIORes); !ok || res.ID != 1 || res.Status != wire.StatusIOError {
		t.Fatalf("remote read under the predecessor's id: %+v, want an I/O error", res)
	}
	send(&wire.RemoteIOReq{ID: 2, Volume: 2, Sector: 0, Sectors: 8})
	if res, ok := next(t, rd).(*wire.RemoteIORes); !ok || res.ID != 2 || res.Status != wire.StatusOK {
		t.Fatalf("remote read under the volume's id: %+v", res)
	}
	// An answer to a report never sent breaks the protocol.
	send(&wire.StartProtect{Volume: 3, Name: "a", Gen: again.Gen + 5})
	waitClosed(t, nc, rd, "START_PROTECT answering a report never sent")
	nc2, _, _ := accept()
	nc2.Close()
	if c := r.Agent.Status().Connects; c != 2 {
		t.Errorf("the agent connected %d times, want 2 (the broken one, then again)", c)
	}
}

// waitClosed reads the agent's frames until it closes the connection,
// failing if it keeps it open for 10 s after what.
func waitClosed(t *testing.T, nc net.Conn, rd *wire.Reader, what string) {
	t.Helper()
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		_, err := rd.ReadFrame()
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("%s: the agent kept the connection", what)
		}
		if err != nil {
			return
		}
	}
}
