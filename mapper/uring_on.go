//go:build !vhostdm_nouring

package mapper

// uringDisabled is set by the vhostdm_nouring build tag (uring_off.go).
const uringDisabled = false
