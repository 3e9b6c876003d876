package agent_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestCheckpointRefusal: a checkpoint the hub refuses (CHECKPOINT with
// REFUSED before the WRITE_ACK that covers it) fails with
// ErrCheckpointRefused naming it, and the connection goes on; a refusal
// of a sequence number never sent, or a CHECKPOINT from the hub without
// REFUSED, closes the connection (the agent reconnects).
func TestCheckpointRefusal(t *testing.T) {
	r := reptest.New(t)
	v := r.AddVolume("root", 1<<20)
	ln, accept := fakeHub(t)
	r.Addr = ln.Addr().String()
	r.StartAgent(map[*reptest.Vol]agent.VolumeOptions{v: {Protect: true}})
	nc, rd, _ := accept()
	send := func(m wire.Message) { nc.Write(wire.AppendFrame(nil, m)) }
	checkpoint := func(name string) <-chan error {
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			done <- r.Agent.Checkpoint(ctx, name)
		}()
		return done
	}
	nextCheckpoint := func() *wire.Checkpoint {
		t.Helper()
		for {
			if m, ok := next(t, rd).(*wire.Checkpoint); ok {
				return m
			}
		}
	}

	done := checkpoint("nightly")
	m := nextCheckpoint()
	send(&wire.Checkpoint{Seq: m.Seq, Name: m.Name, Refused: true})
	send(&wire.WriteAck{Seq: m.Seq})
	if err := <-done; !errors.Is(err, agent.ErrCheckpointRefused) || !strings.Contains(err.Error(), `"nightly"`) {
		t.Fatalf("refused checkpoint: %v, want ErrCheckpointRefused naming it", err)
	}
	done = checkpoint("nightly-2")
	m = nextCheckpoint()
	send(&wire.WriteAck{Seq: m.Seq})
	if err := <-done; err != nil {
		t.Fatalf("the next checkpoint on the same connection: %v", err)
	}
	if c := r.Agent.Status().Connects; c != 1 {
		t.Errorf("%d connects, want 1: the refusal closed the connection", c)
	}

	// Hostile hubs.
	for i, bad := range []wire.Message{
		&wire.Checkpoint{Seq: m.Seq + 1000, Name: "x", Refused: true},
		&wire.Checkpoint{Seq: m.Seq, Name: "nightly-2"},
	} {
		send(bad)
		nc.SetReadDeadline(time.Now().Add(10 * time.Second))
		var err error
		for err == nil {
			_, err = rd.ReadFrame()
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("hostile frame %d (%+v): the agent kept the connection", i, bad)
		}
		if i == 0 {
			nc, rd, _ = accept()
		}
	}
}
