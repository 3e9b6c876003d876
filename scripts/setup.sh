#!/usr/bin/env bash
# setup.sh installs everything vhostdm and its tests need on a fresh Debian 12
# machine, idempotently: Debian packages (QEMU 10 from bookworm-backports) and
# the Go modules. It never names a package mirror: the backports suite is
# derived from the machine's own apt source entry.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Packages from the main suite.
MAIN_PKGS=(linux-image-amd64 busybox-static cpio fio cryptsetup-bin libnbd-bin
	thin-provisioning-tools ploop python3-cryptography dmsetup kmod systemd util-linux adduser)
# libvirt for the libvirt e2e test (it runs a private libvirtd; the
# package's own services are kept from starting, see below). The Debian
# package test needs adduser (the package's dependency), dpkg-deb (dpkg)
# and systemd-analyze (systemd).
LIBVIRT_PKGS=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
# Ceph (Debian 12's Pacific) for the rbd: backend, built with -tags ceph:
# the libraries it links, and the daemons and tools of the throwaway
# cluster its tests run (internal/cephtest/cluster.sh). No daemon starts on
# install.
CEPH_PKGS=(ceph-mon ceph-mgr ceph-osd ceph-common librados-dev librbd-dev uuid-runtime)
# Packages that must come from bookworm-backports (QEMU 10).
BPO_PKGS=(qemu-system-x86 qemu-utils qemu-system-common)

missing() {
	local p
	for p in "$@"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
	done
}

qemu_major() {
	qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'
}

# enable_backports writes a deb822 source for bookworm-backports whose URIs
# and keyring are copied from the existing entry for the bookworm suite.
enable_backports() {
	local out=/etc/apt/sources.list.d/vhostdm-bookworm-backports.sources
	[ -f "$out" ] && return 0
	if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		return 0
	fi
	local uris="" signed=""
	local f
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		# Take the first stanza whose Suites list has plain "bookworm".
		read -r uris signed < <(awk '
			BEGIN { RS=""; FS="\n" }
			{
				u=""; s=""; k="";
				for (i=1; i<=NF; i++) {
					if ($i ~ /^URIs:/)      { u=$i; sub(/^URIs:[ \t]*/, "", u) }
					if ($i ~ /^Suites:/)    { s=" " $i " " }
					if ($i ~ /^Signed-By:/) { k=$i; sub(/^Signed-By:[ \t]*/, "", k) }
				}
				if (s ~ / bookworm / && u != "") { print u, k; exit }
			}' "$f") || true
		[ -n "$uris" ] && break
	done
	if [ -z "$uris" ] && [ -f /etc/apt/sources.list ]; then
		uris=$(awk '$1=="deb" && $3=="bookworm" { print $2; exit }' /etc/apt/sources.list)
	fi
	if [ -z "$uris" ]; then
		log "cannot find an apt source entry for bookworm to derive bookworm-backports from"
		exit 1
	fi
	log "enabling bookworm-backports from the machine's bookworm source"
	{
		echo "Types: deb"
		echo "URIs: $uris"
		echo "Suites: bookworm-backports"
		echo "Components: main"
		[ -n "$signed" ] && echo "Signed-By: $signed"
	} | $SUDO tee "$out" >/dev/null
	APT_UPDATED=""
}

APT_UPDATED=""
apt_update() {
	if [ -z "$APT_UPDATED" ]; then
		$SUDO apt-get update -qq
		APT_UPDATED=1
	fi
}

export DEBIAN_FRONTEND=noninteractive
need_main=$(missing "${MAIN_PKGS[@]}")
need_bpo=$(missing "${BPO_PKGS[@]}")
major=$(qemu_major || true)
if [ -n "$need_bpo" ] || [ "${major:-0}" -lt 10 ]; then
	enable_backports
	apt_update
	log "installing ${BPO_PKGS[*]} from bookworm-backports"
	$SUDO apt-get install -y -qq -t bookworm-backports "${BPO_PKGS[@]}" >/dev/null
fi
if [ -n "$need_main" ]; then
	apt_update
	log "installing $(echo $need_main)"
	$SUDO apt-get install -y -qq --no-install-recommends $need_main >/dev/null
fi

need_ceph=$(missing "${CEPH_PKGS[@]}")
if [ -n "$need_ceph" ]; then
	apt_update
	log "installing $(echo $need_ceph)"
	$SUDO apt-get install -y -qq --no-install-recommends $need_ceph >/dev/null
fi

# libvirt-daemon-system's maintainer scripts start libvirtd, virtlogd and
# their sockets; on a CI machine those are not wanted (the test runs its
# own private daemons). A policy-rc.d that answers 101 keeps invoke-rc.d
# and deb-systemd-invoke from starting anything during the install.
need_libvirt=$(missing "${LIBVIRT_PKGS[@]}")
if [ -n "$need_libvirt" ]; then
	apt_update
	log "installing $(echo $need_libvirt) (services not started)"
	policy=/usr/sbin/policy-rc.d
	own_policy=""
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
		$SUDO chmod 0755 "$policy"
		own_policy=1
	fi
	rc=0
	$SUDO apt-get install -y -qq --no-install-recommends $need_libvirt >/dev/null || rc=$?
	[ -n "$own_policy" ] && $SUDO rm -f "$policy"
	[ "$rc" -eq 0 ] || exit "$rc"
fi

major=$(qemu_major || true)
if [ "${major:-0}" -lt 10 ]; then
	log "qemu-system-x86_64 is version ${major:-none}; want 10 from bookworm-backports"
	exit 1
fi
if ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
	log "no guest kernel in /boot (linux-image-amd64)"
	exit 1
fi

if [ -f go.mod ]; then
	log "downloading Go modules"
	go mod download
fi
log "ready: $(qemu-system-x86_64 --version | head -1); kernel $(ls /boot/vmlinuz-* | tail -1)"
