package hub

import (
	"bufio"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/vhostdm/vhostdm/repagent/wire"
)

// Authorizations maps certificate identities to the VM names their
// holders may claim in HELLO. It is read from a text file (repagent-hub
// serve --authorize), one identity per line followed by its VM names:
//
//	# identity                      VM names
//	host1                           vm1 vm2
//	host2.example.net               vm3
//	spiffe://example.net/host/h3    vm4
//	backup-admin                    *
//
// An identity is a certificate's subject common name, one of its DNS
// subject alternative names, or one of its URI subject alternative names;
// "*" stands for every VM name. Blank lines and lines starting with # are
// ignored; a later line for the same identity adds names.
type Authorizations struct {
	vms map[string][]string // identity → VM names, or "*"
}

// LoadAuthorizations reads an authorization file.
func LoadAuthorizations(path string) (*Authorizations, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("authorize: %w", err)
	}
	defer f.Close()
	return ParseAuthorizations(f, path)
}

// ParseAuthorizations parses an authorization file's text; errors name
// the file (name) and the line.
func ParseAuthorizations(r io.Reader, name string) (*Authorizations, error) {
	a := &Authorizations{vms: map[string][]string{}}
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		if len(fields) < 2 {
			return nil, fmt.Errorf("%s:%d: %q: want an identity and at least one VM name", name, line, fields[0])
		}
		for _, vm := range fields[1:] {
			if vm == "*" {
				continue
			}
			if err := wire.CheckName(vm); err != nil {
				return nil, fmt.Errorf("%s:%d: VM name %q: %w", name, line, vm, err)
			}
		}
		a.vms[fields[0]] = append(a.vms[fields[0]], fields[1:]...)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return a, nil
}

// Identities returns the identities of a certificate that an
// authorization file may name: its common name, DNS names and URIs.
func Identities(cert *x509.Certificate) []string {
	var ids []string
	if cert.Subject.CommonName != "" {
		ids = append(ids, cert.Subject.CommonName)
	}
	ids = append(ids, cert.DNSNames...)
	for _, u := range cert.URIs {
		ids = append(ids, u.String())
	}
	return ids
}

// Allows reports whether one of ids may claim vm, and which.
func (a *Authorizations) Allows(ids []string, vm string) (string, bool) {
	for _, id := range ids {
		if names, ok := a.vms[id]; ok && (slices.Contains(names, vm) || slices.Contains(names, "*")) {
			return id, true
		}
	}
	return "", false
}
