#!/usr/bin/env bash
# Builds a Go program pinned in a tools module into .cache/<name>/<version>/bin once per version
# and prints its path. Used by hack/s3, hack/helm, hack/promtool, hack/registry and hack/oras.
#   hack/build-go-tool.sh <folder with go.mod> <module> <package> <binary> <cache name>
set -euo pipefail
dir=$(cd "$1" && pwd); module=$2; package=$3; binary=$4; name=$5
root=$(cd "$(dirname "$0")/.." && pwd)
# The version go.mod requires, on a `require` line of its own or inside a block.
version=$(awk -v m="$module" '$1==m {print $2; exit} $1=="require" && $2==m {print $3; exit}' "$dir/go.mod")
[ -n "$version" ] || { echo "build-go-tool: $dir/go.mod does not require $module" >&2; exit 1; }
bin="$root/.cache/$name/$version/bin"
[ -x "$bin/$binary" ] && { echo "$bin/$binary"; exit 0; }
mkdir -p "$bin"
cd "$dir"
echo "building $binary $version into $bin" >&2
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$bin/$binary.tmp" "$package"
mv "$bin/$binary.tmp" "$bin/$binary"
echo "$bin/$binary"
