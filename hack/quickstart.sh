#!/usr/bin/env bash
# The local quickstart, on the real node: the control plane in node mode (kubelet, containerd,
# scheduler, the real Job controller), the operator and consumer images in the node's registry,
# the chart installed with helm as the README's "Install with Helm" says, and an HTTP server for
# examples/files/ on the node's address, so the manifests in examples/local/ work offline.
#
#   hack/quickstart.sh up      start what does not run yet (idempotent); `make up` builds first
#   hack/quickstart.sh down    uninstall the chart, stop the HTTP server (by pid file), put the
#                              control plane back as `up` found it
#   hack/quickstart.sh status  print what runs
#
# The images are made from target/release/templatecache (`make up` builds it). Logs and pid
# files are in .cluster/quickstart/. `down` stops the control plane only if `up` started it; a
# control plane that was up without the node (`make cluster-up`) is switched back to that.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cluster/quickstart"
kubectl="$root/.cluster/kubectl"
export KUBECONFIG="$root/.cluster/kubeconfig"
# shellcheck source=hack/node/env.sh
source "$root/hack/node/env.sh"
# examples/local/cache.yaml names this address; examples/local/store.yaml this folder.
http_port=18089
store_dir=/tmp/templatecache-quickstart
release=templatecache
namespace=templatecache-system
# The UID and GID of the image (its USER): the copy Jobs' mover writes into the store as them.
image_user=65532
processes="http"

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

# Whether nothing listens on port $1 of the node's address (SO_REUSEADDR, as http.server binds:
# a closed connection lingering in TIME_WAIT does not take the port).
port_free() {
  python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2])))" "$NODE_IP" "$1" 2>/dev/null
}

# wait_for WHAT CMD...: retries CMD for 30 s.
wait_for() {
  local what=$1 i; shift
  for i in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$what did not come up; see $dir/"
  return 1
}

helm() { "$("$root/hack/helm/build.sh")" "$@"; }

# The pinned reference hack/image.sh pushed for KEY (TEMPLATECACHE_IMAGE, ...).
pushed() { sed -n "s/^$1=//p" "$root/.cluster/images.env"; }

# The cluster's control plane before `up`: none, plain (no kubelet) or node.
record_cluster_mode() {
  local status
  status=$("$root/hack/cluster.sh" status 2>/dev/null || true)
  rm -f "$dir/started-cluster" "$dir/was-plain"
  if ! grep -q '^kube-apiserver running' <<<"$status"; then
    touch "$dir/started-cluster"
  elif [ ! -f "$root/.cluster/node.env" ]; then
    touch "$dir/was-plain"
  fi
}

# The store's folder as a provisioner makes one: owned by the image's user, setgid, so the
# folders the kubelet creates for subPath mounts are the mover's group and writable by it.
# What an earlier run left there (written as root by an older version) is handed over too.
store_folder() {
  mkdir -p "$store_dir"
  chown -R "$image_user:$image_user" "$store_dir"
  find "$store_dir" -type d -exec chmod 2775 {} +
}

# helm upgrade --install of the chart with the image just pushed (pinned by digest), the
# quickstart store as the default, copy Jobs allowed in "default" and to read the HTTP server.
install_chart() {
  local image tag flow_control=true managed
  image=$(pushed TEMPLATECACHE_IMAGE)
  tag=${image#*/templatecache:}   # dev@sha256:...: the tag, pinned to what was pushed
  # The API priority settings applied with kubectl (the tests do) are not helm's to adopt.
  managed=$("$kubectl" get flowschema templatecache-operator --ignore-not-found \
    -o 'jsonpath={.metadata.labels.app\.kubernetes\.io/managed-by}')
  if "$kubectl" get flowschema templatecache-operator >/dev/null 2>&1 && [ "$managed" != Helm ]; then
    flow_control=false
  fi
  helm upgrade --install "$release" "$root/charts/templatecache-operator" \
    --namespace "$namespace" --create-namespace \
    --set image.repository="$REGISTRY_ALIAS/templatecache" --set image.tag="$tag" \
    --set defaultStore.name=quickstart \
    --set 'copyJobs.namespaces={default}' \
    --set-json "operator.allowInternalAddresses=[\"$NODE_IP:$http_port\"]" \
    --set flowControl.enabled="$flow_control" \
    --wait --timeout 5m >"$dir/helm.log" 2>&1 || { tail -20 "$dir/helm.log" >&2; return 1; }
}

up() {
  local binary="$root/target/release/templatecache"
  [ -x "$binary" ] || { log "target/release/templatecache is missing: run make up"; exit 1; }
  mkdir -p "$dir"
  [ -f "$dir/started-cluster" ] || [ -f "$dir/was-plain" ] || [ -f "$dir/installed" ] || record_cluster_mode
  TEMPLATECACHE_NODE=1 "$root/hack/cluster.sh" up
  BINARY="$binary" "$root/hack/image.sh" all >"$dir/images.log"
  store_folder

  if ! alive http; then
    port_free "$http_port" || { log "port $http_port of $NODE_IP is taken; examples/local/ needs it"; exit 1; }
    start http python3 -m http.server "$http_port" --bind "$NODE_IP" --directory "$root/examples/files"
  fi
  wait_for "the HTTP server" curl -sf "http://$NODE_IP:$http_port/demo.img" -o /dev/null
  install_chart
  touch "$dir/installed"
  log "running: the chart in $namespace ($(pushed TEMPLATECACHE_IMAGE)), files on http://$NODE_IP:$http_port/"
  log "export KUBECONFIG=$KUBECONFIG; operator logs: kubectl -n $namespace logs deploy/$release"
}

down() {
  local name
  if [ -f "$dir/installed" ]; then
    helm uninstall "$release" --namespace "$namespace" --wait --ignore-not-found >/dev/null
    "$kubectl" delete namespace "$namespace" --ignore-not-found >/dev/null
    rm -f "$dir/installed"
  fi
  for name in $processes; do stop "$name"; done
  if [ -f "$dir/started-cluster" ]; then
    "$root/hack/cluster.sh" down
  elif [ -f "$dir/was-plain" ]; then
    "$root/hack/cluster.sh" up
  fi
  rm -f "$dir/started-cluster" "$dir/was-plain"
  log "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status)
    for n in $processes; do
      if alive "$n"; then echo "$n running (pid $(cat "$dir/$n.pid"))"; else echo "$n stopped"; fi
    done
    if [ -f "$dir/installed" ]; then echo "chart installed in $namespace"; else echo "chart not installed"; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
