#!/usr/bin/env bash
# bench-replication.sh measures what replication costs a guest's writes, with
# real processes: `vhostdm serve` with two exports over equal images, one
# protected (mirrored to a `repagent-hub serve` on loopback) and one not,
# driven in turn by `vhostdm bench` (the vhost front-end client).
#
#   scripts/bench-replication.sh [--runs N] [--duration D] [--bin DIR] [--keep]
#
# --bin DIR uses DIR/vhostdm and DIR/repagent-hub as built (for A/B runs of
# two trees alternated on one machine) instead of building this tree's.
#
# Rows, each --runs times (default 3), protected and unprotected alternating
# which goes first; the medians are printed:
#
#   4k randwrite QD32, 1 queue:  IOPS, vhostdm CPU-seconds per write
#                                (utime+stime of the vhostdm process from
#                                /proc/PID/stat over the run), and for the
#                                protected volume the largest RPO that
#                                query-repagent reported (sampled every 100 ms
#                                by the client, vhostdm bench --rpo-qmp)
#                                and context switches per write of the
#                                vhostdm process (all its threads, from
#                                /proc/PID/task/*/status; in the log line)
#   1M sequential write QD8:     MiB/s, CPU per write, RPO
#   1M sequential write QD8, a FLUSH after every write (vhostdm bench
#                                --fsync 1): the same with both sides
#                                flushing to the disk. Without flushes the
#                                unprotected writes only fill the page
#                                cache, while every protected write waits
#                                (paced) for the hub's fdatasync'd journal.
#
# The last column is the hub process's CPU per protected write (it shares
# the cores: what it costs shows in the protected IOPS). The log line of a
# protected run also gives the hub's journal records per group commit
# (one fdatasync each) over the run.
#
# Before each protected run the hub must report the volume protecting with
# nothing to resync. The hub shares the machine's cores with vhostdm and the
# client, as in issue 17's goals (protected >= 0.6x unprotected IOPS, CPU per
# write <= 1.3x, RPO < 1 s, 1 MiB >= 0.8x). The load average is printed: on a
# shared machine the figures are only comparable within one run.
#
# Environment: GO (default go), SIZE (image bytes, default 256m), STORE (the
# hub's store directory, default inside the temporary directory: the same file
# system as the source images, so the hub's fsyncs also flush the sources'
# ordered data; STORE=/dev/shm/x separates them), BIN (the default of
# --bin), ROWS (the rows to run, a space-separated subset of
# "4k 1m 1m-flush"; default all).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
duration=5s
keep=0
bin=${BIN:-}
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs=$2; shift 2 ;;
	--duration) duration=$2; shift 2 ;;
	--keep) keep=1; shift ;;
	--bin) bin=$2; shift 2 ;;
	-h|--help) sed -n '2,46p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "bench-replication.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
GO=${GO:-go}
SIZE=${SIZE:-256m}
log() { echo "bench-replication: $*" >&2; }

dir=$(mktemp -d /tmp/vhostdm-repbench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	if [ "$keep" = 1 ]; then log "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

if [ -n "$bin" ]; then
	log "using $bin/vhostdm and $bin/repagent-hub"
	cp "$bin/vhostdm" "$bin/repagent-hub" "$dir/"
else
	log "building"
	"$GO" build -o "$dir/vhostdm" ./cmd/vhostdm
	"$GO" build -o "$dir/repagent-hub" ./cmd/repagent-hub
fi
ROWS=${ROWS:-4k 1m 1m-flush}
# Equal images of random data, both read once: the hub's initial sync reads
# the protected one, and ext4 writes into cached pages over holes (a sparse
# image read once) several times slower than into allocated blocks, which
# would be counted against replication. Both are copies (cp) of one
# random file: the page cache keeps a file written in 4 KiB pieces (head)
# in 4 KiB folios and a cp'd one in large folios, into which 1 MiB writes
# cost half as much (measured in session 7: 325 against 152 µs per
# pwritev2); p.img written by head and u.img by cp counted that against
# replication.
bytes=$(numfmt --from=iec "${SIZE^^}")
head -c "$bytes" /dev/urandom >"$dir/src.img"
cp "$dir/src.img" "$dir/p.img"
cp "$dir/src.img" "$dir/u.img"
rm "$dir/src.img"
cat "$dir/p.img" "$dir/u.img" >/dev/null
sectors=$(( $(stat -c %s "$dir/p.img") / 512 ))
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

"$dir/repagent-hub" serve --listen "127.0.0.1:$port" --store "${STORE:-$dir/store}" --qmp "$dir/hub.sock" --name hub \
	--log-level warn 2>"$dir/hub.log" &
hpid=$!
pids+=($hpid)
cat >"$dir/vm.toml" <<TOML
[qmp]
socket = "qmp.sock"

[repagent]
hub = "127.0.0.1:$port"
vm = "bench"

[[device]]
name = "p"
table = "0 $sectors linear p.img 0"

[[device]]
name = "u"
table = "0 $sectors linear u.img 0"

[[export]]
id = "p0"
device = "p"
socket = "p.sock"
writable = true
protect = true

[[export]]
id = "u0"
device = "u"
socket = "u.sock"
writable = true
TOML
"$dir/vhostdm" serve -c "$dir/vm.toml" --log-level warn 2>"$dir/vhostdm.log" &
vpid=$!
pids+=($vpid)
for _ in $(seq 100); do [ -S "$dir/p.sock" ] && [ -S "$dir/qmp.sock" ] && break; sleep 0.1; done

# qmp SOCKET COMMAND prints the return value as JSON.
qmp() {
	python3 - "$1" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for cmd in ("qmp_capabilities", sys.argv[2]):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            break
print(json.dumps(r.get("return", r)))
PY
}

wait_protecting() {
	for _ in $(seq 600); do
		if qmp "$dir/hub.sock" query-repagent | jq -e '[.[].volumes[] | select(.volume=="p0")] | length == 1 and .[0].state == "protecting" and .[0]["resync-bytes"] == 0' >/dev/null &&
			qmp "$dir/qmp.sock" query-repagent | jq -e '.volumes[] | select(.volume=="p0") | .["backlog-ios"] == 0 and .["dirty-regions"] == 0' >/dev/null; then
			return 0
		fi
		sleep 0.2
	done
	log "the hub did not reach protecting"; return 1
}

# journal: the hub's journal records and group commits so far
journal() { qmp "$dir/hub.sock" query-repagent | jq -r '[.[].journal // empty] | "\([.[].records] | add // 0) \([.[].commits] | add // 0)"'; }
cpu() { awk '{print $14 + $15}' "/proc/${1:-$vpid}/stat"; }
# csw: the context switches (voluntary and not) of all of vhostdm's threads
csw() { cat /proc/"$vpid"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n}'; }
tck=$(getconf CLK_TCK)

# one EXPORT RW BS QD [FSYNC]: prints "iops bytes_per_sec cpu_per_op_us max_rpo_s hub_cpu_per_op_us csw_per_op"
one() {
	local exp=$1 rw=$2 bs=$3 qd=$4 fsync=${5:-0} rpo=0 c0 c1 h0 h1 s0 s1 j0 r0 r1 k0 k1 out sample=()
	[ "$exp" = p ] && wait_protecting
	: >"$dir/rpo"
	# The RPO is sampled every 100 ms by the client itself, over one QMP
	# connection: a sampler process per sample (a QMP client and jq) took
	# about a third of the two CPUs during the protected runs only.
	[ "$exp" = p ] && sample=(--rpo-qmp "$dir/qmp.sock" --rpo-interval 100ms)
	[ "$exp" = p ] && j0=$(journal)
	c0=$(cpu); h0=$(cpu "$hpid"); s0=$(csw)
	out=$("$dir/vhostdm" bench --socket "$dir/$exp.sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --fsync "$fsync" --duration "$duration" --json "${sample[@]}")
	c1=$(cpu); h1=$(cpu "$hpid"); s1=$(csw)
	if [ "$exp" = p ]; then
		echo "$out" | jq -r '.max_rpo_s' >>"$dir/rpo"
		# and until the hub has caught up: the RPO of the run's tail
		for _ in $(seq 100); do
			r=$(qmp "$dir/qmp.sock" query-repagent | jq -r '.rpo'); echo "$r" >>"$dir/rpo"
			[ "$r" = 0 ] && break; sleep 0.1
		done
		rpo=$(sort -g "$dir/rpo" | tail -1)
		read -r r0 k0 <<<"$j0"; read -r r1 k1 <<<"$(journal)"
		log "hub journal: $(( r1 - r0 )) records in $(( k1 - k0 )) group commits: $(div $(( r1 - r0 )) $(( k1 - k0 ))) records/commit"
	fi
	echo "$out" | jq -r --arg c "$(( c1 - c0 ))" --arg h "$(( h1 - h0 ))" --arg t "$tck" --arg r "$rpo" --arg s "$(( s1 - s0 ))" \
		'"\(.iops) \(.bytes_per_sec) \((($c|tonumber) / ($t|tonumber)) / .ops * 1e6) \($r) \((($h|tonumber) / ($t|tonumber)) / .ops * 1e6) \(($s|tonumber) / .ops)"'
}

div() { awk -v a="$1" -v b="$2" 'BEGIN { print (b == 0 ? 0 : a / b) }'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

row() {
	local name=$1 rw=$2 bs=$3 qd=$4 fsync=${5:-0}
	: >"$dir/p.txt"; : >"$dir/u.txt"
	for i in $(seq "$runs"); do
		if [ $((i % 2)) = 1 ]; then order="u p"; else order="p u"; fi
		for e in $order; do
			log "$name run $i: $e"
			one "$e" "$rw" "$bs" "$qd" "$fsync" >>"$dir/$e.txt"
			log "$name run $i: $e: iops B/s cpu_us rpo_s hub_cpu_us csw = $(tail -1 "$dir/$e.txt")"
		done
	done
	local pi ui pb ub pc uc pr ph
	pi=$(awk '{print $1}' "$dir/p.txt" | median); ui=$(awk '{print $1}' "$dir/u.txt" | median)
	pb=$(awk '{print $2}' "$dir/p.txt" | median); ub=$(awk '{print $2}' "$dir/u.txt" | median)
	pc=$(awk '{print $3}' "$dir/p.txt" | median); uc=$(awk '{print $3}' "$dir/u.txt" | median)
	pr=$(awk '{print $4}' "$dir/p.txt" | median)
	ph=$(awk '{print $5}' "$dir/p.txt" | median)
	printf '| %s | %.0f | %.0f | %.2fx | %.1f | %.1f | %.1f | %.1f | %.2fx | %.2fx | %.3f | %.1f |\n' "$name" \
		"$ui" "$pi" "$(div "$pi" "$ui")" "$(div "$ub" 1048576)" "$(div "$pb" 1048576)" \
		"$uc" "$pc" "$(div "$pc" "$uc")" "$(div "$pb" "$ub")" "$pr" "$ph"
}

load0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "| workload | unprotected IOPS | protected IOPS | IOPS ratio | unprotected MiB/s | protected MiB/s | CPU µs/write unprot. | CPU µs/write prot. | CPU ratio | MiB/s ratio | max RPO s (median of runs) | hub CPU µs/write |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
case " $ROWS " in *" 4k "*) row "4k randwrite QD32" randwrite 4096 32 ;; esac
case " $ROWS " in *" 1m "*) row "1M seq write QD8" write 1048576 8 ;; esac
case " $ROWS " in *" 1m-flush "*) row "1M seq write QD8, flush every write" write 1048576 8 1 ;; esac
echo
echo "load average before: $load0; after: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; runs=$runs duration=$duration"
