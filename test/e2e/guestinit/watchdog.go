//go:build linux

package main

import (
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// progress is when the last result line was printed (unix nanoseconds).
var progress atomic.Int64

// watchdog dumps what the guest is waiting for when no result line came
// for period: the block layer's view of each virtio disk (in-flight
// counts, and from debugfs each hardware queue's busy and dispatch lists)
// and the stacks of blocked tasks (sysrq-w). It dumps at most three times.
// The host side of a hang is QEMU's (harness: x-query-virtio-queue-status)
// and the back end's.
func watchdog(period time.Duration, disks []string) {
	progress.Store(time.Now().UnixNano())
	for dumps := 0; dumps < 3; {
		time.Sleep(period / 4)
		idle := time.Since(time.Unix(0, progress.Load()))
		if idle < period {
			continue
		}
		dumps++
		logf("watchdog: no result for %v; dumping block queues and blocked tasks", idle.Round(time.Second))
		dumpBlockQueues(disks)
		dumpBlockedTasks()
		progress.Store(time.Now().UnixNano())
	}
}

func dumpBlockQueues(disks []string) {
	unix.Mount("debugfs", "/sys/kernel/debug", "debugfs", 0, "")
	for _, d := range disks {
		if b, err := os.ReadFile("/sys/block/" + d + "/inflight"); err == nil {
			logf("watchdog: %s inflight (reads writes): %s", d, strings.TrimSpace(string(b)))
		}
		hctxs, _ := filepath.Glob("/sys/kernel/debug/block/" + d + "/hctx*")
		for _, h := range hctxs {
			for _, f := range []string{"state", "busy", "dispatch", "tags"} {
				b, err := os.ReadFile(filepath.Join(h, f))
				if err != nil || len(b) == 0 {
					continue
				}
				lines := strings.Split(strings.TrimSpace(string(b)), "\n")
				if len(lines) > 20 {
					lines = append(lines[:20], "...")
				}
				logf("watchdog: %s/%s/%s: %s", d, filepath.Base(h), f, strings.Join(lines, " | "))
			}
		}
	}
}

// dumpBlockedTasks triggers sysrq-w and copies what the kernel logged to
// the console (the console log level may hide it).
func dumpBlockedTasks() {
	kmsg, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		logf("watchdog: /dev/kmsg: %v", err)
		return
	}
	defer unix.Close(kmsg)
	unix.Seek(kmsg, 0, 2)
	if err := os.WriteFile("/proc/sysrq-trigger", []byte("w"), 0); err != nil {
		logf("watchdog: sysrq-w: %v", err)
		return
	}
	time.Sleep(time.Second)
	rec := make([]byte, 8192)
	for n := 0; n < 400; n++ {
		k, err := unix.Read(kmsg, rec)
		if err == unix.EPIPE {
			continue
		}
		if err != nil || k <= 0 {
			return
		}
		line := string(rec[:k])
		if _, msg, ok := strings.Cut(line, ";"); ok {
			line = msg
		}
		logf("watchdog: kernel: %s", strings.TrimRight(line, "\n"))
	}
}
