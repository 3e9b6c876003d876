#!/usr/bin/env bash
# test.sh runs every check and test of vhostdm: formatting, vet, and the
# whole test suite with the race detector, including the end-to-end tests
# that boot a real QEMU guest on vhostdm disks (scripts/setup.sh installs
# what they need). Then the Ceph build (-tags ceph, cgo, librbd): vet and
# staticcheck of the packages with files behind the tag, and the tests of
# the Ceph packages against a throwaway single-node cluster each test
# package bootstraps (internal/cephtest).
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages with files behind the ceph build tag (or that link the rbd:
# backend), and the packages whose tests need the Ceph build.
CEPH_CHECK=(./ceph/... ./internal/cephtest/... ./cmd/vhostdm/ ./test/e2e/... ./repagent/hub/cephstore/ ./cmd/repagent-hub/)
CEPH_TEST=(./ceph/... ./internal/cephtest/... ./repagent/hub/cephstore/)

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change:" >&2
	echo "$unformatted" >&2
	exit 1
fi

echo "== go vet"
go vet ./...
go vet -tags ceph "${CEPH_CHECK[@]}"

echo "== staticcheck"
go tool staticcheck ./...
go tool staticcheck -tags ceph "${CEPH_CHECK[@]}"

echo "== go test -race"
go test -race -timeout 20m ./... "$@"
echo "== go test -race -tags vhostdm_nouring (the worker-pool I/O engine, as without io_uring)"
go test -race -timeout 20m -tags vhostdm_nouring ./mapper/ ./vhost/ "$@"

echo "== go test -race -tags ceph (the Ceph build, on throwaway clusters)"
CGO_ENABLED=1 go test -race -timeout 20m -tags ceph "${CEPH_TEST[@]}" "$@"
# The guest tests of the rbd: backend (vhostdm built with -tags ceph): linear
# over RBD, and a checkpoint recovered from a hub's Ceph store as RBD clones.
CGO_ENABLED=1 go test -race -timeout 20m -tags ceph -run '^TestRBD' ./test/e2e/
# repagent-hub with --store ceph:POOL: a hub process killed and restarted,
# recovery as RBD clones served through rbd:; two hub processes on one pool,
# the one holding a VM killed (TestCephTwoHubsKill).
CGO_ENABLED=1 go test -race -timeout 20m -tags ceph -run '^TestCeph' ./cmd/repagent-hub/
