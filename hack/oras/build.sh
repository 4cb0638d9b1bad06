#!/usr/bin/env bash
# Builds the oras CLI into .cache/oras/<version>/bin once per version.
here=$(dirname "$0")
exec "$here/../build-go-tool.sh" "$here" oras.land/oras oras.land/oras/cmd/oras oras oras
