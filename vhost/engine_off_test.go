//go:build vhostdm_nouring

package vhost

// wantEngine: the vhostdm_nouring tag forces the worker pool.
const wantEngine = "threads"
