package hub_test

import (
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/agent"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestTLSMutualAuth: an agent with a certificate from the hub's CA
// replicates; a client with another CA's certificate, or none, or plain
// TCP, is refused.
func TestTLSMutualAuth(t *testing.T) {
	ca := reptest.NewCA(t, "repagent-ca")
	dir := t.TempDir()
	_, hubFiles := ca.Issue(t, dir, "hub", true)
	_, agentFiles := ca.Issue(t, dir, "vm1", false)
	hubTLS, err := hubFiles.TLSConfig(true)
	if err != nil {
		t.Fatal(err)
	}
	agentTLS, err := agentFiles.TLSConfig(false)
	if err != nil {
		t.Fatal(err)
	}
	if hubTLS.MinVersion != tls.VersionTLS13 || hubTLS.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Fatalf("hub TLS config is not TLS 1.3 with required client certificates")
	}

	r := reptest.New(t)
	r.HubCfg.TLS = hubTLS
	r.HubCfg.AllowAnyIdentity = true
	r.StartHub()
	r.AgentCfg.TLS = agentTLS
	a := r.AddVolume("root", 4<<20)
	r.StartAgent(reptest.ProtectAll(a))
	stop := make(chan struct{})
	wait := r.RunWriters(stop, a)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	r.WaitProtected(20*time.Second, a)
	r.CheckIdentical(a)

	// A client whose certificate another CA signed.
	other := reptest.NewCA(t, "other-ca")
	bad, _ := other.Issue(t, dir, "intruder", false)
	refused := func(cfg *tls.Config) error {
		nc, err := tls.Dial("tcp", r.Addr, cfg)
		if err != nil {
			return err
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := nc.Write(wire.AppendFrame(nil, &wire.Hello{MaxVersion: 1, Session: 1, Name: "intruder"})); err != nil {
			return err
		}
		_, err = wire.NewReader(nc, 0).ReadFrame()
		return err
	}
	// GetClientCertificate sends it even though the hub asks for its own CA.
	force := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &bad, nil }
	if err := refused(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: ca.Pool, GetClientCertificate: force}); err == nil {
		t.Errorf("a client with another CA's certificate was served")
	} else {
		t.Logf("wrong certificate: %v", err)
	}
	if err := refused(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: ca.Pool}); err == nil {
		t.Errorf("a client without a certificate was served")
	}
	// Plain TCP to a TLS hub gets no HELLO back.
	nc, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	nc.Write(wire.AppendFrame(nil, &wire.Hello{MaxVersion: 1, Session: 1, Name: "plain"}))
	if _, err := wire.NewReader(nc, 0).ReadFrame(); err == nil {
		t.Errorf("a plain TCP client was served by a TLS hub")
	}
	nc.Close()
	if st := r.Hub.Status(); len(st) != 1 || st[0].VM != "vm1" {
		t.Errorf("refused clients registered VMs: %+v", st)
	}
}

// TestPlainTCPOnlyOnLoopback: without TLS, a non-loopback address needs
// insecure. No traffic is sent.
func TestPlainTCPOnlyOnLoopback(t *testing.T) {
	if _, err := agent.New(agent.Config{Hub: "192.0.2.1:7070", VM: "vm1"}); err == nil || !strings.Contains(err.Error(), "not a loopback address") {
		t.Errorf("agent to a remote hub without TLS: %v", err)
	}
	if _, err := agent.New(agent.Config{Hub: "192.0.2.1:7070", VM: "vm1", Insecure: true}); err != nil {
		t.Errorf("insecure agent: %v", err)
	}
	for _, ok := range []string{"127.0.0.1:1", "[::1]:1", "localhost:1", "127.1.2.3:1"} {
		if !wire.IsLoopback(ok) {
			t.Errorf("IsLoopback(%q) = false", ok)
		}
	}
	h, err := hub.New(hub.Config{Store: t.TempDir(), Logger: reptest.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.Listen("0.0.0.0:0", false); err == nil || !strings.Contains(err.Error(), "not a loopback address") {
		t.Errorf("hub listening on all addresses without TLS: %v", err)
	}
	if _, err := (wire.TLSFiles{Cert: "x"}).TLSConfig(true); err == nil {
		t.Errorf("incomplete TLS files accepted")
	}
}
