#!/usr/bin/env bash
# The local control plane: etcd, kube-apiserver and kube-controller-manager built from Go modules
# (hack/k8s) and started on loopback, the way controller-runtime's envtest does it.
#
#   hack/cluster.sh up                 start (idempotent), write .cluster/kubeconfig
#   hack/cluster.sh down               stop what `up` started (by pid file, never by name)
#   hack/cluster.sh restart-apiserver  stop and start kube-apiserver only (chaos tests)
#   hack/cluster.sh status             print what runs
#
# Everything lives in .cluster/: certificates, the service-account key pair, etcd's data, logs,
# pid files, the chosen ports and the kubeconfig. The controller manager runs without its job
# controller and there is no kubelet: no Job runs (the suites that play the Job controller
# themselves, and the benchmarks, need exactly that).
#
# Node mode (TEMPLATECACHE_NODE=1 hack/cluster.sh up, or make cluster-up NODE=1): a real node
# as well (hack/node.sh). The API server then binds the node address on the project's bridge
# (so Pods reach it through the `kubernetes` Service) instead of 127.0.0.1, publishes its
# endpoint, authorizes kubelets and reaches them for logs/exec; the controller manager runs all
# its default controllers (the real Job controller, node lifecycle, root-ca-cert-publisher, ...).
# The mode is kept in .cluster/mode; `up` in the other mode restarts the API server and the
# controller manager.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cluster"
bin=""
mode=plain; [ "${TEMPLATECACHE_NODE:-0}" = 1 ] && mode=node
# shellcheck source=hack/node/env.sh
source "$root/hack/node/env.sh"
host=127.0.0.1; [ "$mode" = node ] && host=$NODE_IP

log() { echo "cluster: $*" >&2; }

ensure_binaries() { bin=$("$root/hack/k8s/build.sh"); }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# shellcheck source=hack/pidfiles.sh
source "$root/hack/pidfiles.sh"

choose_ports() {
  [ -f "$dir/ports" ] && return
  echo "ETCD_PORT=$(free_port) ETCD_PEER_PORT=$(free_port) APISERVER_PORT=$(free_port)" | tr ' ' '\n' > "$dir/ports"
}

make_certs() {
  local pki="$dir/pki"
  [ -f "$pki/admin.crt" ] && return
  mkdir -p "$pki"
  log "generating certificates"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=templatecache-local-ca" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' > server.ext
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out apiserver.crt 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_kubeconfig() {
  local pki="$dir/pki" b64="base64 -w0"
  cat > "$dir/kubeconfig.tmp" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$host:$APISERVER_PORT
    certificate-authority-data: $($b64 < "$pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $($b64 < "$pki/admin.crt")
    client-key-data: $($b64 < "$pki/admin.key")
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
KC
  mv "$dir/kubeconfig.tmp" "$dir/kubeconfig"
}

# start NAME CMD...: runs CMD in its own session, logs to .cluster/NAME.log, pid to NAME.pid.
start() {
  local name=$1; shift
  alive "$name" && return
  setsid "$@" >"$dir/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/$name.pid"
}

start_etcd() {
  start etcd "$bin/etcd" --name default --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync=true \
    --quota-backend-bytes=8589934592 --log-level=warn
}

start_apiserver() {
  local pki="$dir/pki" mode_flags
  mode_flags=(--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --endpoint-reconciler-type none
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" --authorization-mode RBAC)
  if [ "$mode" = node ]; then
    mode_flags=(--bind-address "$NODE_IP" --advertise-address "$NODE_IP"
      --tls-cert-file "$pki/node/apiserver.crt" --tls-private-key-file "$pki/node/apiserver.key"
      --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction
      --kubelet-client-certificate "$pki/node/apiserver-kubelet-client.crt"
      --kubelet-client-key "$pki/node/apiserver-kubelet-client.key"
      --kubelet-certificate-authority "$pki/ca.crt"
      --kubelet-preferred-address-types InternalIP,Hostname)
  fi
  start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --secure-port "$APISERVER_PORT" "${mode_flags[@]}" \
    --cert-dir "$pki" --client-ca-file "$pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true
}

start_controller_manager() {
  local controllers=serviceaccount-controller,serviceaccount-token-controller,namespace-controller,garbage-collector-controller
  # A real cluster's default set: the Job controller, node lifecycle, root-ca-cert-publisher,
  # ttl-after-finished, ReplicaSets and Deployments, EndpointSlices, ...
  [ "$mode" = node ] && controllers='*'
  # Node mode: its own identity, and each controller as its ServiceAccount (kube-system/
  # job-controller creates the copy Pods), as kubeadm runs it.
  local sa_credentials=false hostpath_provisioner=false
  cp "$dir/kubeconfig" "$dir/controller-manager.kubeconfig"
  if [ "$mode" = node ]; then
    cp "$dir/pki/node/kube-controller-manager.kubeconfig" "$dir/controller-manager.kubeconfig"
    sa_credentials=true
    # Claims of a StorageClass with provisioner kubernetes.io/host-path get a folder under
    # /tmp/hostpath_pv (the populator's prime claims in the tests); one node, so it serves.
    hostpath_provisioner=true
  fi
  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$dir/controller-manager.kubeconfig" --leader-elect=false --secure-port 0 \
    --controllers "$controllers" --enable-hostpath-provisioner=$hostpath_provisioner \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --use-service-account-credentials=$sa_credentials
}

wait_ready() {
  local i
  for i in $(seq 1 120); do
    alive kube-apiserver || break
    if "$bin/kubectl" --kubeconfig "$dir/kubeconfig" get --raw /readyz >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "kube-apiserver did not become ready; last lines of its log:"
  tail -20 "$dir/kube-apiserver.log" >&2
  return 1
}

wait_default_serviceaccount() {
  local i
  for i in $(seq 1 60); do
    "$bin/kubectl" --kubeconfig "$dir/kubeconfig" -n default get serviceaccount default >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  log "the default ServiceAccount did not appear; see $dir/kube-controller-manager.log"
  return 1
}

up() {
  ensure_binaries
  mkdir -p "$dir"
  choose_ports
  # shellcheck disable=SC1091
  . "$dir/ports"
  make_certs
  # Switching modes: the API server and controller manager restart with the other flags, and
  # the node goes when leaving node mode.
  if [ "$(cat "$dir/mode" 2>/dev/null || echo plain)" != "$mode" ]; then
    # Back to plain: the node goes, and its Node object (no node lifecycle controller would
    # ever mark it NotReady in plain mode).
    if [ "$mode" = plain ]; then
      "$root/hack/node.sh" down
      "$bin/kubectl" --kubeconfig "$dir/kubeconfig" delete node "$NODE_NAME" --ignore-not-found >/dev/null 2>&1 || true
    fi
    stop kube-controller-manager
    stop kube-apiserver
    [ "$mode" = plain ] && "$root/hack/node.sh" net-down
  fi
  if [ "$mode" = node ]; then
    "$root/hack/node.sh" net
    "$root/hack/node.sh" certs
  fi
  echo "$mode" > "$dir/mode"
  write_kubeconfig
  start_etcd
  start_apiserver
  wait_ready
  start_controller_manager
  wait_default_serviceaccount
  ln -sf "$bin/kubectl" "$dir/kubectl"
  [ "$mode" = node ] && "$root/hack/node.sh" up
  log "ready: export KUBECONFIG=$dir/kubeconfig"
}

down() {
  "$root/hack/node.sh" down
  stop kube-controller-manager
  stop kube-apiserver
  stop etcd
  "$root/hack/node.sh" net-down
  rm -f "$dir/mode"
  log "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  restart-apiserver)
    ensure_binaries; . "$dir/ports"
    [ "$(cat "$dir/mode" 2>/dev/null)" = node ] && { mode=node; host=$NODE_IP; }
    stop kube-apiserver; start_apiserver; wait_ready ;;
  status)
    for n in etcd kube-apiserver kube-controller-manager; do
      if alive "$n"; then echo "$n running (pid $(cat "$dir/$n.pid"))"; else echo "$n stopped"; fi
    done
    if [ "$(cat "$dir/mode" 2>/dev/null)" = node ]; then "$root/hack/node.sh" status; fi ;;
  *) echo "usage: $0 up|down|restart-apiserver|status" >&2; exit 2 ;;
esac
