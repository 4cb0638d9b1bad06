#!/usr/bin/env bash
# Builds rclone into .cache/rclone/<version>/bin once per version (the benchmark's 8-stream row).
here=$(dirname "$0")
exec "$here/../build-go-tool.sh" "$here" github.com/rclone/rclone github.com/rclone/rclone rclone rclone
