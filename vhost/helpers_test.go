package vhost

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// testLogger logs to stderr when VHOST_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("VHOST_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// testEnv is a mapper device on a sparse file, exported on a socket.
type testEnv struct {
	dir     string
	backing string
	socket  string
	m       *mapper.Manager
	dev     *mapper.Device
	exp     *Export
	done    chan error
}

// newTestEnv makes a linear device over a sparse file of size bytes and
// serves it; cfg.Socket and cfg.ID are filled in when empty.
func newTestEnv(t testing.TB, size int64, cfg ExportConfig) *testEnv {
	t.Helper()
	dir := t.TempDir()
	env := &testEnv{dir: dir, backing: filepath.Join(dir, "disk.img"), socket: filepath.Join(dir, "vhost.sock")}
	f, err := os.Create(env.backing)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	env.m = mapper.NewManager(mapper.ManagerOptions{Logger: testLogger()})
	env.dev, err = env.m.CreateTable("vm0", "", !cfg.Writable, fmt.Sprintf("0 %d linear %s 0", size/512, env.backing))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Socket == "" {
		cfg.Socket = env.socket
	}
	if cfg.ID == "" {
		cfg.ID = "vm0-disk"
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger()
	}
	env.exp, err = NewExport(cfg, env.dev)
	if err != nil {
		t.Fatal(err)
	}
	env.done = make(chan error, 1)
	go func() { env.done <- env.exp.Serve(context.Background()) }()
	t.Cleanup(func() {
		env.exp.Close()
		select {
		case err := <-env.done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Close")
		}
		env.m.Close()
	})
	return env
}

// dial connects a client to the env's export.
func (env *testEnv) dial(t testing.TB, cfg frontend.Config) *frontend.Client {
	t.Helper()
	cfg.Socket = env.socket
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := frontend.Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// pattern returns n bytes that depend on seed.
func pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	x := seed*0x9e3779b97f4a7c15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

// alignUp rounds v up to a multiple of a.
func alignUp(v, a uint64) uint64 { return (v + a - 1) / a * a }
