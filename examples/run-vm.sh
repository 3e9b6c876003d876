#!/usr/bin/env bash
# run-vm.sh CONFIG [--test WORKLOAD] [vmrun options...]
#
# Boots a test VM on vhostdm disks: builds vhostdm and the e2e guest tools,
# creates the config's images (sparse) if missing, starts
# `vhostdm serve -c CONFIG`, then QEMU (TCG) with every export of CONFIG
# attached as a vhost-user-blk-pci disk (vda, vdb, ... in export order)
# and Debian's kernel with the e2e guest initramfs.
#
# Without --test you get an interactive busybox shell on the console (exit
# it, or press Ctrl-A x, to stop). With --test the guest runs WORKLOAD, a
# comma-separated list of guest steps each optionally "@vdX" (info, verify,
# readverify, flush, discard, zeroes, readonly, writer, writercheck, resize,
# fio), and the script exits 0 if every step passed, 1 if one failed, 2 if
# the VM could not run.
#
# Examples:
#   examples/run-vm.sh examples/vm-basic.toml
#   examples/run-vm.sh examples/vm-basic.toml --test info,verify
#   examples/run-vm.sh examples/vm-striped.toml --test info,verify@vda,readonly@vdb
#   examples/run-vm.sh examples/vm-basic.toml --test fio
#
# Needs what scripts/setup.sh installs (QEMU, the kernel, busybox-static, fio).
# Environment: VHOSTDM_LOG (default: a temporary file) receives vhostdm's log.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
CONFIG=$(realpath "$1")
shift
[ -f "$CONFIG" ] || { echo "run-vm.sh: no config $CONFIG" >&2; exit 2; }

TEST=""
EXTRA=()
while [ $# -gt 0 ]; do
	case "$1" in
	--test) [ $# -ge 2 ] || usage; TEST=$2; shift 2 ;;
	--test=*) TEST=${1#--test=}; shift ;;
	-h|--help) usage 0 ;;
	*) EXTRA+=("$1"); shift ;;
	esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(mktemp -d /tmp/vhostdm-run-vm.XXXXXX)
LOG=${VHOSTDM_LOG:-$BIN/vhostdm.log}
PID=""
cleanup() {
	if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
		kill "$PID" 2>/dev/null || true
		wait "$PID" 2>/dev/null || true
	fi
	if [ -z "${VHOSTDM_LOG:-}" ] && [ -s "$LOG" ] && [ "${STATUS:-0}" -ne 0 ]; then
		echo "run-vm.sh: vhostdm log:" >&2
		tail -n 40 "$LOG" >&2
	fi
	rm -rf "$BIN"
}
trap cleanup EXIT

(cd "$ROOT" && go build -o "$BIN/vhostdm" ./cmd/vhostdm && go build -o "$BIN/vmrun" ./test/e2e/cmd/vmrun)

"$BIN/vmrun" prepare -c "$CONFIG"

echo "run-vm.sh: vhostdm serve -c $CONFIG (log: $LOG)" >&2
"$BIN/vhostdm" serve -c "$CONFIG" >"$LOG" 2>&1 &
PID=$!
sleep 0.2
if ! kill -0 "$PID" 2>/dev/null; then
	echo "run-vm.sh: vhostdm serve exited at once:" >&2
	cat "$LOG" >&2
	STATUS=2
	exit 2
fi

STATUS=0
if [ -n "$TEST" ]; then
	(cd "$ROOT" && "$BIN/vmrun" qemu -c "$CONFIG" -test "$TEST" "${EXTRA[@]}") || STATUS=$?
else
	(cd "$ROOT" && "$BIN/vmrun" qemu -c "$CONFIG" "${EXTRA[@]}") || STATUS=$?
fi
exit "$STATUS"
