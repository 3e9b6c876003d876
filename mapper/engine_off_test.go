//go:build vhostdm_nouring

package mapper_test

import (
	"errors"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// TestIOQueueDisabled checks that the vhostdm_nouring tag forces the
// fallback: NewIOQueue fails with ErrNoEngine, as on a kernel without
// io_uring, so the suites built with it run on worker goroutines.
func TestIOQueueDisabled(t *testing.T) {
	q, err := mapper.NewIOQueue(mapper.IOQueueConfig{Depth: 8, Complete: func(uint64, error) {}})
	if !errors.Is(err, mapper.ErrNoEngine) {
		if q != nil {
			q.Close()
		}
		t.Fatalf("NewIOQueue with vhostdm_nouring: %v, want ErrNoEngine", err)
	}
}
