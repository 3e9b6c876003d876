package procstat

import (
	"os"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	// A command name with spaces and parentheses; utime 250, stime 75 ticks.
	line := "4242 (qemu (x) d) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 7 0 1000 0 0\n"
	d, err := parse(line)
	if err != nil || d != 3250*time.Millisecond {
		t.Errorf("parse = %v, %v; want 3.25s", d, err)
	}
	for _, bad := range []string{"", "1 (x) S 1 2", "1 (x) S 1 2 3 4 5 6 7 8 9 10 -5 1", "1 (x) S 1 2 3 4 5 6 7 8 9 10 a 1"} {
		if _, err := parse(bad); err == nil {
			t.Errorf("parse(%q) accepted", bad)
		}
	}
}

func TestCPUTime(t *testing.T) {
	// This process: burn some CPU and see it counted.
	before, err := CPUTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(60 * time.Millisecond); time.Now().Before(end); {
	}
	after, err := CPUTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after < before {
		t.Errorf("CPU time went back: %v then %v", before, after)
	}
	if _, err := CPUTime(-1); err == nil {
		t.Error("CPUTime(-1) succeeded")
	}
}

// TestReadThreads: the per-thread reading counts the CPU time a thread
// burns between two readings, to far better than a 10 ms tick, and no
// more than the wall time times the threads that ran.
func TestReadThreads(t *testing.T) {
	before, err := ReadThreads(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for end := start.Add(30 * time.Millisecond); time.Now().Before(end); {
	}
	after, err := ReadThreads(os.Getpid())
	wall := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	// The spinning thread was on a CPU for most of the 30 ms unless the
	// machine is very busy; on any machine it cannot exceed the wall
	// time of every thread of the process.
	used := after.Since(before)
	if used <= 0 || used > wall*time.Duration(len(after)) {
		t.Errorf("Since = %v over %v of wall time with %d threads", used, wall, len(after))
	}
	if after.Since(after) != 0 {
		t.Errorf("a reading since itself is %v, want 0", after.Since(after))
	}
	// A thread new in the second reading counts whole; one whose time
	// went back is a new thread with a reused id.
	a := Threads{1: 5 * time.Millisecond, 2: 7 * time.Millisecond}
	b := Threads{1: 9 * time.Millisecond, 2: 3 * time.Millisecond, 3: 2 * time.Millisecond}
	if got := b.Since(a); got != 9*time.Millisecond {
		t.Errorf("Since = %v, want 4+3+2 ms", got)
	}
	if _, err := ReadThreads(-1); err == nil {
		t.Error("ReadThreads(-1) succeeded")
	}
	for _, bad := range []string{"", "x 1 2", "-5 1 2"} {
		if _, err := parseSchedstat(bad); err == nil {
			t.Errorf("parseSchedstat(%q) accepted", bad)
		}
	}
	if d, err := parseSchedstat("123456789 2 3\n"); err != nil || d != 123456789 {
		t.Errorf("parseSchedstat = %v, %v; want 123456789ns", d, err)
	}
}
