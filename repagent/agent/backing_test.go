package agent_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/agent/actlog"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestChangedToOldHub: a changed volume (here: its image written while
// the agent was stopped) is told to a hub of protocol level 3 with CHANGED and a report
// generation; a hub below level 3 gets neither (it would close the
// connection on them) but the whole volume in the initial DIRTY_MAP.
// Either way the mark stays in the backing record until the hub has
// acknowledged that DIRTY_MAP.
func TestChangedToOldHub(t *testing.T) {
	for _, level := range []uint16{2, wire.MaxVersion} {
		r := reptest.New(t)
		v := r.AddVolume("a", 1<<20)
		al := filepath.Join(r.Dir, "vm.actlog")
		r.AgentCfg.ActivityLog = agent.ActivityLog{Path: al, Volumes: []actlog.Volume{{Name: "a", Size: 1 << 20}}}
		opts := map[*reptest.Vol]agent.VolumeOptions{v: {Protect: true, Backing: v.Dev.Backing}}
		// Protected by a real hub, then a clean stop: the activity log
		// and the backing record are clean.
		r.StartHub()
		r.StartAgent(opts)
		r.WaitProtected(20*time.Second, v)
		if err := r.Agent.Close(); err != nil {
			t.Fatal(err)
		}
		r.Agent.RecordStop()
		// The image is written while nothing serves it.
		f, err := os.OpenFile(v.Backing, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(reptest.Pattern(9, 4096), 8192); err != nil {
			t.Fatal(err)
		}
		f.Close()
		ln, accept := fakeHubLevel(t, level)
		r.Addr = ln.Addr().String()
		r.StartAgent(opts)
		changed := func() string {
			var rec struct {
				Volumes map[string]struct {
					Changed string `json:"changed"`
				} `json:"volumes"`
			}
			b, err := os.ReadFile(al + ".backing")
			if err == nil {
				err = json.Unmarshal(b, &rec)
			}
			if err != nil {
				t.Fatalf("level %d: the backing record: %v", level, err)
			}
			return rec.Volumes["a"].Changed
		}
		if changed() == "" {
			t.Fatalf("level %d: a volume with no record is not marked changed", level)
		}
		nc, rd, rep := accept()
		if len(rep.Volumes) != 1 {
			t.Fatalf("level %d: report %+v", level, rep)
		}
		if new := level >= 3; rep.Volumes[0].Changed != new || (rep.Gen != 0) != new {
			t.Fatalf("level %d: report %+v: CHANGED and a generation only to level 3", level, rep)
		}
		nc.Write(wire.AppendFrame(nil, &wire.StartProtect{Volume: 1, Name: "a", Mirror: true, Gen: rep.Gen}))
		dm, ok := next(t, rd).(*wire.DirtyMap)
		if !ok || !dm.Initial {
			t.Fatalf("level %d: %+v, want the initial DIRTY_MAP", level, dm)
		}
		whole := []wire.Extent{{Start: 0, Count: wire.RegionCount(2048, dm.RegionSectors)}}
		switch {
		case level < 3 && (len(dm.Extents) != 1 || dm.Extents[0] != whole[0]):
			t.Fatalf("level %d: initial DIRTY_MAP %+v, want the whole volume %+v", level, dm.Extents, whole)
		case level >= 3 && len(dm.Extents) != 0:
			t.Fatalf("level %d: initial DIRTY_MAP %+v, want it empty (the hub compares by checksum)", level, dm.Extents)
		}
		if changed() == "" {
			t.Fatalf("level %d: the mark left the record before the hub acknowledged", level)
		}
		nc.Write(wire.AppendFrame(nil, &wire.WriteAck{Seq: dm.Seq}))
		for deadline := time.Now().Add(10 * time.Second); changed() != ""; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("level %d: the mark stays in the record after the hub acknowledged: %q", level, changed())
			}
		}
	}
}
