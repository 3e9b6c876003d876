//go:build !ceph

package harness

// buildTags are the tags the binaries the harness builds get.
const buildTags = ""
