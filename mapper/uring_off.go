//go:build vhostdm_nouring

package mapper

// uringDisabled: with the vhostdm_nouring build tag, which only tests use
// (go test -tags vhostdm_nouring), NewIOQueue always fails, so that the
// suites run on the worker-pool engine.
const uringDisabled = true
