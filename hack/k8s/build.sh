#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from the Go modules pinned in
# this folder's go.mod into .cache/k8s/<version>/bin. A stamp file makes a second run a no-op
# until the pinned version changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
version=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$here/go.mod")
bin="$root/.cache/k8s/$version/bin"
# The contents only: a hash of the paths would make every git worktree think the binaries are
# stale and relink them under the others.
stamp="$bin/.built-$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && { echo "$bin"; exit 0; }

mkdir -p "$bin"
major=${version#v}; major=${major%%.*}
minor=${version#v*.}; minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
cd "$here"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
echo "building control plane $version into $bin" >&2
go build -trimpath -o "$bin/etcd" go.etcd.io/etcd/server/v3
for cmd in kube-apiserver kube-controller-manager kubectl; do
  go build -trimpath -ldflags "$ldflags" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
rm -f "$bin"/.built-*
touch "$stamp"
echo "$bin"
