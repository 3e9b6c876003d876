package hub_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestOnlineVerify: a converged pair verifies with 0 mismatches, also
// while the guest keeps writing and the link is cut once (racing writes
// are compared at the same point of the write order on both sides); after regions of the replica
// are corrupted behind the hub's back, verify reports exactly those
// regions as byte ranges, and nothing was moved.
func TestOnlineVerify(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	v := r.AddVolume("root", 16<<20)
	r.StartAgent(reptest.ProtectAll(v))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, v)
	time.Sleep(time.Second)
	// Verify while the guest writes, across a link cut (the verify waits
	// for the agent to come back and the resync to finish, then asks for
	// the regions left).
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// The cut starts early: a verify of 16 MiB takes 0.2 s here, and a
	// cut after it ended would still be going on at the next verify.
	cut := make(chan struct{})
	go func() {
		defer close(cut)
		time.Sleep(50 * time.Millisecond)
		r.CutLink(500 * time.Millisecond)
	}()
	rep, err := r.Hub.Verify(ctx, hub.VerifyOptions{VM: "vm1"})
	close(stop)
	n := wait()
	<-cut
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Volumes) != 1 || rep.Volumes[0].Mismatches != 0 || rep.Volumes[0].VerifiedBytes+rep.Volumes[0].Skipped*64<<10 != 16<<20 {
		t.Fatalf("verify under %d writes: %+v", n, rep)
	}
	t.Logf("verify under %d guest writes: %d bytes compared, %d regions skipped, %.2fs", n, rep.Volumes[0].VerifiedBytes, rep.Volumes[0].Skipped, rep.Volumes[0].Seconds)
	r.WaitProtected(20*time.Second, v)
	r.CheckIdentical(v)
	remote := r.RemoteBytes(v)
	rep, err = r.Hub.Verify(ctx, hub.VerifyOptions{VM: "vm1", Volume: "root", Rate: 64 << 20})
	if err != nil || rep.Volumes[0].Mismatches != 0 || rep.Volumes[0].VerifiedBytes != 16<<20 || rep.Volumes[0].Skipped != 0 {
		t.Fatalf("verify of a converged pair: %+v, %v", rep, err)
	}

	// Corrupt the replica behind the hub's back: one byte of region 0,
	// 8 KiB inside region 80, 1000 bytes across regions 200 and 201,
	// and the last byte of the volume (region 255).
	img := filepath.Join(r.HubCfg.Store, "vm1", "root.img")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	const rb = 64 << 10
	for _, c := range []struct{ off, n int64 }{{100, 1}, {80*rb + 4096, 8192}, {200*rb + 65000, 1000}, {16<<20 - 1, 1}} {
		b := make([]byte, c.n)
		f.ReadAt(b, c.off)
		for i := range b {
			b[i] ^= 0x5a
		}
		if _, err := f.WriteAt(b, c.off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	rep, err = r.Hub.Verify(ctx, hub.VerifyOptions{VM: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	want := []hub.ByteRange{{Offset: 0, Length: rb}, {Offset: 80 * rb, Length: rb}, {Offset: 200 * rb, Length: 2 * rb}, {Offset: 255 * rb, Length: rb}}
	got := rep.Volumes[0]
	if got.Mismatches != 5 || got.MismatchBytes != 5*rb || !reflect.DeepEqual(got.MismatchRanges, want) {
		t.Errorf("verify after corruption: %d regions, %d bytes, ranges %+v; want 5 regions %+v", got.Mismatches, got.MismatchBytes, got.MismatchRanges, want)
	}
	st := r.HubVolumes()["root"]
	if st.VerifyRuns != 3 || st.VerifyMismatches != 5 || st.LastVerify == nil || st.LastVerify.Mismatches != 5 {
		t.Errorf("status: runs %d mismatches %d last %+v", st.VerifyRuns, st.VerifyMismatches, st.LastVerify)
	}
	if st.RemoteReadBytes != remote {
		t.Errorf("verify moved data: remote reads %d → %d bytes", remote, st.RemoteReadBytes)
	}
}

// TestVerifyRefusesAndHostileAnswers: verify needs a connected agent of
// protocol level 2; a CSUM_RES the hub did not ask for closes that
// connection and the hub goes on serving.
func TestVerifyRefusesAndHostileAnswers(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	ctx := reptest.Context(t)
	if _, err := r.Hub.Verify(ctx, hub.VerifyOptions{VM: "vm1"}); err == nil {
		t.Error("verify of an unknown vm: no error")
	}
	nc, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	rd := wire.NewReader(nc, 0)
	nc.Write(wire.AppendFrame(nil, &wire.Hello{MaxVersion: 1, Session: 1, Name: "vm2"}))
	nc.Write(wire.AppendFrame(nil, &wire.ReportVolumes{Volumes: []wire.VolumeInfo{{Name: "fake", Sectors: 64, Protect: true}}}))
	nc.Write(wire.AppendFrame(nil, &wire.DirtyMap{Seq: 1, Volume: 1, Initial: true, RegionSectors: 8}))
	deadline := time.Now().Add(10 * time.Second)
	for r.HubVolumes()["fake"].State != hub.StateSyncing && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	_, err = r.Hub.Verify(ctx, hub.VerifyOptions{VM: "vm2"})
	if err == nil || !strings.Contains(err.Error(), "protocol level 1") {
		t.Errorf("verify of a level-1 agent: %v", err)
	}
	nc.Write(wire.AppendFrame(nil, &wire.CsumRes{ID: 3, Volume: 1, Alg: wire.AlgSHA256, Point: 1, Sums: make([][wire.CsumSize]byte, 1), Dirty: []bool{false}}))
	for {
		if _, err := rd.ReadFrame(); err != nil {
			break
		}
	}
	if !closedWithin(nc, time.Second) {
		t.Error("unasked CSUM_RES: connection kept")
	}
	// The hub still serves.
	v := r.AddVolume("root", 1<<20)
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(20*time.Second, v)
}

// TestHubRefusesBadCsumAnswers: a level-2 agent whose CSUM_RES does not
// fit the request (checksum count, volume, a point past the frames it
// sent) loses its connection; the verify fails with an error, the hub
// goes on.
func TestHubRefusesBadCsumAnswers(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	ctx := reptest.Context(t)
	for name, bad := range map[string]func(q *wire.CsumReq) *wire.CsumRes{
		"count": func(q *wire.CsumReq) *wire.CsumRes {
			return &wire.CsumRes{ID: q.ID, Volume: q.Volume, Alg: q.Alg, Point: 2, Sums: make([][wire.CsumSize]byte, 2), Dirty: make([]bool, 2)}
		},
		"volume": func(q *wire.CsumReq) *wire.CsumRes {
			return &wire.CsumRes{ID: q.ID, Volume: q.Volume + 1, Alg: q.Alg, Point: 2, Sums: make([][wire.CsumSize]byte, 1), Dirty: make([]bool, 1)}
		},
		"point": func(q *wire.CsumReq) *wire.CsumRes {
			return &wire.CsumRes{ID: q.ID, Volume: q.Volume, Alg: q.Alg, Point: 1000, Sums: make([][wire.CsumSize]byte, 1), Dirty: make([]bool, 1)}
		},
	} {
		nc, err := net.Dial("tcp", r.Addr)
		if err != nil {
			t.Fatal(err)
		}
		nc.SetDeadline(time.Now().Add(20 * time.Second))
		rd := wire.NewReader(nc, 0)
		send := func(m wire.Message) { nc.Write(wire.AppendFrame(nil, m)) }
		send(&wire.Hello{MaxVersion: 2, Session: 1, Name: "vm3"})
		send(&wire.ReportVolumes{Volumes: []wire.VolumeInfo{{Name: "disk", Sectors: 64, Protect: true}}})
		errc := make(chan error, 1)
		started := false
		for {
			f, err := rd.ReadFrame()
			if err != nil {
				break
			}
			m, err := wire.Decode(f)
			if err != nil {
				t.Fatal(err)
			}
			switch m := m.(type) {
			case *wire.StartProtect:
				send(&wire.DirtyMap{Seq: 1, Volume: m.Volume, Initial: true, RegionSectors: 8})
			case *wire.RemoteIOReq:
				send(&wire.RemoteIORes{ID: m.ID, Volume: m.Volume, Sectors: m.Sectors, Zero: true})
			case *wire.CsumReq:
				send(bad(m))
			}
			if !started && r.HubVolumes()["disk"].State == hub.StateProtecting {
				started = true
				go func() {
					_, err := r.Hub.Verify(ctx, hub.VerifyOptions{VM: "vm3"})
					errc <- err
				}()
			}
		}
		nc.Close()
		if !started {
			t.Fatalf("%s: the fake agent never got protected", name)
		}
		if err := <-errc; err == nil {
			t.Errorf("%s: verify succeeded on a bad answer", name)
		}
	}
	v := r.AddVolume("root", 1<<20)
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(20*time.Second, v)
}

// TestVerifyAfterAgentRestart: a restarted agent numbers its writes from
// 1 again and the hub journals them above the VM's last sequence number;
// the agent's checksum point must be compared in the journal's numbering,
// or a write racing with the verify shows as a false mismatch.
func TestVerifyAfterAgentRestart(t *testing.T) {
	r := reptest.New(t)
	r.StartHub()
	v := r.AddVolume("root", 16<<20)
	r.StartAgent(reptest.ProtectAll(v))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, v)
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, v)
	if err := r.Agent.Close(); err != nil {
		t.Fatalf("clean shutdown: %v", err)
	}
	r.StartAgent(reptest.ProtectAll(v))
	r.WaitProtected(20*time.Second, v)
	stop = make(chan struct{})
	wait = r.RunWriters(stop, v)
	time.Sleep(300 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var total, verified uint64
	for range 3 {
		rep, err := r.Hub.Verify(ctx, hub.VerifyOptions{VM: "vm1"})
		if err != nil {
			close(stop)
			wait()
			t.Fatal(err)
		}
		total += rep.Volumes[0].Mismatches
		verified += rep.Volumes[0].VerifiedBytes
	}
	close(stop)
	n := wait()
	if total != 0 {
		t.Errorf("verify after an agent restart, under %d writes: %d mismatching regions, want 0", n, total)
	}
	t.Logf("3 verifies under %d writes after an agent restart: %d bytes compared", n, verified)
	r.WaitProtected(20*time.Second, v)
	r.CheckIdentical(v)
}
