#!/usr/bin/env bash
# make test-node (the first part of make test): the suites that run Jobs, on the real node.
#   1. the control plane in node mode with the node (hack/cluster.sh up switches an up plain
#      control plane over; etcd's data stays);
#   2. the operator and consumer images into the node's registry, from the release binary
#      `make check-dockerfile` built (never built twice);
#   3. NODE_SUITES (the Makefile's list) with TEMPLATECACHE_JOBS=node: each test's Jobs run as
#      Pods of that image, and the tests that need the node itself (tests/node.rs,
#      tests/quickstart.rs, the chart's whole life, the chaos run that kills Pods), ignored by
#      plain `cargo test`, run too.
# Prints the time of each phase. The node stays up: `make cluster-down` removes it, and plain
# `make cluster-up` (the rest of the suite) switches it off.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
binary=target/release/templatecache
[ -x "$binary" ] || { echo "test-node: $binary is missing: run make check-dockerfile" >&2; exit 1; }
t0=$(date +%s.%N); last=$t0
phases=()
phase() {
  local now; now=$(date +%s.%N)
  phases+=("$(awk -v a="$last" -v b="$now" -v w="$1" 'BEGIN {printf "%7.1f s  %s", b - a, w}')")
  last=$now
}
report() {
  echo "test-node: phases" >&2
  printf '  %s\n' "${phases[@]}" >&2
  awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "  %7.1f s  in all\n", b - a}' >&2
}
trap report EXIT

TEMPLATECACHE_NODE=1 hack/cluster.sh up
phase "node up (control plane in node mode, kubelet Ready)"
BINARY=$binary hack/image.sh all
phase "images from $binary, pushed to the node's registry"
suites=()
for suite in ${NODE_SUITES:?the Makefile names them}; do suites+=(--test "$suite"); done
cargo build --workspace --bins
phase "cargo build --workspace --bins"
KUBECONFIG="$root/.cluster/kubeconfig" TEMPLATECACHE_JOBS=node \
  cargo test "${suites[@]}" --no-fail-fast -- --include-ignored
phase "cargo test on the node: $NODE_SUITES (build included)"
