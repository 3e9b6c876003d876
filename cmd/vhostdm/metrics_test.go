package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// scrape fetches /metrics and returns the value of the first sample whose
// line matches the pattern (name and labels), or -1.
func scrape(t *testing.T, addr string) func(pattern string) float64 {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return func(pattern string) float64 {
		m := regexp.MustCompile(`(?m)^` + pattern + ` ([0-9.e+-]+)$`).FindSubmatch(body)
		if m == nil {
			return -1
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		return v
	}
}

// TestMetricsMoveWithIO scrapes the Prometheus endpoint of a running daemon
// and checks that the counters follow the guest's I/O and a reload.
func TestMetricsMoveWithIO(t *testing.T) {
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "disk.img"), 8<<20)
	path := writeConfig(t, dir, serveConfig+"\n[metrics]\nlisten = \"127.0.0.1:0\"\n")
	c, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	d, err := startDaemon(ctx, c, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	cl, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, "root.sock")})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	buf, _ := cl.Buf(64 << 10)
	for i := 0; i < 10; i++ {
		if err := cl.WriteAt(ctx, 0, buf, uint64(i*128)); err != nil {
			t.Fatal(err)
		}
	}
	if err := cl.ReadAt(ctx, 0, buf, 0); err != nil {
		t.Fatal(err)
	}
	cl.Flush(ctx, 0)
	if err := cl.ReadAt(ctx, 0, buf[:4096], 1<<20); err == nil {
		t.Fatal("read past the end succeeded")
	}
	get := scrape(t, d.metricsAddr)
	lbl := `\{device="root",export="root0",op="%s"\}`
	for pattern, want := range map[string]float64{
		`vhostdm_export_requests_total` + fmt.Sprintf(lbl, "write"):                 10,
		`vhostdm_export_bytes_total` + fmt.Sprintf(lbl, "write"):                    10 * 64 << 10,
		`vhostdm_export_requests_total` + fmt.Sprintf(lbl, "read"):                  1,
		`vhostdm_export_bytes_total` + fmt.Sprintf(lbl, "read"):                     64 << 10,
		`vhostdm_export_requests_total` + fmt.Sprintf(lbl, "flush"):                 1,
		`vhostdm_export_request_duration_seconds_count` + fmt.Sprintf(lbl, "write"): 10,
		`vhostdm_export_inflight_requests\{device="root",export="root0"\}`:          0,
		`vhostdm_vhost_user_connects_total\{export="root0"\}`:                       1,
		`vhostdm_device_suspended\{device="root"\}`:                                 0,
		`vhostdm_export_queue_depth\{export="root0",queue="0"\}`:                    0,
		`vhostdm_export_lost_interrupts_total\{export="root0"\}`:                    0,
		`vhostdm_device_size_bytes\{device="root"\}`:                                8192 * 512,
		`vhostdm_device_table_swaps_total\{device="root"\}`:                         1,
	} {
		if got := get(pattern); got != want {
			t.Errorf("%s = %v, want %v", pattern, got, want)
		}
	}
	root, _ := d.m.Get("root")
	if err := root.Reload("0 8192 linear disk.img 0"); err != nil {
		t.Fatal(err)
	}
	if got := scrape(t, d.metricsAddr)(`vhostdm_device_table_swaps_total\{device="root"\}`); got != 2 {
		t.Errorf("table swaps after a reload: %v, want 2", got)
	}
}
