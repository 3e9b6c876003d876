// Package procstat reads a process's CPU time from /proc/PID/stat: the
// measure that benchmarks and tests compare servers by, because a server
// that loses CPU share to other tenants serves fewer requests but spends
// about the same CPU on each.
package procstat

import (
	"fmt"
	"os"
	"strconv"
	"strings"
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
