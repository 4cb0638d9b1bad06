#!/usr/bin/env bash
# The local quickstart: the local control plane with the CRDs, and in the background the
# operator, the local Job executor and a loopback HTTP server for examples/files/, so that the
# manifests in examples/local/ work offline.
#
#   hack/quickstart.sh up      start what does not run yet (idempotent); `make up` builds first
#   hack/quickstart.sh down    stop what `up` started, by pid file, never by name
#   hack/quickstart.sh status  print what runs
#
# Logs and pid files are in .cluster/quickstart/. `down` stops the control plane only if `up`
# started it: a control plane that was already up (`make cluster-up`, `make test`) is someone
# else's and keeps running.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cluster/quickstart"
kubectl="$root/.cluster/kubectl"
export KUBECONFIG="$root/.cluster/kubeconfig"
# examples/local/cache.yaml names this port; examples/local/store.yaml this folder.
http_port=18089
store_dir=/tmp/templatecache-quickstart
metrics_address=127.0.0.1:18080
processes="operator executor http"

log() { echo "quickstart: $*" >&2; }

# shellcheck source=hack/pidfiles.sh
source "$root/hack/pidfiles.sh"

# start NAME CMD...: runs CMD in its own session, logs to NAME.log, pid to NAME.pid.
start() {
  local name=$1; shift
  alive "$name" && return
  setsid "$@" >"$dir/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/$name.pid"
}

# Whether nothing listens on port $1 (SO_REUSEADDR, as http.server binds: a closed connection
# lingering in TIME_WAIT does not take the port).
port_free() {
  python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "$1" 2>/dev/null
}

# wait_for WHAT CMD...: retries CMD for 30 s.
wait_for() {
  local what=$1 i; shift
  for i in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$what did not come up; see $dir/"
  return 1
}

up() {
  for bin in templatecache templatecache-local-executor; do
    [ -x "$root/target/debug/$bin" ] || { log "target/debug/$bin is missing: run make up"; exit 1; }
  done
  mkdir -p "$dir" "$store_dir"
  local before
  before=$("$root/hack/cluster.sh" status 2>/dev/null || true)
  if ! grep -q '^kube-apiserver running' <<<"$before"; then
    touch "$dir/started-cluster"
  fi
  "$root/hack/cluster.sh" up
  "$kubectl" apply --server-side -f "$root/crds/" \
    -f "$root/charts/templatecache-operator/files/flowcontrol.yaml" >/dev/null
  "$kubectl" wait --for=condition=Established --timeout=60s \
    crd/templatecaches.templatecache.io crd/stagingstores.templatecache.io >/dev/null

  if ! alive http; then
    port_free "$http_port" || { log "port $http_port is taken; examples/local/ needs it"; exit 1; }
    start http python3 -m http.server "$http_port" --bind 127.0.0.1 --directory "$root/examples/files"
  fi
  start executor "$root/target/debug/templatecache-local-executor" \
    --templatecache "$root/target/debug/templatecache"
  # Leader election on as in a Deployment, on a Lease of its own in "default".
  start operator env RUST_LOG=info "$root/target/debug/templatecache" run \
    --default-store quickstart --instance quickstart \
    --leader-election-namespace default --leader-election-lease templatecache-quickstart \
    --job-image templatecache:local --retry-base-seconds 2 \
    --allow-internal-address "127.0.0.1:$http_port" \
    --metrics-address "$metrics_address"

  wait_for "the HTTP server" curl -sf "http://127.0.0.1:$http_port/demo.img" -o /dev/null
  wait_for "the operator" curl -sf "http://$metrics_address/readyz"
  log "running: operator (metrics on http://$metrics_address/metrics), executor, files on http://127.0.0.1:$http_port/"
  log "export KUBECONFIG=$KUBECONFIG; logs in $dir/"
}

down() {
  local name
  for name in $processes; do stop "$name"; done
  if [ -f "$dir/started-cluster" ]; then
    "$root/hack/cluster.sh" down
    rm -f "$dir/started-cluster"
  fi
  log "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status)
    for n in $processes; do
      if alive "$n"; then echo "$n running (pid $(cat "$dir/$n.pid"))"; else echo "$n stopped"; fi
    done ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
