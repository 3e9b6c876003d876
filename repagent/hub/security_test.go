package hub_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// logBuffer collects a hub's log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// waitLog waits until the log holds a line with every one of want.
func waitLog(t *testing.T, b *logBuffer, want ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, line := range strings.Split(b.String(), "\n") {
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(line, w)
			}
			if ok {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q in:\n%s", want, b.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// closedWithin reports whether the peer closes nc, without sending
// anything, within d.
func closedWithin(nc net.Conn, d time.Duration) bool {
	nc.SetReadDeadline(time.Now().Add(d))
	_, err := nc.Read(make([]byte, 1))
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || err != nil && !isTimeout(err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestAuthorizeIdentity: with --authorize, a certificate authorised for
// vm1 replicates vm1 but cannot attach as vm2; the refusal is logged with
// both names and registers nothing.
func TestAuthorizeIdentity(t *testing.T) {
	ca := reptest.NewCA(t, "repagent-ca")
	dir := t.TempDir()
	_, hubFiles := ca.Issue(t, dir, "hub", true)
	cert1, host1Files := ca.Issue(t, dir, "host1", false)
	hubTLS, err := hubFiles.TLSConfig(true)
	if err != nil {
		t.Fatal(err)
	}
	host1TLS, err := host1Files.TLSConfig(false)
	if err != nil {
		t.Fatal(err)
	}
	authFile := filepath.Join(dir, "authorize")
	os.WriteFile(authFile, []byte("# identity VMs\nhost1 vm1\nhost2 vm2\n"), 0o600)
	auth, err := hub.LoadAuthorizations(authFile)
	if err != nil {
		t.Fatal(err)
	}
	var logs logBuffer
	r := reptest.New(t)
	r.HubCfg.TLS = hubTLS
	r.HubCfg.Authorize = auth
	r.HubCfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	r.StartHub()

	// host1 claims vm2: the TLS handshake succeeds, the HELLO is refused.
	nc, err := tls.Dial("tcp", r.Addr, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: ca.Pool,
		Certificates: []tls.Certificate{cert1}})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := nc.Write(wire.AppendFrame(nil, &wire.Hello{MaxVersion: 1, Session: 1, Name: "vm2"})); err != nil {
		t.Fatal(err)
	}
	// The answer is REFUSED with the reason, then the connection ends.
	rd := wire.NewReader(nc, 0)
	f, err := rd.ReadFrame()
	if err != nil {
		t.Fatalf("no answer to a refused HELLO: %v", err)
	}
	if m, err := wire.Decode(f); err != nil || m.Cmd() != wire.CmdRefused || !strings.Contains(m.(*wire.Refused).Reason, `not authorised for vm "vm2"`) {
		t.Fatalf("the hub answered a HELLO for vm2 from host1 with %s (%v), want REFUSED saying why", f.Cmd, err)
	}
	if f, err := rd.ReadFrame(); err == nil {
		t.Fatalf("the hub sent %s after REFUSED", f.Cmd)
	}
	line := waitLog(t, &logs, "hello refused", "vm=vm2", "host1")
	t.Logf("refusal: %s", line)
	if st := r.Hub.Status(); len(st) != 0 {
		t.Errorf("a refused HELLO registered VMs: %+v", st)
	}

	// The same certificate protects vm1.
	r.AgentCfg.TLS = host1TLS
	a := r.AddVolume("root", 2<<20)
	r.StartAgent(reptest.ProtectAll(a))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, a)
	r.CheckIdentical(a)
	waitLog(t, &logs, "agent connected", "identity=host1")
}

// TestAuthorizationsFile: the file's syntax, and identities from the
// common name, DNS and URI subject alternative names.
func TestAuthorizationsFile(t *testing.T) {
	a, err := hub.ParseAuthorizations(strings.NewReader(`
# comment
host1 vm1 vm2
host1 vm3
h2.example.net vm4
spiffe://example.net/host/h3 vm5
admin *
`), "auth")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://example.net/host/h3")
	cases := []struct {
		cert *x509.Certificate
		vm   string
		ok   bool
	}{
		{&x509.Certificate{Subject: pkix.Name{CommonName: "host1"}}, "vm1", true},
		{&x509.Certificate{Subject: pkix.Name{CommonName: "host1"}}, "vm3", true},
		{&x509.Certificate{Subject: pkix.Name{CommonName: "host1"}}, "vm4", false},
		{&x509.Certificate{Subject: pkix.Name{CommonName: "other"}, DNSNames: []string{"h2.example.net"}}, "vm4", true},
		{&x509.Certificate{Subject: pkix.Name{CommonName: "other"}, DNSNames: []string{"h2.example.net"}}, "vm1", false},
		{&x509.Certificate{URIs: []*url.URL{u}}, "vm5", true},
		{&x509.Certificate{URIs: []*url.URL{u}}, "vm4", false},
		{&x509.Certificate{Subject: pkix.Name{CommonName: "admin"}}, "anything", true},
		{&x509.Certificate{}, "vm1", false},
	}
	for _, c := range cases {
		if _, ok := a.Allows(hub.Identities(c.cert), c.vm); ok != c.ok {
			t.Errorf("%v claims %s: %v, want %v", hub.Identities(c.cert), c.vm, ok, c.ok)
		}
	}
	for text, want := range map[string]string{
		"host1\n":            "f:1: \"host1\": want an identity and at least one VM name",
		"\nhost1 vm1 a/b\n":  "f:2: VM name \"a/b\"",
		"host1 vm1\nh2 ..\n": "f:2: VM name \"..\"",
	} {
		if _, err := hub.ParseAuthorizations(strings.NewReader(text), "f"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: error %v, want %q", text, err, want)
		}
	}
}

// TestIdentityPolicyRequired: a TLS hub must be told whom to trust with
// which VM; identities mean nothing without TLS.
func TestIdentityPolicyRequired(t *testing.T) {
	ca := reptest.NewCA(t, "ca")
	dir := t.TempDir()
	_, files := ca.Issue(t, dir, "hub", true)
	tc, err := files.TLSConfig(true)
	if err != nil {
		t.Fatal(err)
	}
	auth, _ := hub.ParseAuthorizations(strings.NewReader("host1 vm1\n"), "a")
	for _, c := range []struct {
		name string
		cfg  hub.Config
		want string
	}{
		{"tls without a policy", hub.Config{TLS: tc}, "with TLS, name the VMs each certificate may claim"},
		{"authorize without tls", hub.Config{Authorize: auth}, "only with TLS"},
		{"any identity without tls", hub.Config{AllowAnyIdentity: true}, "only with TLS"},
		{"both policies", hub.Config{TLS: tc, Authorize: auth, AllowAnyIdentity: true}, "exclude each other"},
	} {
		c.cfg.Store = t.TempDir()
		c.cfg.Logger = reptest.Logger()
		if h, err := hub.New(c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			if h != nil {
				h.Close()
			}
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

// TestPreHelloFrameCap: a peer that announces a 16 MiB frame before HELLO
// is disconnected before the hub allocates it.
func TestPreHelloFrameCap(t *testing.T) {
	var logs logBuffer
	r := reptest.New(t)
	r.HubCfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	r.StartHub()
	hdr := make([]byte, wire.HeaderSize)
	// A HELLO header claiming the largest payload the hub takes after HELLO.
	hello := wire.AppendFrame(nil, &wire.Hello{MaxVersion: 1, Session: 1, Name: "vm1"})
	copy(hdr, hello[:wire.HeaderSize])
	hdr[16], hdr[17], hdr[18], hdr[19] = 0, 0, 0, 1 // len = 16 MiB, little-endian
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	const conns = 8
	for range conns {
		nc, err := net.Dial("tcp", r.Addr)
		if err != nil {
			t.Fatal(err)
		}
		nc.Write(hdr)
		nc.Write(make([]byte, 64<<10)) // some of the payload
		if !closedWithin(nc, 10*time.Second) {
			t.Fatalf("the hub kept a connection that announced a 16 MiB frame before HELLO")
		}
		nc.Close()
	}
	runtime.ReadMemStats(&after)
	// One 16 MiB buffer would be more than all of them together may take.
	if got := after.TotalAlloc - before.TotalAlloc; got >= 16<<20 {
		t.Errorf("%d connections with 16 MiB pre-HELLO frames allocated %d bytes", conns, got)
	} else {
		t.Logf("%d refused connections allocated %d bytes in all", conns, got)
	}
	waitLog(t, &logs, "no hello", "exceeds the maximum of 4096")
	// A real agent still replicates: the cap ends with HELLO.
	a := r.AddVolume("root", 2<<20)
	r.StartAgent(reptest.ProtectAll(a))
	r.WaitProtected(20*time.Second, a)
	r.CheckIdentical(a)
}

// TestConnectionCaps: connections beyond the per-peer cap, then beyond
// the total cap, are closed at once; closing one makes room again.
func TestConnectionCaps(t *testing.T) {
	var logs logBuffer
	r := reptest.New(t)
	r.HubCfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	r.HubCfg.MaxConns = 4
	r.HubCfg.MaxConnsPerPeer = 2
	r.StartHub()
	dialFrom := func(src string) net.Conn {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		nc, err := d.Dial("tcp", r.Addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		return nc
	}
	// Idle connections wait for HELLO (10 s): held open.
	held := func(nc net.Conn) bool { return !closedWithin(nc, 300*time.Millisecond) }
	a1, a2 := dialFrom("127.0.0.1"), dialFrom("127.0.0.1")
	if !held(a1) || !held(a2) {
		t.Fatal("connections under the caps were closed")
	}
	if a3 := dialFrom("127.0.0.1"); !closedWithin(a3, 5*time.Second) {
		t.Errorf("a third connection from one address was kept with a per-peer cap of 2")
	}
	waitLog(t, &logs, "connection refused", "peer=127.0.0.1", "maximum per peer")
	b1, b2 := dialFrom("127.0.0.2"), dialFrom("127.0.0.2")
	if !held(b1) || !held(b2) {
		t.Fatal("connections from another address were closed under the total cap")
	}
	if c1 := dialFrom("127.0.0.3"); !closedWithin(c1, 5*time.Second) {
		t.Errorf("a fifth connection was kept with a total cap of 4")
	}
	// Room again once one goes.
	a1.Close()
	deadline := time.Now().Add(10 * time.Second)
	for !held(dialFrom("127.0.0.1")) {
		if time.Now().After(deadline) {
			t.Fatal("no room for a new connection after one closed")
		}
	}
}
