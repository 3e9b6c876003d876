package agent_test

import (
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestPaceWakeups: a hub (fake, acknowledging when the test says) and a
// 1 MiB queue, so pacing starts past 768 KiB of backlog (the high-water
// mark) and ends at 640 KiB (the low-water mark). With 64 KiB writes:
// paced writers stay asleep through acknowledgements that leave the
// backlog above the low-water mark (even under the high-water mark, where
// every paced writer used to be woken), a write completed meanwhile joins
// the episode, and the acknowledgement that reaches the low-water mark
// releases every paced writer with exactly one wake-up each. The end of the
// connection releases them all, and so does Abort.
func TestPaceWakeups(t *testing.T) {
	const bs = 64 << 10
	r := reptest.New(t)
	r.AgentCfg.QueueBytes = 1 << 20
	r.AgentCfg.PaceAge = time.Hour // bytes, not age, start pacing here
	r.AgentCfg.Heartbeat = 2 * time.Second
	v := r.AddVolume("d0", 8<<20)
	ln, accept := fakeHub(t)
	r.Addr = ln.Addr().String()
	r.StartAgent(reptest.ProtectAll(v))

	// hub serves one connection: it starts protection and reports the
	// sequence numbers of the writes it receives.
	hub := func() (ack func(seq uint64), seqs chan uint64, closeConn func()) {
		nc, rd, _ := accept()
		nc.SetDeadline(time.Time{})
		nc.Write(wire.AppendFrame(nil, &wire.StartProtect{Volume: 1, Name: "d0", Mirror: true}))
		seqs = make(chan uint64, 1024)
		go func() {
			for {
				f, err := rd.ReadFrame()
				if err != nil {
					return
				}
				m, err := wire.Decode(f)
				if err != nil {
					return
				}
				if pw, ok := m.(*wire.ProtectedWrite); ok {
					seqs <- pw.Seq
				}
			}
		}()
		return func(seq uint64) { nc.Write(wire.AppendFrame(nil, &wire.WriteAck{Seq: seq})) }, seqs, func() { nc.Close() }
	}
	waitMirroring := func() {
		for deadline := time.Now().Add(20 * time.Second); !r.Agent.Status().Volumes[0].Mirroring; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the agent did not start mirroring")
			}
		}
	}
	data := reptest.Pattern(1, bs)
	next := 0 // the next write's slot (64 KiB apart)
	// write submits one write; its completion is sent on the channel.
	write := func() chan error {
		done := make(chan error, 1)
		s := uint64(next) * bs / 512
		next = (next + 1) % int(v.Size/bs)
		go func() {
			done <- v.Wrapped.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: bs / 512, Data: [][]byte{data}})
		}()
		return done
	}
	completed := func(done chan error) bool {
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("write: %v", err)
			}
			return true
		case <-time.After(20 * time.Second):
			return false
		}
	}
	waitPaced := func(n int) uint64 {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Millisecond) {
			w, wakes := agent.PaceState(r.Agent, "d0")
			if w == n {
				return wakes
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d writers paced, want %d", w, n)
			}
		}
	}
	stillPaced := func(n int, wakes0 uint64, why string) {
		t.Helper()
		time.Sleep(100 * time.Millisecond)
		if w, wakes := agent.PaceState(r.Agent, "d0"); w != n || wakes != wakes0 {
			t.Fatalf("%s: %d writers paced (want %d), %d wake-ups (want %d)", why, w, n, wakes-wakes0, 0)
		}
	}
	// fill queues 12 writes (768 KiB: not past the high-water mark) and
	// 4 more, which are paced; it returns their completions and the
	// writes' sequence numbers.
	fill := func(seqs chan uint64) ([]chan error, []uint64) {
		var got []uint64
		for range 12 {
			if !completed(write()) {
				t.Fatal("a write under the high-water mark did not complete")
			}
			got = append(got, <-seqs)
		}
		var paced []chan error
		for i := range 4 {
			paced = append(paced, write())
			waitPaced(i + 1)
			got = append(got, <-seqs)
		}
		return paced, got
	}

	ack, seqs, closeConn := hub()
	waitMirroring()
	paced, got := fill(seqs)
	wakes0 := waitPaced(4)
	ack(got[2]) // 13 writes left: 832 KiB
	stillPaced(4, wakes0, "backlog above the high-water mark")
	ack(got[4]) // 11 left: 704 KiB, under the high-water mark
	stillPaced(4, wakes0, "backlog between the marks")
	// A write completed during the episode waits with the others, though
	// the backlog (768 KiB) is not past the high-water mark.
	paced = append(paced, write())
	got = append(got, <-seqs)
	waitPaced(5)
	ack(got[7]) // 9 left: 576 KiB, under the low-water mark
	for i, done := range paced {
		if !completed(done) {
			t.Fatalf("paced write %d not released at the low-water mark", i)
		}
	}
	if w, wakes := agent.PaceState(r.Agent, "d0"); w != 0 || wakes-wakes0 != 5 {
		t.Errorf("after the release: %d writers paced, %d wake-ups of 5 paced writers", w, wakes-wakes0)
	}
	ack(got[len(got)-1])

	// The end of the connection releases every paced writer.
	paced, _ = fill(seqs)
	closeConn()
	for i, done := range paced {
		if !completed(done) {
			t.Fatalf("paced write %d not released when the connection ended", i)
		}
	}

	// So does Abort.
	_, seqs, _ = hub() // the writes unacknowledged are in its DIRTY_MAP, not the backlog
	waitMirroring()
	paced, _ = fill(seqs)
	r.Agent.Abort()
	for i, done := range paced {
		if !completed(done) {
			t.Fatalf("paced write %d not released by Abort", i)
		}
	}
}
