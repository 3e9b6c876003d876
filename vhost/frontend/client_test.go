package frontend

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCloseReleasesEachFDOnce: Close closes the call eventfd once. Its
// completion goroutine may notice the close late (it runs callbacks
// first), and meanwhile any goroutine of the process may open a file that
// takes the freed number: Close must leave that file open. (A second
// close of the number closed, in tests that run the daemon in the same
// process, a back end's eventfd: SET_VRING_CALL of the next client
// failed, or its completions stopped.)
func TestCloseReleasesEachFDOnce(t *testing.T) {
	c := &Client{cfg: Config{NumQueues: 2, QueueSize: 8, MemSize: 1 << 20, Regions: 1}, memfd: -1, inflightFD: -1, logFD: -1}
	if err := c.allocMemory(); err != nil {
		c.release()
		t.Fatal(err)
	}
	// Each queue's stand-in for its completion goroutine: once the call
	// fd is closed, another file takes its number, then the goroutine
	// returns.
	var pipes [][2]int
	for _, q := range c.queues {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		pipes = append(pipes, p)
		go func(fd int, p [2]int) {
			defer close(q.done)
			deadline := time.Now().Add(10 * time.Second)
			for {
				if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == unix.EBADF {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("queue %d: the call fd %d was not closed", q.idx, fd)
					return
				}
				time.Sleep(time.Millisecond)
			}
			// The number is free: another file takes it.
			if err := unix.Dup3(p[0], fd, unix.O_CLOEXEC); err != nil {
				t.Errorf("queue %d: dup3 to %d: %v", q.idx, fd, err)
			}
		}(q.callFD, p)
	}
	callFDs := make([]int, len(c.queues))
	for i, q := range c.queues {
		callFDs[i] = q.callFD
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for i, fd := range callFDs {
		var st, want unix.Stat_t
		switch err := unix.Fstat(fd, &st); {
		case err != nil:
			t.Errorf("queue %d: Close closed fd %d, which another file took after the call eventfd: %v", i, fd, err)
		case unix.Fstat(pipes[i][0], &want) != nil || st.Dev != want.Dev || st.Ino != want.Ino:
			t.Errorf("queue %d: fd %d is not the file that took the number", i, fd)
		default:
			unix.Close(fd)
		}
		unix.Close(pipes[i][0])
		unix.Close(pipes[i][1])
	}
}

// TestKickAfterCloseWritesNothing: a submission that made its request
// available before Close marked the queue dead kicks after the lock is
// released, maybe after Close: that kick must not write to the file that
// took the kick eventfd's number since.
func TestKickAfterCloseWritesNothing(t *testing.T) {
	c := &Client{cfg: Config{NumQueues: 1, QueueSize: 8, MemSize: 1 << 20, Regions: 1}, memfd: -1, inflightFD: -1, logFD: -1}
	if err := c.allocMemory(); err != nil {
		c.release()
		t.Fatal(err)
	}
	q := c.queues[0]
	close(q.done) // no completion goroutine
	kickFD := q.kickFD
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// The number is free: the pipe's write end takes it.
	if err := unix.Dup3(p[1], kickFD, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(kickFD)
	q.kick()
	var b [8]byte
	if n, err := unix.Read(p[0], b[:]); err != unix.EAGAIN {
		t.Errorf("a kick after Close wrote %d bytes to the file that took fd %d (read: %v)", n, kickFD, err)
	}
}
