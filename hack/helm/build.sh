#!/usr/bin/env bash
# Builds helm into .cache/helm/<version>/bin once per version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
version=$(awk '$1=="helm.sh/helm/v3" {print $2; exit} $1=="require" && $2=="helm.sh/helm/v3" {print $3; exit}' "$here/go.mod")
bin="$root/.cache/helm/$version/bin"
[ -x "$bin/helm" ] && { echo "$bin/helm"; exit 0; }
mkdir -p "$bin"
cd "$here"
echo "building helm $version into $bin" >&2
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$bin/helm.tmp" helm.sh/helm/v3/cmd/helm
mv "$bin/helm.tmp" "$bin/helm"
echo "$bin/helm"
