package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/vhostdm/vhostdm/internal/qmpclient"
)

// rpoSampler samples the recovery point objective that a vhostdm
// daemon's query-repagent reports, over one QMP connection, while a
// benchmark runs. Before it, scripts/bench-replication.sh sampled it by
// starting a QMP client process and jq every 100 ms: on two CPUs those
// processes took about a third of the machine during the protected runs
// only, and the protected figures paid for it.
type rpoSampler struct {
	c    *qmpclient.Client
	stop chan struct{}
	done chan struct{}

	// Owned by the sampling goroutine until done is closed.
	max     float64
	samples int
	err     error
}

// startRPOSampler connects to the QMP socket and samples query-repagent's
// "rpo" every interval until stopped.
func startRPOSampler(socket string, interval time.Duration) (*rpoSampler, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := qmpclient.Dial(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("--rpo-qmp %s: %w", socket, err)
	}
	s := &rpoSampler{c: c, stop: make(chan struct{}), done: make(chan struct{})}
	// The first sample is taken now, so that a socket that is not a
	// vhostdm with replication fails the run before it starts.
	if err := s.sample(); err != nil {
		c.Close()
		return nil, fmt.Errorf("--rpo-qmp %s: %w", socket, err)
	}
	go s.loop(interval)
	return s, nil
}

func (s *rpoSampler) loop(interval time.Duration) {
	defer close(s.done)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			if err := s.sample(); err != nil {
				s.err = err
				return
			}
		}
	}
}

// sample runs query-repagent once and keeps the largest RPO seen.
func (s *rpoSampler) sample() error {
	line, err := s.c.Run([]byte(`{"execute":"query-repagent"}`))
	if err != nil {
		return fmt.Errorf("query-repagent: %w", err)
	}
	var r struct {
		Return *struct {
			RPO *float64 `json:"rpo"`
		} `json:"return"`
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return fmt.Errorf("query-repagent: %w", err)
	}
	if r.Return == nil || r.Return.RPO == nil {
		return fmt.Errorf("query-repagent: no rpo in %.200q", line)
	}
	s.samples++
	s.max = max(s.max, *r.Return.RPO)
	return nil
}

// Stop ends the sampling (call it once) and returns the largest RPO seen, in seconds,
// and the number of samples.
func (s *rpoSampler) Stop() (maxRPO float64, samples int, err error) {
	close(s.stop)
	<-s.done
	s.c.Close()
	return s.max, s.samples, s.err
}
