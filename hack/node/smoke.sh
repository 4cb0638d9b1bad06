#!/usr/bin/env bash
# Proves the local node (make node-up; make image or hack/image.sh consumer) end to end:
#   1. the node is Ready;
#   2. a Pod under the PodSecurity `restricted` level reads a file through a hostPath + subPath
#      mount and prints its SHA-256, the same as the host's (kubectl logs);
#   3. a batch/v1 Job completes (the real Job controller, a real Pod);
#   4. a Pod reaches the API server through the `kubernetes` Service (10.0.0.1:443, kube-proxy)
#      with its projected ServiceAccount token, and the API server says who it is;
#   5. kubectl exec works (the API server reaches the kubelet).
# Leaves nothing behind: its namespace and host folder go at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=hack/node/env.sh
source "$root/hack/node/env.sh"
# shellcheck disable=SC1091
. "$root/.cluster/node-ports"
k() { "$root/.cluster/kubectl" --kubeconfig "$root/.cluster/kubeconfig" "$@"; }
image="$NODE_IP:$REGISTRY_PORT/templatecache-consumer:${TAG:-dev}"
ns=node-smoke
data="$root/.cluster/node-smoke"
t0=$(date +%s.%N)
step() { printf 'smoke: %-60s %6.1f s\n' "$1" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')"; }
cleanup() { k delete namespace "$ns" --wait=false >/dev/null 2>&1 || true; rm -rf "$data"; }
trap cleanup EXIT

k wait --for=condition=Ready "node/$NODE_NAME" --timeout=60s >/dev/null
step "node $NODE_NAME Ready"

mkdir -p "$data"
head -c 3000000 /dev/urandom > "$data/payload.bin"
chmod 0644 "$data/payload.bin"
want=$(sha256sum "$data/payload.bin" | cut -d' ' -f1)
k delete namespace "$ns" "$ns-host" --ignore-not-found --timeout=120s >/dev/null
k create namespace "$ns" >/dev/null
k label namespace "$ns" pod-security.kubernetes.io/enforce=restricted >/dev/null
k -n "$ns" wait --for=jsonpath='{.metadata.name}'=default serviceaccount/default --timeout=30s >/dev/null

restricted='{"runAsNonRoot": true, "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}'
# The restricted level forbids hostPath: the subPath consumer runs in a namespace without it.
k create namespace "$ns-host" >/dev/null 2>&1 || true
trap 'cleanup; k delete namespace "$ns-host" --wait=false >/dev/null 2>&1 || true' EXIT
k -n "$ns-host" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: consumer}
spec:
  restartPolicy: Never
  containers:
  - name: sha
    image: $image
    imagePullPolicy: Always
    command: [sh, -c, 'sha256sum /data/payload.bin']
    securityContext: $restricted
    volumeMounts: [{name: store, mountPath: /data/payload.bin, subPath: payload.bin, readOnly: true}]
  volumes: [{name: store, hostPath: {path: $data, type: Directory}}]
YAML
k -n "$ns-host" wait --for=jsonpath='{.status.phase}'=Succeeded pod/consumer --timeout=120s >/dev/null
got=$(k -n "$ns-host" logs consumer | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "smoke: consumer printed '$got', the file's SHA-256 is $want" >&2; exit 1; }
step "hostPath+subPath consumer printed $got"

k -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: batch/v1
kind: Job
metadata: {name: job}
spec:
  backoffLimit: 0
  ttlSecondsAfterFinished: 600
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: job
        image: $image
        imagePullPolicy: Always
        command: [sh, -c, 'echo job ran as uid \$(id -u)']
        securityContext: $restricted
YAML
k -n "$ns" wait --for=condition=Complete job/job --timeout=120s >/dev/null
step "Job complete: $(k -n "$ns" logs job/job)"

k -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: token}
spec:
  restartPolicy: Never
  containers:
  - name: who
    image: $image
    imagePullPolicy: Always
    command: [sh, -c, 'kube-whoami; sleep 3600']
    securityContext: $restricted
YAML
k -n "$ns" wait --for=condition=Ready pod/token --timeout=120s >/dev/null
for _ in $(seq 1 20); do k -n "$ns" logs token | grep -q username && break; sleep 0.5; done
user=$(k -n "$ns" logs token | grep -o '"username":"[^"]*"')
[ "$user" = '"username":"system:serviceaccount:node-smoke:default"' ] ||
  { echo "smoke: the token Pod's log:" >&2; k -n "$ns" logs token >&2; exit 1; }
step "Pod -> 10.0.0.1:443 with its token: $user"

k -n "$ns" exec token -- cat /var/run/secrets/kubernetes.io/serviceaccount/namespace | grep -qx "$ns"
step "kubectl exec"
