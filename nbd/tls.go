package nbd

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
)

// TLSFromDir loads QEMU's tls-creds-x509 directory layout for a server:
// ca-cert.pem, server-cert.pem and server-key.pem. With verifyPeer (QEMU's
// default) clients must present a certificate signed by the CA, as libnbd
// does with tls-certificates=DIR holding client-cert.pem and
// client-key.pem.
func TLSFromDir(dir string, verifyPeer bool) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("tls-creds %s: %w", dir, err)
	}
	ca, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		return nil, fmt.Errorf("tls-creds %s: %w", dir, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("tls-creds %s: ca-cert.pem: no certificate", dir)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, MinVersion: tls.VersionTLS12}
	if verifyPeer {
		tc.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return tc, nil
}
