#!/usr/bin/env bash
# Builds versitygw (a real S3-compatible server) into .cache/s3/<version>/bin once per version.
here=$(dirname "$0")
exec "$here/../build-go-tool.sh" "$here" github.com/versity/versitygw \
  github.com/versity/versitygw/cmd/versitygw versitygw s3
