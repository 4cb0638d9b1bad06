//go:build tools

// Package tools pins the OCI registry the data mover's OCI tests pull from.
package tools

import _ "github.com/distribution/distribution/v3/cmd/registry"
