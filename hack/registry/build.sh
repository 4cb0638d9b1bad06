#!/usr/bin/env bash
# Builds the CNCF distribution registry into .cache/registry/<version>/bin once per version.
here=$(dirname "$0")
exec "$here/../build-go-tool.sh" "$here" github.com/distribution/distribution/v3 \
  github.com/distribution/distribution/v3/cmd/registry registry registry
