package vhost

import (
	"errors"
	"testing"

	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// TestHandlersCoverDecodedRequests: every request the wire layer decodes
// has a method in the handler table, and no method is registered for a
// request the wire layer refuses as unknown (it could never run).
func TestHandlersCoverDecodedRequests(t *testing.T) {
	for code := wire.ReqCode(0); code < 64; code++ {
		_, err := wire.DecodePayload(code, nil)
		known := !errors.Is(err, wire.ErrUnknownRequest)
		var has bool
		if int(code) < len(handlers) {
			has = handlers[code] != nil
		}
		if known != has {
			t.Errorf("%s: decoded %v, handled %v", code, known, has)
		}
	}
}
