#!/usr/bin/env bash
# The local node: containerd + runc + CNI bridge, kubelet, kube-proxy and kube-scheduler next to
# the control plane of hack/cluster.sh, so Pods run for real. Opt-in: the control plane must run
# in node mode (TEMPLATECACHE_NODE=1 hack/cluster.sh up, or make cluster-up NODE=1, which calls
# this script); plain `make cluster-up` switches it off again (no Job runs there).
#
#   hack/node.sh net       create the bridge that carries the node address (cluster.sh, first)
#   hack/node.sh certs     the certificates node mode needs (cluster.sh, before the API server)
#   hack/node.sh registry  start the image registry on the node address (idempotent)
#   hack/node.sh up        start containerd, kubelet, kube-proxy, kube-scheduler (idempotent)
#   hack/node.sh down      stop them and remove what they made on the host
#   hack/node.sh net-down  remove the bridge, put back the sysctls (cluster.sh, last)
#   hack/node.sh status    print what runs
#
# State, logs and pid files live in .cluster/node/ (removed by down); the registry's storage
# in .cluster/registry/ survives, like etcd's data. Needs root, runc and iptables (Debian).
# While the node is up, .cluster/node.env says so: NODE_NAME, NODE_IP, POD_CIDR, REGISTRY.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cluster="$root/.cluster"
dir="$cluster/node"
pki="$cluster/pki"
npki="$pki/node"
# shellcheck source=hack/node/env.sh
source "$root/hack/node/env.sh"
# shellcheck source=hack/pidfiles.sh
source "$root/hack/pidfiles.sh"

log() { echo "node: $*" >&2; }
die() { log "$*"; exit 1; }

free_port() { python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"; }

# The node's ports, chosen once in .cluster/node-ports (kept across restarts: image names carry
# the registry's port), and the control plane's.
node_ports() {
  mkdir -p "$cluster"
  [ -f "$cluster/node-ports" ] || {
    echo "REGISTRY_PORT=$(free_port "$NODE_IP")"
    echo "KUBELET_PORT=$(free_port "$NODE_IP")"
  } > "$cluster/node-ports"
  # shellcheck disable=SC1091
  . "$cluster/node-ports"
  # shellcheck disable=SC1091
  [ -f "$cluster/ports" ] && . "$cluster/ports"
  REGISTRY="$NODE_IP:$REGISTRY_PORT"
}

binaries() { eval "$("$root/hack/node/build.sh")"; }

start() {
  local name=$1; shift
  alive "$name" && return
  setsid "$@" >"$dir/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/$name.pid"
}

wait_for() {
  local what=$1 name=$2; shift 2
  for _ in $(seq 1 120); do
    "$@" >/dev/null 2>&1 && return 0
    alive "$name" || break
    sleep 0.5
  done
  log "$what did not come up; last lines of $dir/$name.log:"
  tail -20 "$dir/$name.log" >&2
  return 1
}

# What the host had before the node touched it, recorded once, so down puts back exactly that.
sysctls="net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet"
hostpaths="/run/containerd /var/lib/cni /var/lib/kubelet /var/log/containers /var/log/pods /run/netns /tmp/hostpath_pv"
record_host() {
  mkdir -p "$cluster"
  [ -f "$cluster/node-host-state" ] && return
  {
    for s in $sysctls; do v=$(sysctl -n "$s" 2>/dev/null) && echo "sysctl $s $v"; done
    for p in $hostpaths; do [ -e "$p" ] || echo "absent $p"; done
    for t in filter nat mangle raw; do
      iptables -t "$t" -S 2>/dev/null | awk -v t="$t" '$1=="-N" {print "chain4", t, $2}'
      ip6tables -t "$t" -S 2>/dev/null | awk -v t="$t" '$1=="-N" {print "chain6", t, $2}'
    done
    # iptables-nft makes its nf_tables tables (ip nat, ip6 filter, ...) on first use.
    nft list tables 2>/dev/null | awk '$1=="table" {print "nft", $2, $3}'
  } > "$cluster/node-host-state.tmp"
  mv "$cluster/node-host-state.tmp" "$cluster/node-host-state"
}

net() {
  record_host
  if ! ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    log "creating bridge $NODE_BRIDGE with $NODE_IP"
    ip link add "$NODE_BRIDGE" type bridge
  fi
  [[ $(ip -4 addr show dev "$NODE_BRIDGE") == *"inet $NODE_IP/"* ]] || ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
}

# sign NAME SUBJECT EXT: a key and a certificate signed by the cluster CA, in .cluster/pki/node.
sign() {
  local name=$1 subject=$2 ext=$3
  [ -f "$npki/$name.crt" ] && return
  printf '%b\n' "$ext" > "$npki/$name.ext"
  openssl req -newkey rsa:2048 -nodes -keyout "$npki/$name.key" -out "$npki/$name.csr" -subj "$subject" 2>/dev/null
  openssl x509 -req -in "$npki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$npki/$name.ext" -out "$npki/$name.crt" 2>/dev/null
}

certs() {
  [ -f "$pki/ca.key" ] || die "no cluster CA in $pki"
  mkdir -p "$npki"
  # The API server's serving certificate, also valid for the node address it binds in node mode.
  sign apiserver "/CN=kube-apiserver" "subjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:${SERVICE_CIDR%.*}.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth"
  # The API server's client certificate to the kubelet (logs, exec, port-forward).
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
  # The kubelet's identity for the Node authorizer, and its serving certificate.
  sign kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" "extendedKeyUsage=clientAuth"
  sign kubelet-serving "/CN=$NODE_NAME" "subjectAltName=IP:$NODE_IP,DNS:$NODE_NAME\nextendedKeyUsage=serverAuth"
  # The components' own identities, as on a kubeadm cluster: the bootstrap RBAC roles bind
  # them, and admission policies see system:kube-controller-manager (or, with
  # --use-service-account-credentials, the job-controller ServiceAccount), never admin.
  local c
  for c in kube-controller-manager kube-scheduler kube-proxy; do
    sign "$c" "/CN=system:$c" "extendedKeyUsage=clientAuth"
  done
  node_ports
  for c in kube-controller-manager kube-scheduler kube-proxy; do
    kubeconfig "$npki/$c.kubeconfig" "$npki/$c.crt" "$npki/$c.key"
  done
}

# kubeconfig FILE CERT KEY: a kubeconfig for the API server on the node address.
kubeconfig() {
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://$NODE_IP:$APISERVER_PORT", certificate-authority: "$pki/ca.crt"}
users:
- name: user
  user: {client-certificate: "$2", client-key: "$3"}
contexts:
- name: local
  context: {cluster: local, user: user}
current-context: local
KC
}

# The project's registry (hack/registry), without auth, on the node address: containerd pulls
# from it over plain HTTP (certs.d below), the way a node pulls from any registry.
registry() {
  net
  mkdir -p "$dir" "$cluster/registry"
  node_ports
  alive registry && return
  local bin
  bin=$("$root/hack/registry/build.sh")
  cat > "$cluster/registry/config.yml" <<CFG
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $cluster/registry/storage}, delete: {enabled: true}}
http: {addr: "$REGISTRY"}
CFG
  OTEL_TRACES_EXPORTER=none start registry "$bin" serve "$cluster/registry/config.yml"
  wait_for "the registry" registry curl -sf "http://$REGISTRY/v2/"
  log "registry on http://$REGISTRY/"
}

containerd_config() {
  local c="$dir/containerd"
  mkdir -p "$c/certs.d/$REGISTRY" "$c/certs.d/$REGISTRY_ALIAS" "$dir/cni/net.d"
  cat > "$c/certs.d/$REGISTRY/hosts.toml" <<TOML
server = "http://$REGISTRY"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve", "push"]
TOML
  # The same registry under its fixed name (hack/node/env.sh).
  cat > "$c/certs.d/$REGISTRY_ALIAS/hosts.toml" <<TOML
server = "http://$REGISTRY"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
TOML
  # The shim socket folder /run/containerd/s is hard-coded in containerd; everything else is here.
  cat > "$c/config.toml" <<TOML
version = 3
root = "$c/root"
state = "$c/state"
[grpc]
  address = "$dir/containerd.sock"
[plugins.'io.containerd.cri.v1.runtime']
  # The sandbox lacks CAP_SYS_RESOURCE: without this every sandbox fails in runc.
  restrict_oom_score_adj = true
  # Network namespaces under the state folder instead of /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$CNI_BIN"]
    conf_dir = "$dir/cni/net.d"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "$(command -v runc)"
      SystemdCgroup = false
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$SANDBOX_IMAGE"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "$c/certs.d"
TOML
  # One bridge network on the node's own bridge; no masquerade: Pods only talk to this machine.
  # Written next to net.d and moved in: containerd reloads on every write it sees there.
  cat > "$dir/cni/10-templatecache.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "templatecache",
  "plugins": [
    {"type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "${NODE_IP%.*}.10", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  mv "$dir/cni/10-templatecache.conflist" "$dir/cni/net.d/"
}

ctr_() { "$CONTAINERD_BIN/ctr" --address "$dir/containerd.sock" -n k8s.io "$@"; }

# The sandbox image: no registry outside is reachable, so our static pause goes into the local
# registry (with an Entrypoint: an empty OCI base has none) and is imported under the pinned name.
pause_image() {
  [[ $'\n'$(ctr_ images ls -q)$'\n' == *$'\n'"$SANDBOX_IMAGE"$'\n'* ]] && return
  local tmp ref="$REGISTRY/pause:${SANDBOX_IMAGE##*:}"
  tmp=$(mktemp -d)
  cp "$PAUSE" "$tmp/pause"
  tar -C "$tmp" --owner=0 --group=0 -cf "$tmp/layer.tar" pause
  {
    "$CRANE" append --insecure --oci-empty-base -f "$tmp/layer.tar" -t "$ref"
    "$CRANE" mutate --insecure "$ref" --set-platform linux/amd64 --entrypoint /pause -t "$ref"
    ctr_ images pull --plain-http "$ref"
    ctr_ images tag --force "$ref" "$SANDBOX_IMAGE"
  } >>"$dir/pause-image.log" 2>&1 || { tail -20 "$dir/pause-image.log" >&2; die "could not import the pause image"; }
  rm -rf "$tmp"
}

kubelet_config() {
  local k="$dir/kubelet"
  mkdir -p "$k"
  kubeconfig "$k/kubeconfig" "$npki/kubelet-client.crt" "$npki/kubelet-client.key"
  cat > "$k/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine: cgroup v1, cgroupfs, swap may be on.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$dir/containerd.sock
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzPort: 0
tlsCertFile: $npki/kubelet-serving.crt
tlsPrivateKeyFile: $npki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
podLogsDirectory: $dir/pod-logs
volumePluginDir: $k/volume-plugins
maxPods: 250
serializeImagePulls: false
# A sandbox disk and memory are what they are: evict only when really out of them.
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
YAML
}

kube_proxy_config() {
  local p="$dir/kube-proxy"
  mkdir -p "$p"
  cat > "$p/config.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $npki/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:$(free_port 127.0.0.1)
metricsBindAddress: 127.0.0.1:$(free_port 127.0.0.1)
# NodePorts on the node address only, never on external interfaces or loopback.
nodePortAddresses: ["$NODE_IP/32"]
iptables: {localhostNodePorts: false}
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
}

up() {
  [ "$(id -u)" = 0 ] || die "the node needs root"
  command -v runc >/dev/null || die "runc is missing: apt-get install -y runc"
  command -v iptables >/dev/null || die "iptables is missing: apt-get install -y iptables"
  [ "$(cat "$cluster/mode" 2>/dev/null)" = node ] ||
    die "the control plane is not in node mode: TEMPLATECACHE_NODE=1 hack/cluster.sh up"
  binaries
  registry
  mkdir -p "$dir"
  # mountPropagation needs a shared mount under the kubelet and containerd: / is private here.
  if ! mountpoint -q "$dir"; then mount --bind "$dir" "$dir"; fi
  mount --make-rshared "$dir"

  containerd_config
  PATH="$CONTAINERD_BIN:$PATH" start containerd "$CONTAINERD_BIN/containerd" --config "$dir/containerd/config.toml"
  wait_for containerd containerd ctr_ version
  pause_image

  kubelet_config
  start kubelet "$K8S_BIN/kubelet" --config "$dir/kubelet/config.yaml" \
    --kubeconfig "$dir/kubelet/kubeconfig" --root-dir "$dir/kubelet/root" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP"
  kube_proxy_config
  start kube-proxy "$K8S_BIN/kube-proxy" --config "$dir/kube-proxy/config.yaml"
  start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig "$npki/kube-scheduler.kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$(free_port 127.0.0.1)"
  wait_for "the node" kubelet "$cluster/kubectl" --kubeconfig "$cluster/kubeconfig" \
    wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
  # For tests and tools: the node is up, and where things are (KEY=VALUE lines).
  printf 'NODE_NAME=%s\nNODE_IP=%s\nPOD_CIDR=%s\nREGISTRY=%s\n' "$NODE_NAME" "$NODE_IP" "$POD_CIDR" "$REGISTRY" > "$cluster/node.env"
  log "node $NODE_NAME Ready on $NODE_IP; images from $REGISTRY"
}

# Every mount under the node's folder, deepest first.
node_mounts() { awk -v d="$dir" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | uniq; }

# stop_pods: kill every task containerd runs, then the shims by their pid files.
stop_pods() {
  alive containerd || return 0
  local id
  for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true; done
  sleep 1
  for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
}

# remove_chains: the iptables chains named KUBE-* or CNI-* that were not there before up,
# after the rules jumping to them.
remove_chains() {
  local state="$cluster/node-host-state" fam cmd t chain
  for fam in 4 6; do
    cmd=iptables; [ $fam = 6 ] && cmd=ip6tables
    command -v $cmd >/dev/null || continue
    for t in filter nat mangle raw; do
      for chain in $($cmd -t $t -S 2>/dev/null | awk '$1=="-N" && $2 ~ /^(KUBE|CNI)-/ {print $2}'); do
        grep -qx "chain$fam $t $chain" "$state" 2>/dev/null && continue
        $cmd -t $t -S | awk -v c="$chain" '$1=="-A" {for (i=2;i<=NF;i++) if (($i=="-j"||$i=="-g") && $(i+1)==c) {print; next}}' |
          while read -r rule; do eval "$cmd -t $t ${rule/-A/-D}" || true; done
        $cmd -t $t -F "$chain" 2>/dev/null || true
      done
      for chain in $($cmd -t $t -S 2>/dev/null | awk '$1=="-N" && $2 ~ /^(KUBE|CNI)-/ {print $2}'); do
        grep -qx "chain$fam $t $chain" "$state" 2>/dev/null || $cmd -t $t -X "$chain" 2>/dev/null || true
      done
    done
  done
  # The nf_tables tables iptables made for us, once they hold no rule (only base chains).
  command -v nft >/dev/null || return 0
  local family table rules
  nft list tables 2>/dev/null | awk '$1=="table" {print $2, $3}' | while read -r family table; do
    grep -qx "nft $family $table" "$state" 2>/dev/null && continue
    rules=$(nft list table "$family" "$table" | grep -vE '^\s*(table |chain |type |policy |}|$)' || true)
    if [ -z "$rules" ]; then nft delete table "$family" "$table"; fi
  done
}

down() {
  rm -f "$cluster/node.env"
  [ -d "$dir" ] || return 0
  eval "$("$root/hack/node/build.sh" pause 2>/dev/null)" || true
  stop kube-scheduler
  stop kubelet
  stop_pods
  stop kube-proxy
  # The shims of any task left, by the pid files containerd keeps for them.
  local f
  for f in "$dir"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
    if [ -f "$f" ]; then kill -9 "$(cat "$f")" 2>/dev/null || true; fi
  done
  stop containerd
  stop registry
  # kube-proxy's own clean-up of its rules, then whatever chains are left.
  if [ -x "${K8S_BIN:-}/kube-proxy" ]; then "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  remove_chains
  # Pod and container cgroups (cgroupfs: kubepods/ in every hierarchy), deepest first.
  find /sys/fs/cgroup/*/kubepods -depth -type d -exec rmdir {} + 2>/dev/null || true
  local m
  for m in $(node_mounts); do umount -l "$m" 2>/dev/null || true; done
  # Leftovers in the hard-coded host paths: only the folders the node created.
  rm -f /var/lib/cni/results/templatecache-* 2>/dev/null || true
  while read -r kind path; do
    [ "$kind" = absent ] && rm -rf "$path"
  done < <(grep '^absent ' "$cluster/node-host-state" 2>/dev/null || true)
  rm -rf "$dir"
  log "stopped; host paths cleaned"
}

# net_down: the bridge and the sysctls, once the API server no longer binds the node address.
net_down() {
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && ip link del "$NODE_BRIDGE"
  local state="$cluster/node-host-state" kind name value
  [ -f "$state" ] || return 0
  while read -r kind name value; do
    if [ "$kind" = sysctl ]; then sysctl -qw "$name=$value" 2>/dev/null || true; fi
  done < "$state"
  rm -f "$state"
}

case "${1:-}" in
  net) net ;;
  certs) certs ;;
  registry) registry ;;
  up) up ;;
  down) down ;;
  net-down) net_down ;;
  status)
    for n in containerd kubelet kube-proxy kube-scheduler registry; do
      if alive "$n"; then echo "$n running (pid $(cat "$dir/$n.pid"))"; else echo "$n stopped"; fi
    done ;;
  *) echo "usage: $0 net|certs|registry|up|down|net-down|status" >&2; exit 2 ;;
esac
