//go:build !vhostdm_nouring

package vhost

// notifyUringOff is set by the vhostdm_nouring build tag (uring_off.go).
const notifyUringOff = false
