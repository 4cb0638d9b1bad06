#!/usr/bin/env bash
# Builds what the local node runs, from pinned Go modules, into .cache/ once per pinned version:
#   kubelet, kube-scheduler, kube-proxy        hack/k8s (the control plane's module and ldflags)
#   containerd, ctr, containerd-shim-runc-v2   hack/containerd
#   CNI bridge, host-local, loopback, portmap  hack/cni
#   crane (OCI images without a daemon)        hack/crane
#   pause (the Pod sandbox program)            hack/node/pause
#   whoami (the consumer image's API probe)    hack/node/whoami
# runc and iptables come from Debian (.ci/run installs them).
#   hack/node/build.sh [k8s|containerd|cni|crane|pause|whoami ...]   (default: all)
# Prints shell assignments (K8S_BIN=, CONTAINERD_BIN=, CNI_BIN=, CRANE=, PAUSE=, WHOAMI=) for
# hack/node.sh and hack/image.sh to evaluate; progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
hack=$(cd "$here/.." && pwd)
root=$(cd "$hack/.." && pwd)
export CGO_ENABLED=0 GOFLAGS=-mod=mod

# modversion GO.MOD MODULE: the version a go.mod requires of MODULE.
modversion() { awk -v m="$2" '$1==m && $2 ~ /^v/ {print $2; exit} $1=="require" && $2==m {print $3; exit}' "$1"; }
# hashof FILE...: 16 hex digits of the files' contents (never their paths: every git worktree
# must see the same stamp).
hashof() { cat "$@" | sha256sum | cut -c1-16; }

k8s_version=$(modversion "$hack/k8s/go.mod" k8s.io/kubernetes)
K8S_BIN="$root/.cache/k8s/$k8s_version/bin"
ctd_version=$(modversion "$hack/containerd/go.mod" github.com/containerd/containerd/v2)
CONTAINERD_BIN="$root/.cache/containerd/$ctd_version/bin"
cni_version=$(modversion "$hack/cni/go.mod" github.com/containernetworking/plugins)
CNI_BIN="$root/.cache/cni/$cni_version/bin"
crane_version=$(modversion "$hack/crane/go.mod" github.com/google/go-containerregistry)
# shellcheck disable=SC2034 # printed below
CRANE="$root/.cache/crane/$crane_version/bin/crane"
PAUSE="$root/.cache/pause/$(hashof "$here/pause/go.mod" "$here/pause/main.go")/pause"
WHOAMI="$root/.cache/whoami/$(hashof "$here/whoami/go.mod" "$here/whoami/main.go")/whoami"

# The node's Kubernetes binaries sit next to the control plane's but with a stamp of their own:
# hack/k8s/build.sh removes .built-* when it relinks, so this one is named .node-*.
build_k8s() {
  local stamp
  stamp="$K8S_BIN/.node-$(hashof "$hack/k8s/go.mod" "$hack/k8s/go.sum")"
  [ -f "$stamp" ] && return
  mkdir -p "$K8S_BIN"
  # The same version ldflags as hack/k8s/build.sh, so the Node's kubeletVersion is the release.
  local major=${k8s_version#v}; major=${major%%.*}
  local minor=${k8s_version#v*.}; minor=${minor%%.*}
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  echo "building kubelet, kube-scheduler, kube-proxy $k8s_version into $K8S_BIN" >&2
  for cmd in kubelet kube-scheduler kube-proxy; do
    (cd "$hack/k8s" && go build -trimpath -ldflags "$ldflags" -o "$K8S_BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  done
  rm -f "$K8S_BIN"/.node-*
  touch "$stamp"
}

# containerd without the snapshotters that need cgo or kernel features (btrfs, devmapper, zfs).
build_containerd() {
  local stamp
  stamp="$CONTAINERD_BIN/.built-$(hashof "$hack/containerd/go.mod" "$hack/containerd/go.sum")"
  [ -f "$stamp" ] && return
  mkdir -p "$CONTAINERD_BIN"
  echo "building containerd $ctd_version into $CONTAINERD_BIN" >&2
  local ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$ctd_version"
  for cmd in containerd ctr containerd-shim-runc-v2; do
    (cd "$hack/containerd" && go build -trimpath -tags "no_btrfs no_devmapper no_zfs" -ldflags "$ldflags" \
      -o "$CONTAINERD_BIN/$cmd" "github.com/containerd/containerd/v2/cmd/$cmd")
  done
  rm -f "$CONTAINERD_BIN"/.built-*
  touch "$stamp"
}

build_cni() {
  local stamp
  stamp="$CNI_BIN/.built-$(hashof "$hack/cni/go.mod" "$hack/cni/go.sum")"
  [ -f "$stamp" ] && return
  mkdir -p "$CNI_BIN"
  echo "building CNI plugins $cni_version into $CNI_BIN" >&2
  local p
  for p in main/bridge ipam/host-local main/loopback meta/portmap; do
    (cd "$hack/cni" && go build -trimpath -ldflags "-s -w" -o "$CNI_BIN/${p#*/}" \
      "github.com/containernetworking/plugins/plugins/$p")
  done
  rm -f "$CNI_BIN"/.built-*
  touch "$stamp"
}

build_crane() {
  "$hack/build-go-tool.sh" "$hack/crane" github.com/google/go-containerregistry \
    github.com/google/go-containerregistry/cmd/crane crane crane >/dev/null
}

# build_small NAME OUT: a standard-library program of ours, versioned by the hash of its source.
build_small() {
  [ -x "$2" ] && return
  mkdir -p "$(dirname "$2")"
  echo "building $1 into $(dirname "$2")" >&2
  (cd "$here/$1" && go build -trimpath -ldflags "-s -w" -o "$2.tmp" .)
  mv "$2.tmp" "$2"
}
build_pause() { build_small pause "$PAUSE"; }
build_whoami() { build_small whoami "$WHOAMI"; }

pieces=("$@")
[ $# -gt 0 ] || pieces=(k8s containerd cni crane pause whoami)
for piece in "${pieces[@]}"; do "build_$piece"; done

for v in K8S_BIN CONTAINERD_BIN CNI_BIN CRANE PAUSE WHOAMI; do echo "$v=${!v}"; done
