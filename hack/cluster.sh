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
# controller: copy Jobs are run by the local Job executor instead, since there is no kubelet.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cluster"
bin=""

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
    server: https://127.0.0.1:$APISERVER_PORT
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
  local pki="$dir/pki"
  start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --cert-dir "$pki" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
    --endpoint-reconciler-type none
}

start_controller_manager() {
  cp "$dir/kubeconfig" "$dir/controller-manager.kubeconfig"
  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$dir/controller-manager.kubeconfig" --leader-elect=false --secure-port 0 \
    --controllers serviceaccount-controller,serviceaccount-token-controller,namespace-controller,garbage-collector-controller \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --use-service-account-credentials=false
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
  write_kubeconfig
  start_etcd
  start_apiserver
  wait_ready
  start_controller_manager
  wait_default_serviceaccount
  ln -sf "$bin/kubectl" "$dir/kubectl"
  log "ready: export KUBECONFIG=$dir/kubeconfig"
}

down() {
  stop kube-controller-manager
  stop kube-apiserver
  stop etcd
  log "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  restart-apiserver)
    ensure_binaries; . "$dir/ports"; stop kube-apiserver; start_apiserver; wait_ready ;;
  status)
    for n in etcd kube-apiserver kube-controller-manager; do
      if alive "$n"; then echo "$n running (pid $(cat "$dir/$n.pid"))"; else echo "$n stopped"; fi
    done ;;
  *) echo "usage: $0 up|down|restart-apiserver|status" >&2; exit 2 ;;
esac
