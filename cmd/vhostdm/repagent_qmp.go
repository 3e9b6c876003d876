package main

import (
	"errors"
	"fmt"
)

// agentStatus is query-repagent's answer in vhostdm: the replication
// agent's state, in QMP's naming.
type agentStatus struct {
	VM          string              `json:"vm"`
	Connected   bool                `json:"connected"`
	Connects    int                 `json:"connects"`
	Acked       uint64              `json:"acked-seq"`
	Session     string              `json:"session"`
	Refused     string              `json:"refused,omitempty"`
	Hub         string              `json:"hub"`
	RPO         float64             `json:"rpo"`
	ActivityLog *activityLogStatus  `json:"activity-log,omitempty"`
	Volumes     []agentVolumeStatus `json:"volumes"`
}

type activityLogStatus struct {
	Path         string `json:"path"`
	Lost         bool   `json:"lost"`
	Hot          int    `json:"hot-extents"`
	Capacity     int    `json:"al-extents"`
	Transactions uint64 `json:"transactions"`
	Evictions    uint64 `json:"evictions"`
	Waits        uint64 `json:"waits"`
}

type agentVolumeStatus struct {
	Volume       string  `json:"volume"`
	Protect      bool    `json:"protect"`
	Mirroring    bool    `json:"mirroring"`
	Sync         bool    `json:"sync"`
	BacklogIOs   int     `json:"backlog-ios"`
	BacklogBytes int64   `json:"backlog-bytes"`
	BacklogAge   float64 `json:"backlog-age"`
	DirtyRegions uint64  `json:"dirty-regions"`
	ResyncReason string  `json:"resync-reason"`
	ResyncBytes  uint64  `json:"resync-bytes"`
	RemoteReads  uint64  `json:"remote-reads"`
	RemoteBytes  uint64  `json:"remote-read-bytes"`
	Mirrored     uint64  `json:"mirrored-writes"`
	Dirtied      uint64  `json:"dirtied-writes"`
	RPO          float64 `json:"rpo"`
	Overflows    uint64  `json:"overflows"`
	Suspended    uint64  `json:"suspended-writes"`
	ResyncReqs   uint64  `json:"resync-requests"`
	ResyncTotal  uint64  `json:"resync-requested-bytes"`
}

// qmpQueryRepagent answers query-repagent.
func (d *daemon) qmpQueryRepagent(map[string]string) (any, error) {
	if d.agent == nil {
		return nil, errors.New("no [repagent] in the configuration")
	}
	s := d.agent.Status()
	out := agentStatus{VM: d.repVM, Connected: s.Connected, Connects: s.Connects, Acked: s.Acked,
		Session: fmt.Sprintf("%016x", s.Session), Refused: s.Refused, Hub: s.Hub, RPO: s.RPO.Seconds(), Volumes: []agentVolumeStatus{}}
	if al := s.ActivityLog; al != nil {
		out.ActivityLog = &activityLogStatus{Path: al.Path, Lost: al.Lost, Hot: al.Hot, Capacity: al.Capacity,
			Transactions: al.Transactions, Evictions: al.Evictions, Waits: al.Waits}
	}
	for _, v := range s.Volumes {
		out.Volumes = append(out.Volumes, agentVolumeStatus{Volume: v.Name, Protect: v.Protect, Mirroring: v.Mirroring,
			Sync: v.Sync, BacklogIOs: v.BacklogIOs, BacklogBytes: v.BacklogBytes, BacklogAge: v.BacklogAge.Seconds(),
			DirtyRegions: v.DirtyRegions, ResyncReason: v.Resync.Reason, ResyncBytes: v.Resync.Bytes,
			RemoteReads: v.Stats.RemoteReads, RemoteBytes: v.Stats.RemoteBytes, Mirrored: v.Stats.Mirrored, Dirtied: v.Stats.Dirtied,
			RPO: v.RPO.Seconds(), Overflows: v.Stats.Overflows, Suspended: v.Stats.Suspended,
			ResyncReqs: v.Stats.ResyncRequests, ResyncTotal: v.Stats.ResyncBytes})
	}
	return out, nil
}
