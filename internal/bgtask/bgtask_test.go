package bgtask

import (
	"sync/atomic"
	"testing"
	"time"
)

// TestTask: one goroutine at a time; Stop waits for it; Start after Stop
// runs a new one; nothing runs after Close.
func TestTask(t *testing.T) {
	var task Task
	var running, runs atomic.Int32
	run := func(stop <-chan struct{}) {
		if running.Add(1) != 1 {
			t.Error("two goroutines at once")
		}
		runs.Add(1)
		<-stop
		time.Sleep(time.Millisecond) // Stop must wait for this
		running.Add(-1)
	}
	task.Start(run)
	task.Start(run) // already running: nothing
	task.Stop()
	if n := running.Load(); n != 0 {
		t.Fatalf("Stop returned with %d goroutines running", n)
	}
	task.Stop() // nothing running: returns at once
	task.Start(run)
	task.Close()
	if n := running.Load(); n != 0 {
		t.Fatalf("Close returned with %d goroutines running", n)
	}
	task.Start(run) // closed: nothing
	task.Stop()
	if n := runs.Load(); n != 2 {
		t.Fatalf("%d runs, want 2", n)
	}
}
