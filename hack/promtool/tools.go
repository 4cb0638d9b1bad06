//go:build tools

// Package tools pins the promtool that checks and unit-tests the chart's alert rules.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
