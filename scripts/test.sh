#!/usr/bin/env bash
# test.sh runs every check and test of vhostdm: formatting, vet, and the
# whole test suite with the race detector, including the end-to-end tests
# that boot a real QEMU guest on vhostdm disks (scripts/setup.sh installs
# what they need).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change:" >&2
	echo "$unformatted" >&2
	exit 1
fi

echo "== go vet"
go vet ./...

echo "== staticcheck"
go tool staticcheck ./...

echo "== go test -race"
go test -race -timeout 20m ./... "$@"
