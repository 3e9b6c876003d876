#!/usr/bin/env bash
# bench-vs-qsd.sh measures vhostdm against qemu-storage-daemon (QSD) on this
# machine, in one run, with the same client (`vhostdm bench`, the vhost
# front-end client in package vhost) and the same workloads.
#
#   scripts/bench-vs-qsd.sh [--json] [--runs N] [--duration D] [--slice D] [--rows "1 2 3 4 5 6 7 8 9"]
#                           [--poll-us N | --adaptive-poll | --no-adaptive-poll] [--env K=V]...
#                           [--serve-bin PATH] [--keep]
#
# --poll-us sets export.poll-us of every vhostdm export (busy-polling,
# default off; docs/PERFORMANCE.md), --adaptive-poll and --no-adaptive-poll
# their adaptive-poll to true or false (QEMU-style adaptive polling; without
# either the exports keep the build's default, which is on since session 8
# and off before, for --serve-bin comparisons); --env sets an environment variable of
# `vhostdm serve`;
# --rows picks the rows to run (default all); --serve-bin serves with another
# vhostdm binary (an older build, for before/after comparisons in one run)
# while the tree's build drives and reports; --keep keeps the temporary
# directory.
#
# It builds vhostdm, makes a temporary directory with a 500 MiB image of
# random data and a copy of it, starts `vhostdm serve` and
# qemu-storage-daemon side by side with equivalent back ends, and runs every
# row --runs times (default 3), alternating which server goes first, then
# prints the medians (docs/PERFORMANCE.md explains the method):
#
#   1   4k randread QD32, 2 queues: vhostdm zero       vs QSD null-co (read-zeroes=on)
#   2   4k randread QD32, 1 queue:  same back ends
#   3   4k randwrite QD32, 1 queue: vhostdm linear     vs QSD file on copies of the image
#   4r  1M sequential read QD8:     same files
#   4w  1M sequential write QD8:    same files
#   5   4k randread QD32, 1 queue:  vhostdm linear (1 line) and a 1000-line
#       table of linear segments over the same image vs QSD file. The two
#       vhostdm devices are measured paired: one `vhostdm bench --pair` run
#       alternates them in slices of --slice (default 10ms; order A B B A
#       ..., --duration/--slice slices each, after a warm-up of each; the
#       two slices of a turn A B or B A read the same blocks) and reads the
#       server's CPU time between slices; the report prints, for each run,
#       the 1000-line/one-line IOPS ratio (the median over the quartets
#       A B B A of the ratio within each, and the ratio of the sums) and
#       the ratio of CPU-seconds per request, and whether every run is
#       within 3%. A control pair, two one-line devices over the image
#       ("vhostdm-ctl", "vhostdm-ctl2"), is measured the same way in every
#       run: its ratio is the measurement's noise
#   6   4k randwrite QD32, 1 queue, O_DIRECT: vhostdm linear with
#       cache = "none" vs QSD file with cache.direct=on, aio=native and
#       aio=io_uring (each on its own copy of the image)
#   7   4k randread QD32, 1 queue, O_DIRECT: same back ends
#   8   4k randwrite QD4, 1 queue, 300 µs think time (vhostdm bench
#       --think): a guest's trickle of requests, the back end idle between
#       them; vhostdm linear vs QSD file with aio=io_uring (page cache; the
#       configuration issue 22's guest goal names, and QSD's cheaper one
#       here). The IOPS follow the client's timers: compare the
#       CPU-seconds per million requests
#   9   4k randread, the same trickle
#
# Both servers use the page cache in writeback mode: vhostdm's file backend
# does buffered preadv/pwritev and the export offers a writeback cache; QSD
# runs the file driver with cache.direct=off and writethrough=off (its
# defaults), on one IOThread as recommended for performance, in both of its
# asynchronous modes: aio=threads (server "qsd", its default) and
# aio=io_uring ("qsd-uring", each on its own copy of the image). Ratios are
# against the faster of the two in each row. Rows 6 and 7 bypass the page
# cache on both sides: vhostdm's device has cache = "none" (O_DIRECT, the
# io_uring engine), QSD's file driver cache.direct=on with aio=native
# ("qsd-direct-native") and aio=io_uring ("qsd-direct-uring"); the ratio is
# against the faster of them.
#
# For every measurement it records the server process's CPU time (user +
# system, from /proc/PID/stat) and the load average; the report gives each
# server's CPU-seconds per million requests, and the machine's CPU model and
# load. It warns when the load average exceeds the CPU count: the figures of
# such a run are those of a loaded machine and are labelled so.
#
# Environment: QSD (default /usr/bin/qemu-storage-daemon), GO (default go).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
duration=5s
slice=10ms
json=0
keep=0
venv=()
rows="1 2 3 4 5 6 7 8 9"
serve_bin=
poll_us=0
adaptive_poll=0
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs=$2; shift 2 ;;
	--runs=*) runs=${1#*=}; shift ;;
	--duration) duration=$2; shift 2 ;;
	--duration=*) duration=${1#*=}; shift ;;
	--slice) slice=$2; shift 2 ;;
	--slice=*) slice=${1#*=}; shift ;;
	--json) json=1; shift ;;
	--keep) keep=1; shift ;;
	--rows) rows=$2; shift 2 ;;
	--rows=*) rows=${1#*=}; shift ;;
	--serve-bin) serve_bin=$2; shift 2 ;;
	--serve-bin=*) serve_bin=${1#*=}; shift ;;
	--poll-us) poll_us=$2; shift 2 ;;
	--adaptive-poll) adaptive_poll=1; shift ;;
	--no-adaptive-poll) adaptive_poll=-1; shift ;;
	--poll-us=*) poll_us=${1#*=}; shift ;;
	--env) venv+=("$2"); shift 2 ;;
	--env=*) venv+=("${1#*=}"); shift ;;
	-h|--help) sed -n '2,64p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "bench-vs-qsd.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
if [ "$poll_us" != 0 ] && [ "$adaptive_poll" != 0 ]; then
	echo "bench-vs-qsd.sh: --poll-us and --adaptive-poll or --no-adaptive-poll: choose one" >&2
	exit 2
fi
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
sbin=${serve_bin:-$bin}
[ -x "$sbin" ] || { echo "bench-vs-qsd.sh: --serve-bin $sbin: not an executable" >&2; exit 2; }

ncpu=$(nproc)
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
clk_tck=$(getconf CLK_TCK)
load1() { cut -d' ' -f1 /proc/loadavg; }
# loaded prints a warning when the load average exceeds the CPU count.
loaded() {
	local l
	l=$(load1)
	if awk -v l="$l" -v n="$ncpu" 'BEGIN { exit !(l > n) }'; then
		log "WARNING: load average $l exceeds the $ncpu CPUs: this is a loaded machine, label the figures so"
	fi
}
# cpu_ticks PID prints the process's user + system time in clock ticks
# (fields 14 and 15 of /proc/PID/stat, counted after the command name).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

# The image: 1000 segments of 512 KiB (1024 sectors) of random data, and a
# copy for QSD. Both are written through the page cache and synced, so that
# background writeback of the set-up does not run during the measurements.
# pollkey is the exports' poll-us line (none by default: an older
# --serve-bin build may not know the key).
pollkey=
if [ "$poll_us" != 0 ]; then
	pollkey="poll-us = $poll_us"
elif [ "$adaptive_poll" = 1 ]; then
	pollkey="adaptive-poll = true"
elif [ "$adaptive_poll" = -1 ]; then
	pollkey="adaptive-poll = false"
fi
seg_sectors=1024
nseg=1000
img_sectors=$((seg_sectors * nseg))
log "making a $((img_sectors / 2048)) MiB image"
head -c $((seg_sectors * 512)) /dev/urandom >"$dir/seg"
for _ in $(seq "$nseg"); do cat "$dir/seg"; done >"$dir/vm.img"
cp "$dir/vm.img" "$dir/qsd.img"
cp "$dir/vm.img" "$dir/qsdu.img"
direct=0
case " $rows " in *" 6 "* | *" 7 "*) direct=1 ;; esac
if [ "$direct" = 1 ]; then
	for c in vmd qsdn qsdd; do cp "$dir/vm.img" "$dir/$c.img"; done
fi
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
name = "lin1b"
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
$pollkey

[[export]]
id = "lin1"
device = "lin1"
socket = "$dir/v-lin1.sock"
num-queues = 1
writable = true
$pollkey

[[export]]
id = "lin1b"
device = "lin1b"
socket = "$dir/v-lin1b.sock"
num-queues = 1
writable = true
$pollkey

[[export]]
id = "lin1000"
device = "lin1000"
socket = "$dir/v-lin1000.sock"
num-queues = 1
writable = true
$pollkey
EOF
if [ "$direct" = 1 ]; then
	cat >>"$dir/vhostdm.toml" <<EOF

[[device]]
name = "lin1d"
cache = "none"
table = "0 $img_sectors linear $dir/vmd.img 0"

[[export]]
id = "lin1d"
device = "lin1d"
socket = "$dir/v-lin1d.sock"
num-queues = 1
writable = true
$pollkey
EOF
fi

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

log "starting vhostdm serve ($sbin)"
env "${venv[@]}" "$sbin" serve -c "$dir/vhostdm.toml" -log-level warn >"$dir/vhostdm.log" 2>&1 &
vpid=$!
pids+=($vpid)
log "starting qemu-storage-daemon"
qdirect=()
if [ "$direct" = 1 ]; then
	qdirect=(--blockdev driver=file,node-name=filen,filename="$dir/qsdn.img",cache.direct=on,aio=native
		--blockdev driver=file,node-name=filed,filename="$dir/qsdd.img",cache.direct=on,aio=io_uring
		--export type=vhost-user-blk,id=filen,node-name=filen,addr.type=unix,addr.path="$dir/q-filen.sock",num-queues=1,writable=on,iothread=io0
		--export type=vhost-user-blk,id=filed,node-name=filed,addr.type=unix,addr.path="$dir/q-filed.sock",num-queues=1,writable=on,iothread=io0)
fi
"$QSD" \
	--object iothread,id=io0 \
	--blockdev driver=null-co,node-name=null0,size=$((2097152 * 512)),read-zeroes=on \
	--blockdev driver=file,node-name=file0,filename="$dir/qsd.img",cache.direct=off,aio=threads \
	--blockdev driver=file,node-name=file1,filename="$dir/qsdu.img",cache.direct=off,aio=io_uring \
	--export type=vhost-user-blk,id=null,node-name=null0,addr.type=unix,addr.path="$dir/q-null.sock",num-queues=2,iothread=io0 \
	--export type=vhost-user-blk,id=file,node-name=file0,addr.type=unix,addr.path="$dir/q-file.sock",num-queues=1,writable=on,iothread=io0 \
	--export type=vhost-user-blk,id=fileu,node-name=file1,addr.type=unix,addr.path="$dir/q-fileu.sock",num-queues=1,writable=on,iothread=io0 \
	"${qdirect[@]}" >"$dir/qsd.log" 2>&1 &
qpid=$!
pids+=($qpid)
socks="v-zero v-lin1 v-lin1b v-lin1000 q-null q-file q-fileu"
if [ "$direct" = 1 ]; then
	socks="$socks v-lin1d q-filen q-filed"
fi
for s in $socks; do
	wait_socket "$dir/$s.sock"
done

results=$dir/results.jsonl
: >"$results"

# measure ROW SERVER SOCKET BENCH-ARGS... runs one vhostdm bench and
# appends its result, tagged with the server's CPU time over the run and
# the load average at its end, to the results file.
measure() {
	local row=$1 server=$2 sock=$3
	shift 3
	local out pid t0 t1 cpu l
	pid=$vpid
	case "$server" in qsd*) pid=$qpid ;; esac
	t0=$(cpu_ticks "$pid")
	if ! out=$("$bin" bench --socket "$dir/$sock.sock" --duration "$duration" --json "$@" 2>"$dir/bench.err"); then
		log "row $row $server failed: $(cat "$dir/bench.err")"
		exit 1
	fi
	t1=$(cpu_ticks "$pid")
	cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$clk_tck" 'BEGIN { printf "%.3f", (b - a) / hz }')
	l=$(load1)
	echo "{\"row\":\"$row\",\"server\":\"$server\",\"run\":$run,\"cpu_s\":$cpu,\"load1\":$l,\"result\":$out}" >>"$results"
	log "run $run row $row $server: $(echo "$out" | sed -E 's/.*"iops":([0-9.]+).*/\1/') IOPS, ${cpu} CPU-s, load $l"
	loaded
}

# pair ROW SERVER:SOCKET SERVER:SOCKET -- BENCH-ARGS... measures two vhostdm
# devices in one `vhostdm bench --pair` run, alternated in slices (the
# first given starts in odd runs, the second in even ones), each for
# --duration; the server's CPU time over each one's slices is in its result
# (server_cpu_s).
pair() {
	local r=$1 a=$2 b=$3
	shift 4
	case " $rows " in *" ${r%[rw]} "*) ;; *) return 0 ;; esac
	if [ $((run % 2)) = 0 ]; then
		local x=$a
		a=$b
		b=$x
	fi
	local out l s
	if ! out=$("$bin" bench --socket "$dir/${a#*:}.sock" --pair "$dir/${b#*:}.sock" --slice "$slice" --cpu-pid "$vpid" \
		--duration "$duration" --json "$@" 2>"$dir/bench.err"); then
		log "row $r ${a%%:*} / ${b%%:*} failed: $(cat "$dir/bench.err")"
		exit 1
	fi
	l=$(load1)
	for s in "${a%%:*}" "${b%%:*}"; do
		local res
		if [ "$s" = "${a%%:*}" ]; then res=$(sed -n 1p <<<"$out"); else res=$(sed -n 2p <<<"$out"); fi
		echo "{\"row\":\"$r\",\"server\":\"$s\",\"run\":$run,\"load1\":$l,\"result\":$res}" >>"$results"
		log "run $run row $r $s (paired): $(echo "$res" | sed -E 's/.*"iops":([0-9.]+).*/\1/') IOPS, $(echo "$res" | sed -E 's/.*"server_cpu_s":([0-9.]+).*/\1/') CPU-s, load $l"
	done
	loaded
}

# row ROW SERVER:SOCKET... -- BENCH-ARGS... measures each server in turn:
# in the order given in odd runs, in the reverse order in even runs.
row() {
	local r=$1 i
	shift
	local pairs=()
	while [ "$1" != "--" ]; do
		pairs+=("$1")
		shift
	done
	shift
	case " $rows " in *" ${r%[rw]} "*) ;; *) return 0 ;; esac
	if [ $((run % 2)) = 0 ]; then
		for ((i = ${#pairs[@]} - 1; i >= 0; i--)); do
			measure "$r" "${pairs[i]%%:*}" "${pairs[i]#*:}" "$@"
		done
	else
		for ((i = 0; i < ${#pairs[@]}; i++)); do
			measure "$r" "${pairs[i]%%:*}" "${pairs[i]#*:}" "$@"
		done
	fi
}

log "$ncpu CPUs, $cpu_model; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
loaded
for ((run = 1; run <= runs; run++)); do
	row 1 vhostdm:v-zero qsd:q-null -- --rw randread --bs 4096 --iodepth 32 --queues 2
	row 2 vhostdm:v-zero qsd:q-null -- --rw randread --bs 4096 --iodepth 32 --queues 1
	row 3 vhostdm:v-lin1 qsd:q-file qsd-uring:q-fileu -- --rw randwrite --bs 4096 --iodepth 32 --queues 1
	row 4r vhostdm:v-lin1 qsd:q-file qsd-uring:q-fileu -- --rw read --bs 1048576 --iodepth 8 --queues 1
	row 4w vhostdm:v-lin1 qsd:q-file qsd-uring:q-fileu -- --rw write --bs 1048576 --iodepth 8 --queues 1
	# Row 5: the one-line and the 1000-line tables paired, the control
	# pair of two one-line tables, then QSD.
	pair 5 vhostdm:v-lin1 vhostdm-1000:v-lin1000 -- --rw randread --bs 4096 --iodepth 32 --queues 1
	pair 5 vhostdm-ctl:v-lin1 vhostdm-ctl2:v-lin1b -- --rw randread --bs 4096 --iodepth 32 --queues 1
	row 5 qsd:q-file qsd-uring:q-fileu -- --rw randread --bs 4096 --iodepth 32 --queues 1
	row 6 vhostdm-direct:v-lin1d qsd-direct-native:q-filen qsd-direct-uring:q-filed -- --rw randwrite --bs 4096 --iodepth 32 --queues 1
	row 7 vhostdm-direct:v-lin1d qsd-direct-native:q-filen qsd-direct-uring:q-filed -- --rw randread --bs 4096 --iodepth 32 --queues 1
	row 8 vhostdm:v-lin1 qsd-uring:q-fileu -- --rw randwrite --bs 4096 --iodepth 4 --queues 1 --think 300us
	row 9 vhostdm:v-lin1 qsd-uring:q-fileu -- --rw randread --bs 4096 --iodepth 4 --queues 1 --think 300us
done
load=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average after: $load"
loaded

served=""
if [ -n "$serve_bin" ]; then
	served=", vhostdm served by $serve_bin"
fi
report_args=(--report "$results" --note "$ncpu CPUs, $cpu_model, load average $load at the end, runs $runs x $duration (row 5's vhostdm devices paired in slices of $slice)$served${venv[*]:+, vhostdm env ${venv[*]}}$(if [ "$poll_us" != 0 ]; then echo ", poll-us $poll_us"; fi)$(if [ "$adaptive_poll" = 1 ]; then echo ", adaptive-poll"; elif [ "$adaptive_poll" = -1 ]; then echo ", no adaptive-poll"; fi)")
if [ "$json" = 1 ]; then
	report_args+=(--json)
fi
"$bin" bench "${report_args[@]}"
