//go:build tools

// Package tools pins the oras CLI the OCI tests push artifacts with.
package tools

import _ "oras.land/oras/cmd/oras"
