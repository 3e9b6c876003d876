// Package e2e holds vhostdm's end-to-end tests: each boots a real QEMU
// (TCG) guest running Debian's kernel, whose virtio disks are
// vhost-user-blk exports of `vhostdm serve` (or, for the harness self-test
// and the fio comparison, qemu-storage-daemon), runs a workload in the
// guest (test/e2e/guestinit) and checks the backing files on the host
// after the guest powers off.
//
// Run with `go test ./test/e2e/` (add -v for timings and fio figures).
// QEMU, qemu-storage-daemon, the kernel, busybox-static and fio come from
// scripts/setup.sh; a missing one fails the suite with that advice.
//
// TestLibvirt runs a private libvirtd (system mode, in a private mount
// namespace; it needs root and the packages libvirt-daemon-system,
// libvirt-daemon-driver-qemu and libvirt-clients from scripts/setup.sh) and
// boots the guide's domain XML from docs/OPERATIONS.md.
//
// Environment:
//   - VHOSTDM_E2E_FIO_JSON=path: where to write the fio figures as JSON
//     (default $TMPDIR/vhostdm-e2e-fio.json).
//   - VHOSTDM_E2E_FIO_PERF=dir: TestFioVhostdmVsQSD records a perf profile
//     of each back end over each fio job (CPU samples with call graphs,
//     system call entries) in dir/BACKEND-JOB.perf.data; profiling
//     perturbs the CPU figures it reports.
//   - VHOSTDM_E2E_BACKEND=qsd: serve the vhostdm tests' configs with
//     qemu-storage-daemon instead (single-line linear tables only), to tell
//     a test's mistake from the daemon's: what fails there too is the
//     test's, or a feature QSD lacks (configurable serial, write-back cache).
//   - VHOSTDM_E2E_KERNEL=/boot/vmlinuz-...: the guest kernel (default: the
//     newest with modules installed).
//   - VHOSTDM_E2E_LOGDIR: where failed tests save the guest console
//     (default $TMPDIR).
//   - VHOSTDM_E2E_SOAK_RUNS, VHOSTDM_E2E_SOAK_RUNTIME,
//     VHOSTDM_E2E_SOAK_MAXCPUS: the long version of TestFioSoak (guest
//     boots per back end, seconds per fio job, QEMU's -smp maxcpus).
//
// Every guest is started with -smp maxcpus of at least 2, even with one
// vCPU: with maxcpus 1 QEMU's TCG drops the guest's memory barriers
// against the back-end process and virtqueues hang (harness.Env.QEMUArgs).
package e2e
