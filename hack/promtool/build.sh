#!/usr/bin/env bash
# Builds promtool into .cache/promtool/<version>/bin once per version.
here=$(dirname "$0")
exec "$here/../build-go-tool.sh" "$here" github.com/prometheus/prometheus github.com/prometheus/prometheus/cmd/promtool promtool promtool
