package main

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// checkpointTimeout bounds how long repagent-checkpoint waits for the
// hub's acknowledgement.
const checkpointTimeout = 30 * time.Second

// qmpCheckpoint serves repagent-checkpoint {vm, name}: the agent puts a
// CHECKPOINT frame into the write stream of all the VM's protected
// volumes and returns once the hub has journaled it.
func (d *daemon) qmpCheckpoint(a map[string]string) (any, error) {
	d.reloadMu.Lock()
	var vm string
	if d.cfg != nil {
		vm = d.cfg.RepAgent.VM
	}
	ag := d.agent
	d.reloadMu.Unlock()
	if ag == nil {
		return nil, errors.New("no [repagent] table: nothing is replicated")
	}
	if a["vm"] != vm {
		return nil, fmt.Errorf("this daemon replicates vm %q, not %q", vm, a["vm"])
	}
	ctx, cancel := context.WithTimeout(context.Background(), checkpointTimeout)
	defer cancel()
	if err := ag.Checkpoint(ctx, a["name"]); err != nil {
		return nil, err
	}
	return struct{}{}, nil
}
