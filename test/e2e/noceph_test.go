//go:build !ceph

package e2e

// stopCeph stops the Ceph cluster of the rbd: tests, which only the
// build with -tags ceph has.
func stopCeph() {}
