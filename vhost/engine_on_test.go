//go:build !vhostdm_nouring

package vhost

// wantEngine is the I/O engine the tests expect to run.
const wantEngine = "io_uring"
