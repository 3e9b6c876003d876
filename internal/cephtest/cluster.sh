#!/usr/bin/env bash
# cluster.sh runs a throwaway single-node Ceph cluster for tests: one
# monitor, one manager and one bluestore OSD on a sparse file, reachable
# on 127.0.0.1 only, everything (configuration, keys, data, logs, pid
# files) under one directory. scripts/ceph-test-cluster.sh is this file.
#
#   cluster.sh start DIR      bootstrap a new cluster in DIR (made if absent,
#                             must be empty); prints the ceph.conf path
#   cluster.sh stop DIR       kill its daemons (by pid file, OSD first)
#   cluster.sh watchdog DIR   wait until standard input closes, then stop
#                             the cluster and remove DIR: a test process
#                             holds the pipe, so the cluster dies with it
#
# Clients use DIR/ceph.conf; client.admin's key is in
# DIR/client.admin.keyring, named by the conf. PORT in the environment
# picks the monitor's port (default: a free one). Needs the Debian packages
# ceph-mon, ceph-mgr, ceph-osd and ceph-common.
set -euo pipefail

die() { printf 'ceph-test-cluster: %s\n' "$*" >&2; exit 1; }

need_tools() {
	local t pkg
	for t in ceph-mon:ceph-mon monmaptool:ceph-mon ceph-mgr:ceph-mgr ceph-osd:ceph-osd \
		ceph:ceph-common ceph-authtool:ceph-common rados:ceph-common rbd:ceph-common uuidgen:uuid-runtime; do
		pkg=${t#*:}
		t=${t%%:*}
		command -v "$t" >/dev/null || die "$t not found: install the Debian package $pkg (scripts/setup.sh does)"
	done
}

free_port() {
	local p i
	for i in $(seq 1 100); do
		p=$((20000 + RANDOM % 30000))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return
		fi
	done
	die "no free port found"
}

# stop kills the daemons whose pid files are in DIR/run, checking first that
# the process still runs with this cluster's conf (a pid may be reused).
stop() {
	local dir=$1 name pidf pid n
	for name in osd.0 mgr.x mon.a; do
		pidf=$dir/run/$name.pid
		[ -f "$pidf" ] || continue
		pid=$(cat "$pidf" 2>/dev/null || true)
		case "$pid" in '' | *[!0-9]*) continue ;; esac
		if tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$dir/ceph.conf"; then
			kill -KILL "$pid" 2>/dev/null || true
			for n in $(seq 1 100); do
				[ -d "/proc/$pid" ] || break
				# a zombie whose parent is gone is reaped by init
				grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && break
				sleep 0.05
			done
		fi
		rm -f "$pidf"
	done
}

ceph_() { ceph --conf "$DIR/ceph.conf" "$@"; }

start() {
	need_tools
	mkdir -p "$DIR"
	DIR=$(cd "$DIR" && pwd)
	[ -z "$(ls -A "$DIR")" ] || die "$DIR is not empty"
	local port=${PORT:-$(free_port)}
	local fsid osduuid
	fsid=$(uuidgen)
	osduuid=$(uuidgen)
	mkdir -p "$DIR/run" "$DIR/log" "$DIR/crash" "$DIR/mon" "$DIR/osd" "$DIR/mgr"
	cat >"$DIR/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
mon initial members = a
ms bind msgr1 = false
ms bind ipv6 = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
crash dir = $DIR/crash
keyring = $DIR/\$name.keyring
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
paxos propose interval = 0.01
paxos min wait = 0.01
mon data avail warn = 1
mon data avail crit = 0
chdir = $DIR

[mon]
mon data = $DIR/mon/\$name
mon cluster log file = $DIR/log/cluster.log

[mgr]
mgr data = $DIR/mgr/\$name

[osd]
osd data = $DIR/osd/\$name
osd objectstore = bluestore
bluestore block path = $DIR/osd/\$name.block
bluestore block create = true
bluestore block size = 4294967296
bluestore cache autotune = false
bluestore cache size = 134217728
osd max object name len = 256
osd max object namespace len = 64
CONF
	local k=$DIR/cluster.keyring
	ceph-authtool --create-keyring "$k" --gen-key -n mon. --cap mon 'allow *' >/dev/null
	ceph-authtool "$k" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
		--cap mgr 'allow *' --cap mds 'allow *' >/dev/null
	ceph-authtool "$k" --gen-key -n mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' \
		--cap mds 'allow *' >/dev/null
	ceph-authtool "$k" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' \
		--cap osd 'allow *' >/dev/null
	local n
	for n in client.admin mgr.x osd.0; do
		ceph-authtool -C "$DIR/$n.keyring" -n "$n" --add-key "$(ceph-authtool "$k" -p -n "$n")" >/dev/null
	done
	cp "$k" "$DIR/mon.a.keyring"
	monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$DIR/monmap" >/dev/null
	ceph-mon --conf "$DIR/ceph.conf" --mkfs -i a --monmap "$DIR/monmap" --keyring "$k"
	ceph-mon --conf "$DIR/ceph.conf" -i a
	ceph-mgr --conf "$DIR/ceph.conf" -i x
	ceph_ osd new "$osduuid" 0 >/dev/null
	mkdir -p "$DIR/osd/osd.0"
	ceph-osd --conf "$DIR/ceph.conf" -i 0 --mkfs --osd-uuid "$osduuid" >"$DIR/log/osd-mkfs.out" 2>&1 ||
		{ cat "$DIR/log/osd-mkfs.out" >&2; die "ceph-osd --mkfs failed"; }
	ceph-osd --conf "$DIR/ceph.conf" -i 0
	ceph_ osd pool create rbd 8 8 >/dev/null 2>&1
	ceph_ osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
	rbd --conf "$DIR/ceph.conf" pool init rbd
	# Ready when the OSD stores an object.
	for n in $(seq 1 600); do
		if timeout 10 rados --conf "$DIR/ceph.conf" -p rbd put ready-check "$DIR/ceph.conf" 2>/dev/null; then
			rados --conf "$DIR/ceph.conf" -p rbd rm ready-check
			echo "$DIR/ceph.conf"
			return 0
		fi
		sleep 0.1
	done
	die "cluster in $DIR not ready: no object write succeeded within a minute (logs in $DIR/log)"
}

[ $# -eq 2 ] || die "usage: $0 start|stop|watchdog DIR"
cmd=$1
DIR=$2
case "$cmd" in
start)
	# A failed bootstrap leaves no daemon behind.
	trap 'rc=$?; if [ $rc -ne 0 ]; then stop "$DIR"; fi; exit $rc' EXIT
	start
	;;
stop)
	DIR=$(cd "$DIR" && pwd) || exit 0
	stop "$DIR"
	;;
watchdog)
	DIR=$(cd "$DIR" && pwd)
	# Wait for end of file on standard input: the owner has gone.
	while IFS= read -r _; do :; done
	stop "$DIR"
	rm -rf -- "$DIR"
	;;
*) die "usage: $0 start|stop|watchdog DIR" ;;
esac
