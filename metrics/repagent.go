package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

var (
	agConnected = prometheus.NewDesc("vhostdm_repagent_connected", "1 while the replication agent is connected to its hub.", nil, nil)
	agConnects  = prometheus.NewDesc("vhostdm_repagent_connects_total", "Connections the agent made to its hub.", nil, nil)
	agBacklog   = prometheus.NewDesc("vhostdm_repagent_mirror_queue_bytes", "Bytes of mirrored writes not yet acknowledged by the hub.", []string{"volume"}, nil)
	agBacklogIO = prometheus.NewDesc("vhostdm_repagent_mirror_queue_ios", "Mirrored writes not yet acknowledged by the hub.", []string{"volume"}, nil)
	agAge       = prometheus.NewDesc("vhostdm_repagent_mirror_queue_age_seconds", "Age of the oldest mirrored write not yet acknowledged by the hub.", []string{"volume"}, nil)
	agDirty     = prometheus.NewDesc("vhostdm_repagent_dirty_regions", "Regions in the dirty map, to be resynchronised.", []string{"volume"}, nil)
	agSync      = prometheus.NewDesc("vhostdm_repagent_sync_mirroring", "1 while the volume mirrors synchronously (past its fall-behind threshold).", []string{"volume"}, nil)
	agProtected = prometheus.NewDesc("vhostdm_repagent_protected", "1 while the hub protects the volume on this connection.", []string{"volume"}, nil)
	agRPO       = prometheus.NewDesc("vhostdm_repagent_rpo_seconds", "Age of the oldest write acknowledged to the guest that the hub has not acknowledged (mirror queue and dirty map; it keeps growing while the hub is away).", []string{"volume"}, nil)
	agOverflows = prometheus.NewDesc("vhostdm_repagent_overflows_total", "Times the volume's writes overflowed the mirror queue (or its share of it) into the dirty map.", []string{"volume"}, nil)
	agResyncB   = prometheus.NewDesc("vhostdm_repagent_resync_requested_bytes_total", "Bytes of the regions the agent asked the hub to resync (DIRTY_MAP).", []string{"volume"}, nil)
)

// Agent registers a collector of the replication agent's state.
func (m *Metrics) Agent(a *agent.Agent) {
	m.reg.MustRegister(&agentCollector{a: a})
}

type agentCollector struct{ a *agent.Agent }

func (c *agentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{agConnected, agConnects, agBacklog, agBacklogIO, agAge, agDirty, agSync, agProtected, agRPO, agOverflows, agResyncB} {
		ch <- d
	}
}

func (c *agentCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.a.Status()
	ch <- prometheus.MustNewConstMetric(agConnected, prometheus.GaugeValue, b2f(s.Connected))
	ch <- prometheus.MustNewConstMetric(agConnects, prometheus.CounterValue, float64(s.Connects))
	for _, v := range s.Volumes {
		ch <- prometheus.MustNewConstMetric(agBacklog, prometheus.GaugeValue, float64(v.BacklogBytes), v.Name)
		ch <- prometheus.MustNewConstMetric(agBacklogIO, prometheus.GaugeValue, float64(v.BacklogIOs), v.Name)
		ch <- prometheus.MustNewConstMetric(agAge, prometheus.GaugeValue, v.BacklogAge.Seconds(), v.Name)
		ch <- prometheus.MustNewConstMetric(agDirty, prometheus.GaugeValue, float64(v.DirtyRegions), v.Name)
		ch <- prometheus.MustNewConstMetric(agSync, prometheus.GaugeValue, b2f(v.Sync), v.Name)
		ch <- prometheus.MustNewConstMetric(agProtected, prometheus.GaugeValue, b2f(v.Mirroring), v.Name)
		ch <- prometheus.MustNewConstMetric(agRPO, prometheus.GaugeValue, v.RPO.Seconds(), v.Name)
		ch <- prometheus.MustNewConstMetric(agOverflows, prometheus.CounterValue, float64(v.Stats.Overflows), v.Name)
		ch <- prometheus.MustNewConstMetric(agResyncB, prometheus.CounterValue, float64(v.Stats.ResyncBytes), v.Name)
	}
}

var (
	hubSync      = prometheus.NewDesc("repagent_hub_sync_progress_ratio", "Progress of the volume's current sync pass, 0 to 1 (1 when protecting).", []string{"vm", "volume", "state"}, nil)
	hubResync    = prometheus.NewDesc("repagent_hub_resync_bytes", "Bytes still to read from the source volume.", []string{"vm", "volume"}, nil)
	hubBacklog   = prometheus.NewDesc("repagent_hub_backlog_bytes", "Bytes the agent has mirrored that the hub has not applied.", []string{"vm", "volume"}, nil)
	hubBackIOs   = prometheus.NewDesc("repagent_hub_backlog_ios", "Writes the agent has mirrored that the hub has not applied.", []string{"vm", "volume"}, nil)
	hubLag       = prometheus.NewDesc("repagent_hub_apply_lag_seconds", "Age of the oldest write not yet applied.", []string{"vm", "volume"}, nil)
	hubApplied   = prometheus.NewDesc("repagent_hub_applied_bytes_total", "Bytes applied to the recovery volume since the hub started.", []string{"vm", "volume"}, nil)
	hubRemote    = prometheus.NewDesc("repagent_hub_remote_read_bytes_total", "Bytes read from the source by remote IO since the hub started.", []string{"vm", "volume"}, nil)
	hubVMConn    = prometheus.NewDesc("repagent_hub_vm_connected", "1 while the VM's agent is connected.", []string{"vm"}, nil)
	hubAppliedN  = prometheus.NewDesc("repagent_hub_applied_sequence", "Sequence number applied up to.", []string{"vm", "volume"}, nil)
	hubStoreErr  = prometheus.NewDesc("repagent_hub_store_error", "1 while the volume is in store-error: its store failed (fsync error, no space) and nothing more is marked synced.", []string{"vm", "volume"}, nil)
	hubCPAge     = prometheus.NewDesc("repagent_hub_consistent_point_age_seconds", "How far behind the source the VM's newest consistent point may be: 0 while the journal holds every write of a connected agent, else the time since that point's write or since the journal was last known current; keeps growing while disconnected or resyncing.", []string{"vm"}, nil)
	hubCPSeq     = prometheus.NewDesc("repagent_hub_consistent_point_sequence", "Sequence number of the VM's newest consistent point.", []string{"vm"}, nil)
	hubResyncing = prometheus.NewDesc("repagent_hub_resync_open", "1 while a resync set is open in the VM's journal (the consistent point stays the one before it).", []string{"vm"}, nil)
	hubJBytes    = prometheus.NewDesc("repagent_hub_journal_bytes", "The VM's journaled bytes not yet applied to the replica images.", []string{"vm"}, nil)
	hubStoreErs  = prometheus.NewDesc("repagent_hub_store_errors_total", "Store failures of the volume (fsync, write, preallocation, state save) since the hub started.", []string{"vm", "volume"}, nil)
	hubStoreTry  = prometheus.NewDesc("repagent_hub_store_retries_total", "Failed attempts to leave store-error (reopen the journal, start protection again) since the hub started; the hub retries with backoff while the agent stays connected.", []string{"vm", "volume"}, nil)
	hubVerifyN   = prometheus.NewDesc("repagent_hub_verify_runs_total", "Online verifies of the volume (repagent-verify) since the hub started.", []string{"vm", "volume"}, nil)
	hubVerifyBad = prometheus.NewDesc("repagent_hub_verify_mismatch_regions_total", "Regions online verifies found different between source and replica since the hub started.", []string{"vm", "volume"}, nil)
	hubVerifyNow = prometheus.NewDesc("repagent_hub_verify_last_mismatch_regions", "Regions the volume's last online verify found different (0 before the first).", []string{"vm", "volume"}, nil)
	hubCsumSame  = prometheus.NewDesc("repagent_hub_csum_matched_bytes_total", "Bytes a checksum resync found equal and did not read, since the hub started.", []string{"vm", "volume"}, nil)
	hubCsumDiff  = prometheus.NewDesc("repagent_hub_csum_differ_bytes_total", "Bytes a checksum resync found different and read, since the hub started.", []string{"vm", "volume"}, nil)
)

// Hub returns a registry with the hub's collectors and the process ones.
func Hub(h *hub.Hub) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(&hubCollector{h: h})
	return reg
}

type hubCollector struct{ h *hub.Hub }

func (c *hubCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{hubSync, hubResync, hubBacklog, hubBackIOs, hubLag, hubApplied, hubRemote, hubVMConn, hubAppliedN, hubStoreErr, hubStoreErs, hubStoreTry, hubCPAge, hubCPSeq, hubResyncing, hubJBytes, hubVerifyN, hubVerifyBad, hubVerifyNow, hubCsumSame, hubCsumDiff} {
		ch <- d
	}
}

func (c *hubCollector) Collect(ch chan<- prometheus.Metric) {
	for _, vm := range c.h.Status() {
		ch <- prometheus.MustNewConstMetric(hubVMConn, prometheus.GaugeValue, b2f(vm.Connected), vm.VM)
		if j := vm.Journal; j != nil {
			ch <- prometheus.MustNewConstMetric(hubCPAge, prometheus.GaugeValue, j.ConsistentAge, vm.VM)
			ch <- prometheus.MustNewConstMetric(hubCPSeq, prometheus.GaugeValue, float64(j.ConsistentSeq), vm.VM)
			ch <- prometheus.MustNewConstMetric(hubResyncing, prometheus.GaugeValue, b2f(j.Resyncing), vm.VM)
			ch <- prometheus.MustNewConstMetric(hubJBytes, prometheus.GaugeValue, float64(j.Bytes), vm.VM)
		}
		for _, v := range vm.Volumes {
			ch <- prometheus.MustNewConstMetric(hubSync, prometheus.GaugeValue, v.SyncProgress, vm.VM, v.Volume, v.State)
			ch <- prometheus.MustNewConstMetric(hubResync, prometheus.GaugeValue, float64(v.ResyncBytes), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubBacklog, prometheus.GaugeValue, float64(v.BacklogBytes), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubBackIOs, prometheus.GaugeValue, float64(v.BacklogIOs), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubLag, prometheus.GaugeValue, v.BacklogSeconds, vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubApplied, prometheus.CounterValue, float64(v.AppliedBytes), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubRemote, prometheus.CounterValue, float64(v.RemoteReadBytes), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubAppliedN, prometheus.GaugeValue, float64(v.AppliedSeq), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubStoreErr, prometheus.GaugeValue, b2f(v.State == hub.StateStoreError), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubStoreErs, prometheus.CounterValue, float64(v.StoreErrors), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubStoreTry, prometheus.CounterValue, float64(v.StoreRetries), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubVerifyN, prometheus.CounterValue, float64(v.VerifyRuns), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubVerifyBad, prometheus.CounterValue, float64(v.VerifyMismatches), vm.VM, v.Volume)
			last := 0.0
			if v.LastVerify != nil {
				last = float64(v.LastVerify.Mismatches)
			}
			ch <- prometheus.MustNewConstMetric(hubVerifyNow, prometheus.GaugeValue, last, vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubCsumSame, prometheus.CounterValue, float64(v.CsumMatchedBytes), vm.VM, v.Volume)
			ch <- prometheus.MustNewConstMetric(hubCsumDiff, prometheus.CounterValue, float64(v.CsumDifferBytes), vm.VM, v.Volume)
		}
	}
}
