package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// writePEM writes a certificate or key in PEM.
func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// makeCerts writes QEMU's server layout (ca-cert.pem, server-cert.pem,
// server-key.pem) to srv and libnbd's client layout (ca-cert.pem,
// client-cert.pem, client-key.pem) to cli, both signed by one new CA.
func makeCerts(t *testing.T, srv, cli, nocert string) {
	t.Helper()
	for _, d := range []string{srv, cli, nocert} {
		os.MkdirAll(d, 0o700)
	}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vhostdm test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, cn string, usage x509.ExtKeyUsage, certPath, keyPath string) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{usage},
			KeyUsage: x509.KeyUsageDigitalSignature, DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, certPath, "CERTIFICATE", der)
		kd, _ := x509.MarshalPKCS8PrivateKey(key)
		writePEM(t, keyPath, "PRIVATE KEY", kd)
	}
	for _, d := range []string{srv, cli, nocert} {
		writePEM(t, filepath.Join(d, "ca-cert.pem"), "CERTIFICATE", caDER)
	}
	leaf(2, "localhost", x509.ExtKeyUsageServerAuth, filepath.Join(srv, "server-cert.pem"), filepath.Join(srv, "server-key.pem"))
	leaf(3, "backup client", x509.ExtKeyUsageClientAuth, filepath.Join(cli, "client-cert.pem"), filepath.Join(cli, "client-key.pem"))
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestNBDTLS serves an inet export with QEMU-layout x509 credentials:
// nbdcopy over nbds:// with a client certificate copies the device's
// bytes; a plain nbd:// client and a client without a certificate are
// refused.
func TestNBDTLS(t *testing.T) {
	needTool(t, "nbdcopy", "libnbd-bin")
	needTool(t, "nbdinfo", "libnbd-bin")
	dir := t.TempDir()
	want := randomFile(t, filepath.Join(dir, "disk.img"), 2<<20, 7)
	srv, cli, nocert := filepath.Join(dir, "srv"), filepath.Join(dir, "cli"), filepath.Join(dir, "nocert")
	makeCerts(t, srv, cli, nocert)
	port := freePort(t)
	startTestDaemon(t, dir, fmt.Sprintf(`
[[device]]
name = "disk"
table = "0 4096 linear disk.img 0"

[[export]]
id = "t0"
type = "nbd"
device = "disk"
listen = "127.0.0.1:%d"
tls-creds = "srv"
`, port))
	uri := fmt.Sprintf("nbds://127.0.0.1:%d/disk?tls-certificates=%s", port, cli)
	out := filepath.Join(dir, "copy")
	tool(t, "nbdcopy", uri, out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
		t.Error("nbdcopy over TLS: copy differs from the device")
	}
	for _, bad := range []string{
		fmt.Sprintf("nbd://127.0.0.1:%d/disk", port),
		fmt.Sprintf("nbds://127.0.0.1:%d/disk?tls-certificates=%s", port, nocert),
	} {
		o, err := exec.Command("nbdinfo", bad).CombinedOutput()
		if err == nil {
			t.Errorf("nbdinfo %s succeeded: %s", bad, o)
		}
		t.Logf("refused: %s", bytes.TrimSpace(o))
	}
}
