package wire

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
)

// TLSFiles names the PEM files of one side's TLS identity and of the CA that
// signs the other side's certificate.
type TLSFiles struct {
	Cert, Key, CA string
}

// Set reports whether any file is named.
func (f TLSFiles) Set() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// TLSConfig loads f into a TLS 1.3 configuration with mutual
// authentication: a server requires and verifies client certificates
// signed by the CA, a client verifies the server's. All three files are
// required.
func (f TLSFiles) TLSConfig(server bool) (*tls.Config, error) {
	if f.Cert == "" || f.Key == "" || f.CA == "" {
		return nil, errors.New("tls: tls-cert, tls-key and tls-ca must all be set")
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("tls: %s: no PEM certificates", f.CA)
	}
	return MutualTLS(cert, pool, server), nil
}

// MutualTLS returns a TLS 1.3 configuration that presents cert and accepts
// only peers whose certificates pool verifies.
func MutualTLS(cert tls.Certificate, pool *x509.CertPool, server bool) *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}}
	if server {
		c.ClientAuth = tls.RequireAndVerifyClientCert
		c.ClientCAs = pool
	} else {
		c.RootCAs = pool
	}
	return c
}

// IsLoopback reports whether addr ("host:port") names a loopback address:
// an IP in 127.0.0.0/8 or ::1, or "localhost".
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// CheckPlain refuses plain TCP to or on a non-loopback address unless
// insecure is set.
func CheckPlain(addr string, insecure bool) error {
	if insecure || IsLoopback(addr) {
		return nil
	}
	return fmt.Errorf("%s is not a loopback address: set tls-cert, tls-key and tls-ca, or insecure = true", addr)
}
