package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/qmpclient"
	"github.com/vhostdm/vhostdm/internal/sdnotify/sdnotifytest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// writeConfig writes text to dir/vm.toml and returns its path.
func writeConfig(t *testing.T, dir, text string) string {
	t.Helper()
	p := filepath.Join(dir, "vm.toml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func sparse(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
}

const serveConfig = `
[qmp]
socket = "qmp.sock"

[[device]]
name = "root"
table = "0 8192 linear disk.img 0"

[[export]]
id = "root0"
device = "root"
socket = "root.sock"
writable = true
num-queues = 2
serial = "vm-root"
`

// TestServeAndReloadConfig runs the daemon in-process on a configuration,
// drives its export with the vhost client, then changes the file and
// reloads it: the table changes under live I/O, a new device and export
// appear, and an invalid file changes nothing.
func TestServeAndReloadConfig(t *testing.T) {
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "disk.img"), 8<<20)
	sparse(t, filepath.Join(dir, "second.img"), 1<<20)
	path := writeConfig(t, dir, serveConfig)
	d, ctx := serveInProcess(t, path)

	cl, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, "root.sock"), NumQueues: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if id, err := cl.GetID(ctx, 0); err != nil || id != "vm-root" {
		t.Fatalf("serial %q %v", id, err)
	}
	data, _ := cl.Buf(64 << 10)
	for i := range data {
		data[i] = byte(i*7 + i>>9)
	}
	if err := cl.WriteAt(ctx, 1, data, 1000); err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(ctx, 0); err != nil {
		t.Fatal(err)
	}

	// The same data mapped through three lines, plus a new device and export.
	writeConfig(t, dir, strings.Replace(serveConfig, `table = "0 8192 linear disk.img 0"`, `table = """
0 1000 linear disk.img 0
1000 100 linear disk.img 1000
1100 7092 linear disk.img 1100
"""`, 1)+`
[[device]]
name = "second"
table = "0 2048 linear second.img 0"

[[export]]
id = "second0"
device = "second"
socket = "second.sock"
`)
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	root, _ := d.m.Get("root")
	if n := len(root.Status(mapper.StatusTable, false)); n != 3 {
		t.Fatalf("root has %d lines after reload, want 3", n)
	}
	back, _ := cl.Buf(len(data))
	if err := cl.ReadAt(ctx, 0, back, 1000); err != nil {
		t.Fatalf("read after reload: %v", err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("data differs after the table was reloaded")
	}
	cl2, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, "second.sock")})
	if err != nil {
		t.Fatalf("new export: %v", err)
	}
	if err := cl2.WriteAt(ctx, 0, data[:4096], 0); err == nil {
		t.Fatal("the new export is read-only by default, but a write succeeded")
	}
	cl2.Close()

	// An invalid file changes nothing.
	writeConfig(t, dir, strings.Replace(serveConfig, "0 8192 linear disk.img 0", "0 8192 linear missing.img 0", 1))
	err = d.reloadConfig(path)
	if err == nil || !strings.Contains(err.Error(), "missing.img") {
		t.Fatalf("invalid reload: %v", err)
	}
	if _, err := d.m.Get("second"); err != nil {
		t.Fatalf("invalid reload removed a device: %v", err)
	}
	if n := len(root.Status(mapper.StatusTable, false)); n != 3 {
		t.Fatal("invalid reload changed the table")
	}

	// Removing the second device and export from the file removes them.
	writeConfig(t, dir, serveConfig)
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	if _, err := d.m.Get("second"); err == nil {
		t.Fatal("device second still there")
	}
	if len(d.ex.List()) != 1 {
		t.Fatalf("exports %v", d.ex.List())
	}
}

// TestServeNotifyAndQuit runs `vhostdm serve` as systemd would, with a
// NOTIFY_SOCKET: READY=1 arrives once the exports listen, and QMP quit
// stops the daemon with exit status 0 after STOPPING=1.
func TestServeNotifyAndQuit(t *testing.T) {
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "disk.img"), 8<<20)
	path := writeConfig(t, dir, serveConfig)
	ns := sdnotifytest.Listen(t)
	exit := make(chan int, 1)
	go func() { exit <- run([]string{"serve", "-c", path, "-log-format", "json"}, io.Discard, io.Discard) }()

	if got := ns.Next(); !strings.HasPrefix(got, "READY=1\nSTATUS=serving 1 device(s), 1 export(s)") {
		t.Fatalf("first notification %q", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "root.sock")); err != nil {
		t.Fatalf("READY before the export listens: %v", err)
	}
	conn, err := net.Dial("unix", filepath.Join(dir, "qmp.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dec := json.NewDecoder(conn)
	var greeting map[string]any
	dec.Decode(&greeting)
	fmt.Fprint(conn, `{"execute":"qmp_capabilities"}{"execute":"reload-config","id":"r"}`)
	if got := ns.Next(); got != "RELOADING=1\n" {
		t.Fatalf("notification at reload-config %q", got)
	}
	if got := ns.Next(); !strings.HasPrefix(got, "READY=1\n") {
		t.Fatalf("notification after reload-config %q", got)
	}
	for {
		var reply map[string]any
		if err := dec.Decode(&reply); err != nil {
			t.Fatal(err)
		}
		if reply["id"] == "r" {
			if _, ok := reply["return"]; !ok {
				t.Fatalf("reload-config answered %v", reply)
			}
			break
		}
	}
	fmt.Fprint(conn, `{"execute":"quit"}`)
	if got := ns.Next(); got != "STOPPING=1\n" {
		t.Fatalf("notification at quit %q", got)
	}
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("exit status %d", code)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop after quit")
	}
}

const poolConfig = `
[metrics]
listen = "127.0.0.1:0"

[[device]]
name = "pool"
metadata-cache = "64k"
table = "0 262144 thin-pool meta.img data.img 128 0"
`

// TestReloadMetadataCache serves a thin-pool with device.metadata-cache
// and changes it by reloading the file: each change is in force on the
// live pool at once (the bound MetadataCacheStats reports, as the
// vhostdm_device_metadata_cache_limit_bytes metric), removing the key
// restores the default sized for the pool, and an invalid value is
// refused with file:line:key and changes nothing.
func TestReloadMetadataCache(t *testing.T) {
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "meta.img"), 4<<20)
	sparse(t, filepath.Join(dir, "data.img"), 128<<20)
	path := writeConfig(t, dir, poolConfig)
	d, _ := serveInProcess(t, path)
	pool, err := d.m.Get("pool")
	if err != nil {
		t.Fatal(err)
	}
	limit := func() int64 {
		t.Helper()
		cached, l, ok := pool.MetadataCacheStats()
		if !ok {
			t.Fatal("the pool reports no metadata cache")
		}
		get := scrape(t, d.metricsAddr)
		if m := get(`vhostdm_device_metadata_cache_limit_bytes\{device="pool"\}`); m != float64(l) {
			t.Fatalf("metric vhostdm_device_metadata_cache_limit_bytes %v, the pool's bound %d", m, l)
		}
		if m := get(`vhostdm_device_metadata_cache_bytes\{device="pool"\}`); m < 0 || m > float64(l) || cached > l {
			t.Fatalf("metric vhostdm_device_metadata_cache_bytes %v (pool: %d), bound %d", m, cached, l)
		}
		return l
	}
	if got := limit(); got != 64<<10 {
		t.Fatalf("metadata-cache 64k: bound %d", got)
	}
	writeConfig(t, dir, strings.Replace(poolConfig, `"64k"`, `"256k"`, 1))
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	if got := limit(); got != 256<<10 {
		t.Fatalf("after a reload to 256k: bound %d", got)
	}
	writeConfig(t, dir, strings.Replace(poolConfig, `"64k"`, `"0"`, 1))
	err = d.reloadConfig(path)
	if err == nil || !strings.Contains(err.Error(), `vm.toml:7: device[0].metadata-cache: "0": want a size from 64k to 16g`) {
		t.Fatalf("reload with metadata-cache 0: %v", err)
	}
	if got := limit(); got != 256<<10 {
		t.Fatalf("an invalid reload changed the bound to %d", got)
	}
	// 2048 data blocks want 96 KiB: the floor, 1 MiB.
	writeConfig(t, dir, strings.Replace(poolConfig, "metadata-cache = \"64k\"\n", "", 1))
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	if got := limit(); got != 1<<20 {
		t.Fatalf("after removing metadata-cache: bound %d, want the default, 1 MiB", got)
	}
}

// TestQMPCreateMetadataCache creates a thin-pool over QMP with dm-create's
// metadata-cache: the pool is created with that bound; a bound that is not
// whole 4 KiB blocks, out of range, given without a table, or given for a
// table with no thin-pool is refused with ErrInvalid's class and leaves
// no device behind.
func TestQMPCreateMetadataCache(t *testing.T) {
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "meta.img"), 4<<20)
	sparse(t, filepath.Join(dir, "data.img"), 128<<20)
	sock := filepath.Join(dir, "qmp.sock")
	path := writeConfig(t, dir, "[qmp]\nsocket = \"qmp.sock\"\n")
	d, ctx := serveInProcess(t, path)
	mon, err := qmpclient.Dial(ctx, "unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	pool := fmt.Sprintf("0 262144 thin-pool %s %s 128 0", filepath.Join(dir, "meta.img"), filepath.Join(dir, "data.img"))
	run := func(args string) error {
		_, err := mon.Run([]byte(`{"execute":"dm-create","arguments":` + args + `}`))
		return err
	}
	for _, bad := range []struct{ args, want string }{
		{`{"name":"p1","table":"` + pool + `","metadata-cache":4097}`, "whole 4 KiB blocks"},
		{`{"name":"p1","table":"` + pool + `","metadata-cache":4096}`, "whole 4 KiB blocks"},
		{`{"name":"p1","table":"` + pool + `","metadata-cache":17179869185000}`, "more than"},
		{`{"name":"p1","metadata-cache":65536}`, "needs a table"},
		{`{"name":"p1","table":"0 8 zero","metadata-cache":65536}`, "keeps a metadata cache"},
		{`{"name":"p1","table":"` + pool + `","metadata-cache":-1}`, "metadata-cache"},
	} {
		err := run(bad.args)
		var qe *qmpclient.Error
		if !errors.As(err, &qe) || !strings.Contains(qe.Desc, bad.want) {
			t.Errorf("dm-create %s: %v, want an error containing %q", bad.args, err, bad.want)
		}
		if _, err := d.m.Get("p1"); err == nil {
			t.Fatalf("dm-create %s was refused but left device p1", bad.args)
		}
	}
	if err := run(`{"name":"p1","table":"` + pool + `","metadata-cache":131072}`); err != nil {
		t.Fatal(err)
	}
	dev, err := d.m.Get("p1")
	if err != nil {
		t.Fatal(err)
	}
	if _, limit, ok := dev.MetadataCacheStats(); !ok || limit != 128<<10 {
		t.Fatalf("pool created with metadata-cache 128 KiB: bound %d (reported %v)", limit, ok)
	}
}
