package main

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/wire"
	"github.com/vhostdm/vhostdm/targets/replicator"
)

// prepareRepagent checks what reloading c changes of replication, before
// anything changes, and returns what applies it. Exports added or changed
// by the reload take their protect, fall-behind and allow-remote-write
// from c; a new hub address or new TLS files (or new contents of the same
// files: a rotated certificate) make the agent reconnect with them. What
// cannot change while running is refused, so that no protected export is
// ever served unprotected: adding or removing [repagent], and its vm, uuid,
// queue-size and activity log settings.
func (d *daemon) prepareRepagent(old, c *config.Config) (apply func(), err error) {
	o, n := old.RepAgent, c.RepAgent
	switch {
	case o.Hub == "" && n.Hub != "":
		return nil, errors.New("repagent: adding [repagent] needs a restart: the running exports have no replication agent")
	case o.Hub != "" && n.Hub == "":
		return nil, errors.New("repagent: removing [repagent] needs a restart")
	case o.Hub == "":
		return func() {}, nil
	case o.VM != n.VM || o.UUID != n.UUID || o.QueueBytes != n.QueueBytes:
		return nil, errors.New("repagent: vm, uuid and queue-size cannot change while running; restart to change them")
	case o.ALPath != n.ALPath || o.ALExtents != n.ALExtents || o.ALExtentBytes != n.ALExtentBytes:
		return nil, errors.New("repagent: activity-log, al-extents and al-extent-size cannot change while running; restart to change them")
	}
	opts := repOptions(c)
	sum, err := tlsSum(c)
	if err != nil {
		return nil, err
	}
	link := !slices.Equal(o.HubAddrs(), n.HubAddrs()) || o.Insecure != n.Insecure || sum != d.repTLSSum
	tc, err := repagentTLS(c)
	if err != nil {
		return nil, err
	}
	if link && tc == nil {
		for _, h := range n.HubAddrs() {
			if err := wire.CheckPlain(h, n.Insecure); err != nil {
				return nil, fmt.Errorf("%s: repagent: hub %w", c.File, err)
			}
		}
	}
	return func() {
		d.ex.mu.Lock()
		d.repOpts = opts
		d.ex.mu.Unlock()
		if !link {
			return
		}
		if err := d.agent.Reconnect(n.HubAddrs(), tc, n.Insecure); err != nil {
			d.log.Error("repagent: hub settings not applied", "err", err) // checked above
			return
		}
		d.repTLSSum = sum
		// Site links of replicator tables made from now on use them too.
		replicator.SetRepagentSettings(d.m, replicator.RepagentSettings{VM: n.VM, UUID: n.UUID,
			TLS: tc, Insecure: n.Insecure, Logger: d.log})
	}, nil
}

// tlsSum fingerprints the contents of c's [repagent] TLS files, so that a
// reload notices a certificate replaced in place.
func tlsSum(c *config.Config) ([32]byte, error) {
	h := sha256.New()
	r := c.RepAgent
	for _, f := range []string{r.TLSCert, r.TLSKey, r.TLSCA} {
		if f == "" {
			continue
		}
		b, err := os.ReadFile(c.Path(f))
		if err != nil {
			return [32]byte{}, fmt.Errorf("%s: repagent: %w", c.File, err)
		}
		fmt.Fprintf(h, "%s %d\n", f, len(b))
		h.Write(b)
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum, nil
}

// repOptions returns the replication options of c's exports by id.
func repOptions(c *config.Config) map[string]agent.VolumeOptions {
	opts := map[string]agent.VolumeOptions{}
	for _, e := range c.Exports {
		fb, _ := config.ParseFallBehind(e.FallBehind) // validated by config
		opts[e.ID] = agent.VolumeOptions{Protect: e.Protect, AllowRemoteWrite: e.AllowRemoteWrite, FallBehind: agent.FallBehind(fb),
			OnHubLoss: agent.OnHubLoss(e.OnHubLoss)}
	}
	return opts
}
