package targets

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// delay holds I/O for a fixed time before passing it on, and can send
// reads, writes and flushes to different devices (kernel dm-delay 1.3).
//
//	delay <dev> <offset> <delay_ms> [<write_dev> <write_offset> <write_delay_ms> [<flush_dev> <flush_offset> <flush_delay_ms>]]
//
// With 3 arguments every request goes to the one device; with 6, writes,
// discards, write-zeroes and flushes use the second set; with 9, flushes use
// the third. Delays are in milliseconds; 0 passes I/O straight on.
//
// INFO:  "0 1 0", the reads, writes and flushes being delayed right now.
// TABLE: "254:16 0 100 254:32 0 500" (the sets the table gave, the device
// names as the table wrote them).
//
// A delayed request sleeps in its own goroutine, so it holds up nothing
// else. Presuspend releases every delayed request at once and stops
// delaying until Resume, as the kernel's delay_presuspend does.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "delay", Version: [3]int{1, 3, 0}, New: newDelay})
}

// delayClass is one of the read, write and flush sets.
type delayClass struct {
	dev    mapper.Backend
	offset uint64 // sectors into dev
	delay  time.Duration
	ms     uint64 // the delay as the table gave it
}

type delayTarget struct {
	// Immutable after construction.
	read, write, flush delayClass
	argc               int // 3, 6 or 9: what TABLE re-emits
	length             uint64

	mu       sync.Mutex
	ops      [3]int        // delayed now: read, write, flush
	release  chan struct{} // closed by Presuspend
	mayDelay bool
}

func newDelay(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if n := len(args); n != 3 && n != 6 && n != 9 {
		return nil, fmt.Errorf("want 3, 6 or 9 arguments, got %d", n)
	}
	t := &delayTarget{argc: len(args), length: c.Length, release: make(chan struct{}), mayDelay: true}
	classes := []*delayClass{&t.read, &t.write, &t.flush}
	names := []string{"read", "write", "flush"}
	for i := 0; i < 3; i++ {
		set := i * 3
		if set >= len(args) {
			set = len(args) - 3 // missing sets repeat the last one given
		}
		if err := parseDelayClass(c, classes[i], names[i], args[set:set+3]); err != nil {
			return nil, err
		}
	}
	// Open each set's device; a class without its own set uses the last
	// set given, as delay_ctr does.
	sets := len(args) / 3
	devs := make([]mapper.Backend, sets)
	for k := range devs {
		dev, err := c.Open(args[3*k])
		if err != nil {
			return nil, fmt.Errorf("%s device: %w", names[k], err)
		}
		devs[k] = dev
	}
	for i, dc := range classes {
		dc.dev = devs[min(i, sets-1)]
	}
	return t, nil
}

func parseDelayClass(c *mapper.Ctx, dc *delayClass, name string, args []string) error {
	off, err := mapper.ParseUint(name+" offset", args[1], 0, mapper.MaxSector)
	if err != nil {
		return err
	}
	if off+c.Length > mapper.MaxSector {
		return fmt.Errorf("%s offset %d + length %d: beyond the largest device", name, off, c.Length)
	}
	ms, err := mapper.ParseUint(name+" delay", args[2], 0, 1<<32-1)
	if err != nil {
		return err
	}
	dc.offset, dc.ms, dc.delay = off, ms, time.Duration(ms)*time.Millisecond
	return nil
}

// class picks the set for r as delay_map does: writes, discards and
// write-zeroes use the write set, flushes the flush set, reads the read set.
func (t *delayTarget) class(r *mapper.Request) (*delayClass, int) {
	switch {
	case r.Op == mapper.OpFlush:
		return &t.flush, 2
	case r.Op.IsWrite():
		return &t.write, 1
	}
	return &t.read, 0
}

func (t *delayTarget) Map(r *mapper.Request) error {
	dc, i := t.class(r)
	if dc.delay > 0 {
		t.wait(dc.delay, i)
	}
	return mapper.MapBackend(dc.dev, dc.offset+r.Sector, r)
}

// wait sleeps for d unless delaying is off or until Presuspend releases
// every waiting request.
func (t *delayTarget) wait(d time.Duration, i int) {
	t.mu.Lock()
	if !t.mayDelay {
		t.mu.Unlock()
		return
	}
	t.ops[i]++
	release := t.release
	t.mu.Unlock()
	timer := time.NewTimer(d)
	select {
	case <-timer.C:
	case <-release:
		timer.Stop()
	}
	t.mu.Lock()
	t.ops[i]--
	t.mu.Unlock()
}

func (t *delayTarget) Status(kind mapper.StatusKind) string {
	if kind != mapper.StatusTable {
		t.mu.Lock()
		defer t.mu.Unlock()
		return fmt.Sprintf("%d %d %d", t.ops[0], t.ops[1], t.ops[2])
	}
	sets := []*delayClass{&t.read, &t.write, &t.flush}[:t.argc/3]
	parts := make([]string, len(sets))
	for i, dc := range sets {
		parts[i] = fmt.Sprintf("%s %d %d", dc.dev.Name(), dc.offset, dc.ms)
	}
	return strings.Join(parts, " ")
}

// Presuspend releases the delayed requests and stops delaying new ones.
func (t *delayTarget) Presuspend(noflush bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.mayDelay {
		t.mayDelay = false
		close(t.release)
	}
	return nil
}

// Resume starts delaying again.
func (t *delayTarget) Resume() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.mayDelay {
		t.mayDelay = true
		t.release = make(chan struct{})
	}
	return nil
}

// Close releases any request still waiting.
func (t *delayTarget) Close() error { return t.Presuspend(true) }

// Areas lists the area of each set's device the target uses.
func (t *delayTarget) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	for _, dc := range []*delayClass{&t.read, &t.write, &t.flush}[:t.argc/3] {
		if err := fn(dc.dev, dc.offset, t.length); err != nil {
			return err
		}
	}
	return nil
}
