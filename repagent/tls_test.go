package repagent

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCA is an in-process certificate authority.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
	pem  []byte
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns a leaf certificate for name, as PEM files in dir and as a
// tls.Certificate.
func (ca *testCA) issue(t *testing.T, dir, name string, server bool) (tls.Certificate, TLSFiles) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
	files := TLSFiles{Cert: filepath.Join(dir, name+".crt"), Key: filepath.Join(dir, name+".key"), CA: filepath.Join(dir, name+"-ca.crt")}
	os.WriteFile(files.Cert, certPEM, 0o600)
	os.WriteFile(files.Key, keyPEM, 0o600)
	os.WriteFile(files.CA, ca.pem, 0o600)
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return c, files
}

// TestTLSMutualAuth: an agent with a certificate from the hub's CA
// replicates; a client with another CA's certificate, or none, or plain
// TCP, is refused.
func TestTLSMutualAuth(t *testing.T) {
	ca := newTestCA(t, "repagent-ca")
	dir := t.TempDir()
	_, hubFiles := ca.issue(t, dir, "hub", true)
	_, agentFiles := ca.issue(t, dir, "vm1", false)
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

	r := newRig(t)
	r.hubCfg.TLS = hubTLS
	r.startHub()
	r.agentCfg.TLS = agentTLS
	a := r.addVolume("root", 4<<20)
	r.startAgent(protectAll(a))
	stop := make(chan struct{})
	wait := r.runWriters(stop, a)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	r.waitProtected(20*time.Second, a)
	r.checkIdentical(a)

	// A client whose certificate another CA signed.
	other := newTestCA(t, "other-ca")
	bad, _ := other.issue(t, dir, "intruder", false)
	refused := func(cfg *tls.Config) error {
		nc, err := tls.Dial("tcp", r.addr, cfg)
		if err != nil {
			return err
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := nc.Write(AppendFrame(nil, &Hello{MaxVersion: 1, Session: 1, Name: "intruder"})); err != nil {
			return err
		}
		_, err = NewReader(nc, 0).ReadFrame()
		return err
	}
	// GetClientCertificate sends it even though the hub asks for its own CA.
	force := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &bad, nil }
	if err := refused(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: ca.pool, GetClientCertificate: force}); err == nil {
		t.Errorf("a client with another CA's certificate was served")
	} else {
		t.Logf("wrong certificate: %v", err)
	}
	if err := refused(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: ca.pool}); err == nil {
		t.Errorf("a client without a certificate was served")
	}
	// Plain TCP to a TLS hub gets no HELLO back.
	nc, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	nc.Write(AppendFrame(nil, &Hello{MaxVersion: 1, Session: 1, Name: "plain"}))
	if _, err := NewReader(nc, 0).ReadFrame(); err == nil {
		t.Errorf("a plain TCP client was served by a TLS hub")
	}
	nc.Close()
	if st := r.hub.Status(); len(st) != 1 || st[0].VM != "vm1" {
		t.Errorf("refused clients registered VMs: %+v", st)
	}
}

// TestPlainTCPOnlyOnLoopback: without TLS, a non-loopback address needs
// insecure. No traffic is sent.
func TestPlainTCPOnlyOnLoopback(t *testing.T) {
	if _, err := NewAgent(AgentConfig{Hub: "192.0.2.1:7070", VM: "vm1"}); err == nil || !strings.Contains(err.Error(), "not a loopback address") {
		t.Errorf("agent to a remote hub without TLS: %v", err)
	}
	if _, err := NewAgent(AgentConfig{Hub: "192.0.2.1:7070", VM: "vm1", Insecure: true}); err != nil {
		t.Errorf("insecure agent: %v", err)
	}
	for _, ok := range []string{"127.0.0.1:1", "[::1]:1", "localhost:1", "127.1.2.3:1"} {
		if !IsLoopback(ok) {
			t.Errorf("IsLoopback(%q) = false", ok)
		}
	}
	h, err := NewHub(HubConfig{Store: t.TempDir(), Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.Listen("0.0.0.0:0", false); err == nil || !strings.Contains(err.Error(), "not a loopback address") {
		t.Errorf("hub listening on all addresses without TLS: %v", err)
	}
	if _, err := (TLSFiles{Cert: "x"}).TLSConfig(true); err == nil {
		t.Errorf("incomplete TLS files accepted")
	}
}
