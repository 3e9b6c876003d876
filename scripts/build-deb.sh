#!/usr/bin/env bash
# build-deb.sh builds vhostdm_VERSION_amd64.deb: both daemons, their systemd
# units, an example configuration in /etc/vhostdm, the libvirt hook and the
# documentation, with dpkg-deb (Debian package dpkg) and fakeroot-free root
# ownership (--root-owner-group).
#
#   scripts/build-deb.sh [OUTDIR]     (default: ./dist)
#
# VERSION is cmd/vhostdm's Version. Install with `dpkg -i`, remove with
# `dpkg -r vhostdm` (or `dpkg --purge vhostdm`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
mkdir -p "$out"
out=$(cd "$out" && pwd)

version=$(sed -n 's/^const Version = "\(.*\)"$/\1/p' cmd/vhostdm/version.go)
[ -n "$version" ] || { echo "build-deb: no Version in cmd/vhostdm/version.go" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "build-deb: dpkg-deb is missing (Debian package dpkg)" >&2; exit 1; }

stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
umask 022

# Static binaries: no shared library dependencies.
export CGO_ENABLED=0 GOOS=linux GOARCH=amd64
install -d "$stage/usr/bin"
go build -trimpath -o "$stage/usr/bin/vhostdm" ./cmd/vhostdm
go build -trimpath -o "$stage/usr/bin/repagent-hub" ./cmd/repagent-hub

# The example units, with the packaged binaries' paths.
install -d "$stage/lib/systemd/system"
for u in vhostdm@.service repagent-hub.service; do
	sed 's|/usr/local/bin/|/usr/bin/|g' "examples/systemd/$u" >"$stage/lib/systemd/system/$u"
	chmod 0644 "$stage/lib/systemd/system/$u"
done

install -d "$stage/etc/vhostdm" "$stage/etc/libvirt/hooks/qemu.d"
install -m 0644 packaging/deb/example.toml "$stage/etc/vhostdm/example.toml"
install -m 0755 packaging/deb/libvirt-hook "$stage/etc/libvirt/hooks/qemu.d/vhostdm"

doc="$stage/usr/share/doc/vhostdm"
install -d "$doc"
install -m 0644 README.md "$doc/README.md"
for f in docs/*.md; do install -m 0644 "$f" "$doc/$(basename "$f")"; done
gzip -9n "$doc"/*.md
install -m 0644 packaging/deb/copyright "$doc/copyright"
printf 'vhostdm (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- vhostdm developers <vhostdm@users.noreply.github.com>  %s\n' \
	"$version" "$version" "$(date -R -u -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" |
	gzip -9n >"$doc/changelog.gz"

install -d "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" packaging/deb/control.in >"$stage/DEBIAN/control"
for s in postinst prerm postrm; do install -m 0755 "packaging/deb/$s" "$stage/DEBIAN/$s"; done
printf '/etc/vhostdm/example.toml\n/etc/libvirt/hooks/qemu.d/vhostdm\n' >"$stage/DEBIAN/conffiles"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort | xargs md5sum) >"$stage/DEBIAN/md5sums"

deb="$out/vhostdm_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
echo "$deb"
