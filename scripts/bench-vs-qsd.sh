#!/usr/bin/env bash
# bench-vs-qsd.sh measures vhostdm against qemu-storage-daemon (QSD) on this
# machine, in one run, with the same client (`vhostdm bench`, the vhost
# front-end client in package vhost) and the same workloads.
#
#   scripts/bench-vs-qsd.sh [--json] [--runs N] [--duration D] [--env K=V]... [--keep]
#
# --env sets an environment variable of `vhostdm serve`, e.g.
# --env VHOSTDM_INLINE=50us to measure the inline dispatch tunable
# (docs/PERFORMANCE.md); --keep keeps the temporary directory.
#
# It builds vhostdm, makes a temporary directory with a 500 MiB image of
# random data and a copy of it, starts `vhostdm serve` and
# qemu-storage-daemon side by side with equivalent back ends, and runs every
# row --runs times (default 3), alternating which server goes first, then
# prints the medians (docs/PERFORMANCE.md explains the method):
#
#   1   4k randread QD32, 2 queues: vhostdm zero       vs QSD null-co (read-zeroes=on)
#   2   4k randread QD32, 1 queue:  same back ends
#   3   4k randwrite QD32, 1 queue: vhostdm linear     vs QSD file on a copy of the image
#   4r  1M sequential read QD8:     same files
#   4w  1M sequential write QD8:    same files
#   5   4k randread QD32, 1 queue:  vhostdm linear (1 line) and a 1000-line
#       table of linear segments over the same image vs QSD file
#
# Both servers use the page cache in writeback mode: vhostdm's file backend
# does buffered preadv/pwritev and the export offers a writeback cache; QSD
# runs the file driver with cache.direct=off, aio=threads, writethrough=off
# (its defaults), on one IOThread as recommended for performance.
#
# Environment: QSD (default /usr/bin/qemu-storage-daemon), GO (default go).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
duration=5s
json=0
keep=0
venv=()
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs=$2; shift 2 ;;
	--runs=*) runs=${1#*=}; shift ;;
	--duration) duration=$2; shift 2 ;;
	--duration=*) duration=${1#*=}; shift ;;
	--json) json=1; shift ;;
	--keep) keep=1; shift ;;
	--env) venv+=("$2"); shift 2 ;;
	--env=*) venv+=("${1#*=}"); shift ;;
	-h|--help) sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "bench-vs-qsd.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
if ! [[ "$runs" =~ ^[0-9]+$ ]] || [ "$runs" -lt 1 ]; then
	echo "bench-vs-qsd.sh: --runs $runs: want a positive number" >&2
	exit 2
fi
QSD=${QSD:-/usr/bin/qemu-storage-daemon}
GO=${GO:-go}
[ -x "$QSD" ] || { echo "bench-vs-qsd.sh: $QSD not found (scripts/setup.sh installs it)" >&2; exit 1; }

log() { echo "bench-vs-qsd: $*" >&2; }

dir=$(mktemp -d /tmp/vhostdm-bench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do
		kill "$p" 2>/dev/null || true
	done
	for p in "${pids[@]}"; do
		wait "$p" 2>/dev/null || true
	done
	if [ "$keep" = 1 ]; then
		log "kept $dir"
	else
		rm -rf "$dir"
	fi
}
trap cleanup EXIT

log "building vhostdm"
"$GO" build -o "$dir/vhostdm" ./cmd/vhostdm
bin=$dir/vhostdm

# The image: 1000 segments of 512 KiB (1024 sectors) of random data, and a
# copy for QSD. Both are written through the page cache and synced, so that
# background writeback of the set-up does not run during the measurements.
seg_sectors=1024
nseg=1000
img_sectors=$((seg_sectors * nseg))
log "making a $((img_sectors / 2048)) MiB image"
head -c $((seg_sectors * 512)) /dev/urandom >"$dir/seg"
for _ in $(seq "$nseg"); do cat "$dir/seg"; done >"$dir/vm.img"
cp "$dir/vm.img" "$dir/qsd.img"
sync

# The 1000-line table maps segment i to segment (i*389)%1000 of the image
# (389 is prime to 1000): a permutation, so every line has its own place.
{
	for ((i = 0; i < nseg; i++)); do
		echo "$((i * seg_sectors)) $seg_sectors linear $dir/vm.img $(((i * 389 % nseg) * seg_sectors))"
	done
} >"$dir/table1000"

cat >"$dir/vhostdm.toml" <<EOF
version = 1

[[device]]
name = "zero"
table = "0 2097152 zero"

[[device]]
name = "lin1"
table = "0 $img_sectors linear $dir/vm.img 0"

[[device]]
name = "lin1000"
table = """
$(cat "$dir/table1000")
"""

[[export]]
id = "zero"
device = "zero"
socket = "$dir/v-zero.sock"
num-queues = 2

[[export]]
id = "lin1"
device = "lin1"
socket = "$dir/v-lin1.sock"
num-queues = 1
writable = true

[[export]]
id = "lin1000"
device = "lin1000"
socket = "$dir/v-lin1000.sock"
num-queues = 1
writable = true
EOF

wait_socket() {
	local s=$1 i
	for ((i = 0; i < 500; i++)); do
		[ -S "$s" ] && return 0
		sleep 0.02
	done
	log "no socket $s"
	cat "$dir"/*.log >&2 || true
	exit 1
}

log "starting vhostdm serve"
env "${venv[@]}" "$bin" serve -c "$dir/vhostdm.toml" -log-level warn >"$dir/vhostdm.log" 2>&1 &
pids+=($!)
log "starting qemu-storage-daemon"
"$QSD" \
	--object iothread,id=io0 \
	--blockdev driver=null-co,node-name=null0,size=$((2097152 * 512)),read-zeroes=on \
	--blockdev driver=file,node-name=file0,filename="$dir/qsd.img",cache.direct=off,aio=threads \
	--export type=vhost-user-blk,id=null,node-name=null0,addr.type=unix,addr.path="$dir/q-null.sock",num-queues=2,iothread=io0 \
	--export type=vhost-user-blk,id=file,node-name=file0,addr.type=unix,addr.path="$dir/q-file.sock",num-queues=1,writable=on,iothread=io0 \
	>"$dir/qsd.log" 2>&1 &
pids+=($!)
for s in v-zero v-lin1 v-lin1000 q-null q-file; do
	wait_socket "$dir/$s.sock"
done

results=$dir/results.jsonl
: >"$results"

# measure ROW SERVER SOCKET BENCH-ARGS... runs one vhostdm bench and
# appends its result, tagged, to the results file.
measure() {
	local row=$1 server=$2 sock=$3
	shift 3
	local out
	if ! out=$("$bin" bench --socket "$dir/$sock.sock" --duration "$duration" --json "$@" 2>"$dir/bench.err"); then
		log "row $row $server failed: $(cat "$dir/bench.err")"
		exit 1
	fi
	echo "{\"row\":\"$row\",\"server\":\"$server\",\"run\":$run,\"result\":$out}" >>"$results"
	log "run $run row $row $server: $(echo "$out" | sed -E 's/.*"iops":([0-9.]+).*/\1/') IOPS"
}

# row ROW VHOSTDM-SOCKET QSD-SOCKET BENCH-ARGS... measures both servers,
# vhostdm first in odd runs and QSD first in even runs.
row() {
	local r=$1 vs=$2 qs=$3
	shift 3
	if [ $((run % 2)) = 1 ]; then
		measure "$r" vhostdm "$vs" "$@"
		measure "$r" qsd "$qs" "$@"
	else
		measure "$r" qsd "$qs" "$@"
		measure "$r" vhostdm "$vs" "$@"
	fi
}

log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((run = 1; run <= runs; run++)); do
	row 1 v-zero q-null --rw randread --bs 4096 --iodepth 32 --queues 2
	row 2 v-zero q-null --rw randread --bs 4096 --iodepth 32 --queues 1
	row 3 v-lin1 q-file --rw randwrite --bs 4096 --iodepth 32 --queues 1
	row 4r v-lin1 q-file --rw read --bs 1048576 --iodepth 8 --queues 1
	row 4w v-lin1 q-file --rw write --bs 1048576 --iodepth 8 --queues 1
	# Row 5: the one-line and the 1000-line tables and QSD, in turn.
	r5=(--rw randread --bs 4096 --iodepth 32 --queues 1)
	if [ $((run % 2)) = 1 ]; then
		measure 5 vhostdm v-lin1 "${r5[@]}"
		measure 5 vhostdm-1000 v-lin1000 "${r5[@]}"
		measure 5 qsd q-file "${r5[@]}"
	else
		measure 5 qsd q-file "${r5[@]}"
		measure 5 vhostdm-1000 v-lin1000 "${r5[@]}"
		measure 5 vhostdm v-lin1 "${r5[@]}"
	fi
done
load=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average after: $load"

report_args=(--report "$results" --note "$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $load, runs $runs x $duration${venv[*]:+, vhostdm env ${venv[*]}}")
if [ "$json" = 1 ]; then
	report_args+=(--json)
fi
"$bin" bench "${report_args[@]}"
