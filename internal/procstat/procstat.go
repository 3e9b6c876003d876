// Package procstat reads a process's CPU time from /proc/PID/stat (and,
// to the nanosecond, of each of its threads from their schedstat): the
// measure that benchmarks and tests compare servers by, because a server
// that loses CPU share to other tenants serves fewer requests but spends
// about the same CPU on each.
package procstat

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// CPUTime returns the user plus system CPU time of process pid, all its
// threads included (io_uring's io-wq workers are threads of the process),
// in 10 ms ticks.
func CPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time: %w", err)
	}
	return parse(string(b))
}

// parse reads utime and stime (fields 14 and 15) of a /proc/PID/stat
// line. The command name (field 2) is in parentheses and may itself hold
// spaces and parentheses, so fields count from the last ')'.
func parse(s string) (time.Duration, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("cpu time: malformed stat line %q", s)
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3, the state
	if len(f) < 13 {
		return 0, fmt.Errorf("cpu time: stat line has %d fields after the name, want at least 13", len(f))
	}
	var ticks int64
	for _, x := range f[11:13] {
		n, err := strconv.ParseInt(x, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("cpu time: bad field %q in stat line", x)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// Threads is a reading of the CPU time of each thread of a process, from
// /proc/PID/task/TID/schedstat: nanoseconds, where /proc/PID/stat counts
// 10 ms ticks. Since of two readings is the CPU time the process used
// between them, to within what threads that exited in between had used
// since the first reading (threads that come and go, such as io_uring's
// io-wq workers, live seconds, far longer than the intervals compared).
type Threads map[int]time.Duration

// ReadThreads reads the CPU time of every thread of process pid.
func ReadThreads(pid int) (Threads, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("cpu time: %w", err)
	}
	t := make(Threads, len(ents))
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(dir + "/" + e.Name() + "/schedstat")
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
			continue // the thread exited since the listing
		}
		if err != nil {
			return nil, fmt.Errorf("cpu time: %w", err)
		}
		d, err := parseSchedstat(string(b))
		if err != nil {
			return nil, fmt.Errorf("cpu time: thread %d: %w", tid, err)
		}
		t[tid] = d
	}
	if len(t) == 0 {
		return nil, fmt.Errorf("cpu time: process %d has no threads", pid)
	}
	return t, nil
}

// parseSchedstat reads the first field of a schedstat line: the time the
// thread has run, in nanoseconds.
func parseSchedstat(s string) (time.Duration, error) {
	f := strings.Fields(s)
	if len(f) == 0 {
		return 0, fmt.Errorf("malformed schedstat line %q", s)
	}
	n, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad run time %q in schedstat line", f[0])
	}
	return time.Duration(n), nil
}

// Since returns the CPU time used between reading before and reading t:
// of each thread in both, the difference; of each thread only in t (or
// whose time went back: a new thread with an exited one's id), all of its
// time, since it started in between.
func (t Threads) Since(before Threads) time.Duration {
	var d time.Duration
	for tid, v := range t {
		if b, ok := before[tid]; ok && b <= v {
			d += v - b
		} else {
			d += v // a new thread (perhaps with an exited one's id)
		}
	}
	return d
}
