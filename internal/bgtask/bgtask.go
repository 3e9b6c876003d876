// Package bgtask runs a target's background goroutine (a mirror's
// recovery, a snapshot's merge): at most one at a time, started again
// after a stop, and stopped for good when its target closes.
package bgtask

import "sync"

// Task is one restartable background goroutine. The zero value is ready
// to use; a Task must not be copied after first use.
type Task struct {
	mu      sync.Mutex
	stop    chan struct{} // closed to ask the goroutine to return
	stopped chan struct{} // closed when it has
	closed  bool
}

// Start runs run in a new goroutine unless one is running or the task is
// closed. run must return soon after stop is closed.
func (t *Task) Start(run func(stop <-chan struct{})) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed || t.stop != nil {
		return
	}
	stop, stopped := make(chan struct{}), make(chan struct{})
	t.stop, t.stopped = stop, stopped
	go func() {
		defer close(stopped)
		run(stop)
	}()
}

// Stop asks the running goroutine, if any, to return and waits until it
// has. A later Start runs a new one.
func (t *Task) Stop() {
	t.mu.Lock()
	stop, stopped := t.stop, t.stopped
	t.stop, t.stopped = nil, nil
	t.mu.Unlock()
	if stop != nil {
		close(stop)
		<-stopped
	}
}

// Close stops the task for good: it waits for a running goroutine to
// return, and Start does nothing after it.
func (t *Task) Close() {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.Stop()
}
