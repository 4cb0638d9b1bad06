//go:build tools

// Package tools pins rclone, the multi-stream downloader the mover's benchmark compares against.
package tools

import _ "github.com/rclone/rclone"
