//go:build tools

// Package tools pins crane, which builds and pushes OCI images without a container daemon.
package tools

import _ "github.com/google/go-containerregistry/cmd/crane"
