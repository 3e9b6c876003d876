//go:build vhostdm_nouring

package vhost

// notifyUringOff: with the vhostdm_nouring build tag, which only tests use
// (go test -tags vhostdm_nouring), notifiers write their eventfds with
// write(2), as without io_uring, so that the suites run that path too.
const notifyUringOff = true
