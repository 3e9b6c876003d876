package metrics

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
	_ "github.com/vhostdm/vhostdm/targets"
)

// value returns the value of the sample of family name whose labels include
// every pair of want, or -1.
func value(t *testing.T, g prometheus.Gatherer, name string, want map[string]string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if have[k] != v {
					continue next
				}
			}
			return sample(m)
		}
	}
	return -1
}

func sample(m *dto.Metric) float64 {
	switch {
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Counter != nil:
		return m.Counter.GetValue()
	}
	return -1
}

// TestReplicationMetrics runs a hub and an agent on loopback with one
// protected volume and checks that both sides' metrics follow the sync and
// the mirrored writes.
func TestReplicationMetrics(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	img := filepath.Join(dir, "v.img")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	h, err := hub.New(hub.Config{Store: filepath.Join(dir, "store"), Logger: log, Name: "hub"})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ln, err := h.Listen("127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go h.Serve(ctx, ln)

	m := mapper.NewManager(mapper.ManagerOptions{Logger: log})
	defer m.Close()
	dev, err := m.CreateTable("v", "", false, "0 8192 linear "+img+" 0")
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(agent.Config{Hub: ln.Addr().String(), VM: "vm1", Logger: log,
		Heartbeat: 50 * time.Millisecond, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	met := New()
	met.Devices(m)
	met.Agent(a)
	wrapped, err := a.Attach("v0", met.Wrap("v0", "v", dev), agent.VolumeOptions{Protect: true})
	if err != nil {
		t.Fatal(err)
	}
	go a.Run(ctx)
	defer a.Close()
	hubReg := Hub(h)

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	protecting := map[string]string{"vm": "vm1", "volume": "v0", "state": "protecting"}
	waitFor("the volume to be protected", func() bool {
		return value(t, hubReg, "repagent_hub_sync_progress_ratio", protecting) == 1
	})
	if v := value(t, met.Registry(), "vhostdm_repagent_connected", nil); v != 1 {
		t.Errorf("agent connected = %v", v)
	}
	if v := value(t, hubReg, "repagent_hub_vm_connected", map[string]string{"vm": "vm1"}); v != 1 {
		t.Errorf("hub vm connected = %v", v)
	}
	if v := value(t, hubReg, "repagent_hub_store_error", map[string]string{"volume": "v0"}); v != 0 {
		t.Errorf("hub store error = %v on a healthy store", v)
	}
	if v := value(t, hubReg, "repagent_hub_store_errors_total", map[string]string{"volume": "v0"}); v != 0 {
		t.Errorf("hub store errors total = %v on a healthy store", v)
	}
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i)
	}
	for i := 0; i < 8; i++ {
		if err := wrapped.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: uint64(i * 128), Sectors: 128, Data: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor("the hub to apply the writes", func() bool {
		return value(t, hubReg, "repagent_hub_applied_bytes_total", map[string]string{"volume": "v0"}) >= 8*64<<10 &&
			value(t, met.Registry(), "vhostdm_repagent_mirror_queue_bytes", map[string]string{"volume": "v0"}) == 0
	})
	if v := value(t, met.Registry(), "vhostdm_repagent_mirror_queue_age_seconds", map[string]string{"volume": "v0"}); v != 0 {
		t.Errorf("mirror queue age with nothing queued = %v", v)
	}
	if v := value(t, met.Registry(), "vhostdm_export_bytes_total", map[string]string{"export": "v0", "op": "write"}); v != 8*64<<10 {
		t.Errorf("export write bytes = %v", v)
	}
	if v := value(t, met.Registry(), "vhostdm_device_open_count", map[string]string{"device": "v"}); v != 0 {
		t.Errorf("open count = %v", v)
	}
}
