#!/usr/bin/env bash
# Builds helm into .cache/helm/<version>/bin once per version.
here=$(dirname "$0")
exec "$here/../build-go-tool.sh" "$here" helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm helm helm
