// Package metrics exports vhostdm's and repagent-hub's state to Prometheus:
// per export request counts, bytes, errors, latency histograms and requests
// in flight; per device suspended state, size, open count, events and table
// swaps (and a thin-pool's metadata cache and its bound); vhost-user connects and disconnects; per protected volume the
// replication agent's mirror backlog and dirty map; and, for the hub, sync
// progress, resync bytes, backlog and applied bytes per volume.
//
// Names follow Prometheus conventions: vhostdm_… for the daemon,
// repagent_hub_… for the hub, _total for counters, _seconds and _bytes for
// units. A Metrics value owns its own registry: nothing is global.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vhostdm/vhostdm/mapper"
)

// Metrics holds the daemon's collectors and their registry.
type Metrics struct {
	reg *prometheus.Registry

	ops         *prometheus.CounterVec
	bytes       *prometheus.CounterVec
	errs        *prometheus.CounterVec
	latency     *prometheus.HistogramVec
	inflight    *prometheus.GaugeVec
	connects    *prometheus.CounterVec
	disconnects *prometheus.CounterVec
}

// New returns a Metrics with the process and Go collectors registered.
func New() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	labels := []string{"export", "device", "op"}
	m.ops = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vhostdm_export_requests_total",
		Help: "Requests completed by an export, by operation (read, write, flush, discard, write-zeroes)."}, labels)
	m.bytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vhostdm_export_bytes_total",
		Help: "Bytes read, written, discarded or zeroed through an export."}, labels)
	m.errs = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vhostdm_export_request_errors_total",
		Help: "Requests of an export that failed (the guest saw an I/O error)."}, labels)
	m.latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "vhostdm_export_request_duration_seconds",
		Help:    "Time from a request reaching the mapper to its completion.",
		Buckets: prometheus.ExponentialBuckets(5e-6, 2.5, 14)}, labels)
	m.inflight = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "vhostdm_export_inflight_requests",
		Help: "Requests of an export being served now (held ones included while the device is suspended)."}, []string{"export", "device"})
	m.connects = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vhostdm_vhost_user_connects_total",
		Help: "vhost-user front ends (QEMU) that connected to an export."}, []string{"export"})
	m.disconnects = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vhostdm_vhost_user_disconnects_total",
		Help: "vhost-user front ends that went away from an export."}, []string{"export"})
	m.reg.MustRegister(m.ops, m.bytes, m.errs, m.latency, m.inflight, m.connects, m.disconnects)
	return m
}

// Registry returns the registry, for tests and for adding collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Connected counts a front end connecting to export.
func (m *Metrics) Connected(export string) { m.connects.WithLabelValues(export).Inc() }

// Disconnected counts a front end leaving export.
func (m *Metrics) Disconnected(export string) { m.disconnects.WithLabelValues(export).Inc() }

// BlockDevice is what an export serves (vhost.Device, repeated here so that
// this package does not depend on vhost).
type BlockDevice interface {
	Submit(r *mapper.Request) error
	Size() uint64
	ReadOnly() bool
	OnResize(fn func(oldSize, newSize uint64)) (cancel func())
}

// opMetrics are one operation's collectors, resolved once so that the
// request path does no label lookups.
type opMetrics struct {
	ops, bytes, errs prometheus.Counter
	latency          prometheus.Observer
}

// instrumented counts every request of one export.
type instrumented struct {
	BlockDevice
	inflight prometheus.Gauge
	ops      [mapper.OpWriteZeroes + 1]opMetrics
}

// Wrap returns dev with every request counted under export and device.
func (m *Metrics) Wrap(export, device string, dev BlockDevice) BlockDevice {
	w := &instrumented{BlockDevice: dev, inflight: m.inflight.WithLabelValues(export, device)}
	for op := mapper.OpRead; op <= mapper.OpWriteZeroes; op++ {
		l := []string{export, device, op.String()}
		w.ops[op] = opMetrics{ops: m.ops.WithLabelValues(l...), bytes: m.bytes.WithLabelValues(l...),
			errs: m.errs.WithLabelValues(l...), latency: m.latency.WithLabelValues(l...)}
	}
	return w
}

// Submit implements BlockDevice.
func (w *instrumented) Submit(r *mapper.Request) error {
	if int(r.Op) >= len(w.ops) {
		return w.BlockDevice.Submit(r)
	}
	om := &w.ops[r.Op]
	n := r.Bytes()
	w.inflight.Inc()
	start := time.Now()
	err := w.BlockDevice.Submit(r)
	om.latency.Observe(time.Since(start).Seconds())
	w.inflight.Dec()
	om.ops.Inc()
	if err != nil {
		om.errs.Inc()
	} else {
		om.bytes.Add(float64(n))
	}
	return err
}

// Unwrap returns the device Wrap was given.
func (w *instrumented) Unwrap() BlockDevice { return w.BlockDevice }

var queueDepth = prometheus.NewDesc("vhostdm_export_queue_depth",
	"Requests popped from a virtqueue and not yet completed.", []string{"export", "queue"}, nil)

// Queues registers a collector of per-virtqueue depths; depths returns
// them by export id.
func (m *Metrics) Queues(depths func() map[string][]int) {
	m.reg.MustRegister(&queueCollector{depths: depths})
}

type queueCollector struct{ depths func() map[string][]int }

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) { ch <- queueDepth }

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	for id, qs := range c.depths() {
		for i, n := range qs {
			ch <- prometheus.MustNewConstMetric(queueDepth, prometheus.GaugeValue, float64(n), id, strconv.Itoa(i))
		}
	}
}

var renotifies = prometheus.NewDesc("vhostdm_export_lost_interrupts_total",
	"Times a virtqueue's driver, a second after the last kick, had not consumed completions it was told of, and the call eventfd was signalled again.",
	[]string{"export"}, nil)

// Renotifies registers a collector of the exports' lost-interrupt
// counters; counts returns them by export id.
func (m *Metrics) Renotifies(counts func() map[string]uint64) {
	m.reg.MustRegister(&renotifyCollector{counts: counts})
}

type renotifyCollector struct{ counts func() map[string]uint64 }

func (c *renotifyCollector) Describe(ch chan<- *prometheus.Desc) { ch <- renotifies }

func (c *renotifyCollector) Collect(ch chan<- prometheus.Metric) {
	for id, n := range c.counts() {
		ch <- prometheus.MustNewConstMetric(renotifies, prometheus.CounterValue, float64(n), id)
	}
}

// Devices registers a collector of every device of mgr: suspended state,
// size, open count, event counter and table swaps, and for thin-pools the
// metadata cache and its bound.
func (m *Metrics) Devices(mgr *mapper.Manager) {
	m.reg.MustRegister(&deviceCollector{mgr: mgr})
}

var (
	devSuspended = prometheus.NewDesc("vhostdm_device_suspended", "1 while the device is suspended (new I/O held).", []string{"device"}, nil)
	devSize      = prometheus.NewDesc("vhostdm_device_size_bytes", "Size of the device's live table.", []string{"device"}, nil)
	devOpen      = prometheus.NewDesc("vhostdm_device_open_count", "Users of the device (exports, stacked tables).", []string{"device"}, nil)
	devEvents    = prometheus.NewDesc("vhostdm_device_events_total", "Device events (the dmsetup event counter).", []string{"device"}, nil)
	devSwaps     = prometheus.NewDesc("vhostdm_device_table_swaps_total", "Tables made live by resume (create, reload).", []string{"device"}, nil)
	devInactive  = prometheus.NewDesc("vhostdm_device_inactive_table", "1 while a loaded table waits for resume.", []string{"device"}, nil)
	devMetaCache = prometheus.NewDesc("vhostdm_device_metadata_cache_bytes",
		"Clean metadata blocks a thin-pool keeps in memory, in bytes.", []string{"device"}, nil)
	devMetaLimit = prometheus.NewDesc("vhostdm_device_metadata_cache_limit_bytes",
		"Bound of the thin-pool's metadata cache: device.metadata-cache, or the default sized for the pool.", []string{"device"}, nil)
)

type deviceCollector struct{ mgr *mapper.Manager }

func (c *deviceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{devSuspended, devSize, devOpen, devEvents, devSwaps, devInactive, devMetaCache, devMetaLimit} {
		ch <- d
	}
}

func (c *deviceCollector) Collect(ch chan<- prometheus.Metric) {
	for _, d := range c.mgr.Devices() {
		i := d.Info()
		ch <- prometheus.MustNewConstMetric(devSuspended, prometheus.GaugeValue, b2f(i.Suspended), i.Name)
		ch <- prometheus.MustNewConstMetric(devSize, prometheus.GaugeValue, float64(i.Size*mapper.SectorSize), i.Name)
		ch <- prometheus.MustNewConstMetric(devOpen, prometheus.GaugeValue, float64(i.OpenCount), i.Name)
		ch <- prometheus.MustNewConstMetric(devEvents, prometheus.CounterValue, float64(i.EventNr), i.Name)
		ch <- prometheus.MustNewConstMetric(devSwaps, prometheus.CounterValue, float64(i.Swaps), i.Name)
		ch <- prometheus.MustNewConstMetric(devInactive, prometheus.GaugeValue, b2f(i.InactiveTable), i.Name)
		if cached, limit, ok := d.MetadataCacheStats(); ok {
			ch <- prometheus.MustNewConstMetric(devMetaCache, prometheus.GaugeValue, float64(cached), i.Name)
			ch <- prometheus.MustNewConstMetric(devMetaLimit, prometheus.GaugeValue, float64(limit), i.Name)
		}
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Listen binds addr for Serve, so that a bad address is reported at start.
func Listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	return ln, nil
}

// Serve answers /metrics on ln until ctx is done.
func Serve(ctx context.Context, ln net.Listener, reg prometheus.Gatherer, log *slog.Logger) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slogAdapter{log}}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}

type slogAdapter struct{ log *slog.Logger }

func (a slogAdapter) Println(v ...any) { a.log.Warn("metrics", "err", fmt.Sprint(v...)) }
