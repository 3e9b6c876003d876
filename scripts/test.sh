#!/usr/bin/env bash
# test.sh runs every check and test of vhostdm: formatting, vet, and the
# whole test suite with the race detector, including the end-to-end tests
# that boot a real QEMU guest on vhostdm disks (scripts/setup.sh installs
# what they need). Then the Ceph build (-tags ceph, cgo, librbd): vet and
# staticcheck of the packages with files behind the tag, and the tests of
# the Ceph packages against one throwaway single-node cluster this script
# bootstraps for the whole stage (scripts/ceph-test-cluster.sh; the tests
# find it through VHOSTDM_CEPH_CLUSTER and keep apart in pools and images
# of their own) and stops, by pid, when it exits.
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

echo "== go test -race -tags ceph (the Ceph build, on one throwaway cluster)"
ceph_start=$(date +%s)
ceph_dir=$(mktemp -d "${TMPDIR:-/tmp}/vhostdm-ceph-ci.XXXXXX")
trap 'scripts/ceph-test-cluster.sh stop "$ceph_dir"; rm -rf -- "$ceph_dir"' EXIT
trap 'exit 130' INT TERM
scripts/ceph-test-cluster.sh start "$ceph_dir" >"$ceph_dir.log" 2>&1 || {
	cat "$ceph_dir.log" >&2
	rm -f -- "$ceph_dir.log"
	exit 1
}
rm -f -- "$ceph_dir.log"
echo "ceph test cluster up in $(($(date +%s) - ceph_start)) s ($ceph_dir)"
export VHOSTDM_CEPH_CLUSTER=$ceph_dir
# The journal's crash model over the Ceph store: 2 kill -9 rounds here (a
# fresh journal, then one resumed after a kill); by hand the default is 3.
export VHOSTDM_CEPHSTORE_CRASH_ROUNDS=${VHOSTDM_CEPHSTORE_CRASH_ROUNDS:-2}
CGO_ENABLED=1 go test -race -timeout 20m -tags ceph "${CEPH_TEST[@]}" "$@"
# The guest tests of the rbd: backend (vhostdm built with -tags ceph): linear
# over RBD, and a checkpoint recovered from a hub's Ceph store as RBD clones.
CGO_ENABLED=1 go test -race -timeout 20m -tags ceph -run '^TestRBD' ./test/e2e/
# A protected rbd: volume written by another client while `vhostdm serve` was
# stopped: the snapshot taken at the stop, compared at the next start.
CGO_ENABLED=1 go test -race -timeout 20m -tags ceph -run '^TestRBD' ./cmd/vhostdm/
# repagent-hub with --store ceph:POOL: a hub process killed and restarted,
# recovery as RBD clones served through rbd:; two hub processes on one pool,
# the one holding a VM killed (TestCephTwoHubsKill).
CGO_ENABLED=1 go test -race -timeout 20m -tags ceph -run '^TestCeph' ./cmd/repagent-hub/
echo "ceph stage: $(($(date +%s) - ceph_start)) s"
