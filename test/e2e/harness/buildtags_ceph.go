//go:build ceph

package harness

// buildTags are the tags the binaries the harness builds get: the e2e
// tests built with -tags ceph run a vhostdm with Ceph support.
const buildTags = "ceph"
