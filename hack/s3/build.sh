#!/usr/bin/env bash
# Builds versitygw (a real S3-compatible server) into .cache/s3/<version>/bin once per version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
version=$(awk '$1=="github.com/versity/versitygw" {print $2; exit}' "$here/go.mod")
bin="$root/.cache/s3/$version/bin"
[ -x "$bin/versitygw" ] && { echo "$bin/versitygw"; exit 0; }
mkdir -p "$bin"
cd "$here"
echo "building versitygw $version into $bin" >&2
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$bin/versitygw.tmp" github.com/versity/versitygw/cmd/versitygw
mv "$bin/versitygw.tmp" "$bin/versitygw"
echo "$bin/versitygw"
