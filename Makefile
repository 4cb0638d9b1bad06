# The one entry point: `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
KUBECONFIG_LOCAL := $(CURDIR)/.cluster/kubeconfig

.PHONY: all build test test-node lint unit integration crds check-crds check-dockerfile cluster-up cluster-down node-up node-down image node-images up down check-rules demo bench chaos reliability clean

all: build

build:
	$(CARGO) build --workspace --all-targets

## The integration suites that run Jobs: make test-node runs them on the real node (the kubelet
## runs every copy and remove Job as a Pod of the pushed image, with the mover's real token; the
## real Job controller says how each ended). Nothing else runs a Job: a test of these suites run
## without the node fails at once and says so. Every other suite tests what needs no Pod (API
## validation, claims and Pods' references, Job outcomes the test writes itself as the Job
## controller would) on the plain control plane, which runs no Job controller to race the test.
NODE_SUITES := bad_input chaos copy_end_to_end copy_resume forged_jobs helm_chart hostile_tenant \
	node oci_source operator_process populator quickstart removal staging_store
PLAIN_SUITES := $(filter-out $(NODE_SUITES),$(basename $(notdir $(wildcard tests/*.rs))))

## Everything CI checks: format, lint, the Dockerfile's build, the suites that run Jobs on the
## real node (test-node), then unit tests of every crate and the other integration suites
## against the plain local control plane (cluster-up switches the node off). The workspace's
## binaries are built first: the tests start the operator.
test: lint check-dockerfile test-node cluster-up
	$(CARGO) build --workspace --bins
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(CARGO) test --workspace --lib --bins --examples --benches \
		$(addprefix --test ,$(PLAIN_SUITES)) --no-fail-fast

## The suites that run Jobs, on the real node: the node up, the images from check-dockerfile's
## release binary, then NODE_SUITES with TEMPLATECACHE_JOBS=node (tests/node.rs: the chart
## installed, real copy, consumer, forgery and removal Pods); times each phase.
test-node: check-dockerfile
	NODE_SUITES="$(NODE_SUITES)" hack/test-node.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Regenerate crds/ from the Rust types.
crds:
	$(CARGO) run --quiet -- crd > crds/templatecache.io.yaml
	cp crds/templatecache.io.yaml charts/templatecache-operator/crds/templatecache.io.yaml

## Build the release binary from exactly the files the Dockerfile copies (no container engine).
check-dockerfile:
	hack/image/dockerfile-check.sh

## Start the local control plane (idempotent); writes .cluster/kubeconfig. With NODE=1, a real
## node as well (hack/node.sh: containerd, kubelet, kube-proxy, kube-scheduler, the image
## registry) and the real Job controller: Pods run. Without it, no Job runs.
cluster-up:
	TEMPLATECACHE_NODE=$(NODE) hack/cluster.sh up

## Stop only what cluster-up started, and remove what the node made on the host.
cluster-down:
	hack/cluster.sh down

## The control plane in node mode with the node (same as make cluster-up NODE=1).
node-up:
	TEMPLATECACHE_NODE=1 hack/cluster.sh up

## Stop the node only (the control plane keeps running, in node mode).
node-down:
	hack/node.sh down

## The operator image (release build) and the consumer image, built without a daemon and pushed
## to the node's registry (started if needed); prints the references with their digests.
image:
	hack/image.sh all

## The node up and the images of this checkout in its registry: what every run of Jobs needs.
node-images: node-up image

## The local quickstart on the real node: the control plane in node mode, the images from the
## release binary in the node's registry, the chart installed with helm, and an HTTP server for
## examples/files/ (logs in .cluster/quickstart/). Then: kubectl apply -f examples/local/ (see
## the README's "Try it"). Needs root, as the node does.
up:
	$(CARGO) build --quiet --release --bin templatecache
	hack/quickstart.sh up

## Uninstall what `make up` installed, stop its HTTP server; the control plane only if `make up`
## started it (one that was up without the node is switched back to that).
down:
	hack/quickstart.sh down

## The chart's alert rules: promtool check and unit tests; the dashboard's and alerts' metrics
## against a running operator's /metrics.
check-rules: cluster-up
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(CARGO) test --test monitoring

clean: down cluster-down
	rm -rf .cluster target

## CLOUDSTACK-7539's parallel deployment on the local cluster's real node, with real bytes.
demo: node-images
	.cluster/kubectl --kubeconfig .cluster/kubeconfig apply --server-side -f crds/ -f charts/templatecache-operator/files/flowcontrol.yaml >/dev/null
	.cluster/kubectl --kubeconfig .cluster/kubeconfig wait --for=condition=Established crd/templatecaches.templatecache.io >/dev/null
	$(CARGO) build --quiet --workspace --bins --example demo
	KUBECONFIG=$(KUBECONFIG_LOCAL) TEMPLATECACHE_JOBS=node target/debug/examples/demo

## Benchmarks on the local control plane; the tables go to docs/benchmarks.md, the plots of the
## same run to docs/plots/.
bench: cluster-up
	$(CARGO) build --quiet --release --workspace --bins
	hack/bench-mover.sh
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(CARGO) bench --bench contention
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(CARGO) bench --bench scale
	$(CARGO) bench --bench plots
	{ printf '# Benchmarks\n\n'; for s in mover contention scale; do cat target/bench/$$s.md; echo; done; } > docs/benchmarks.md

## Both chaos runs on the node (operator processes SIGKILLed and API server restarts; copy Pods,
## the kubelet and leader Pods killed) for 10 minutes each instead of make test's 45 s; reports
## in target/chaos/.
chaos: node-images
	$(CARGO) build --quiet --workspace --bins
	KUBECONFIG=$(KUBECONFIG_LOCAL) TEMPLATECACHE_JOBS=node CHAOS_SECONDS=$${CHAOS_SECONDS:-600} \
		$(CARGO) test --test chaos -- --include-ignored --nocapture

## The bad-input corpus and a chaos run, written to docs/reliability.md.
reliability: node-images
	rm -rf target/corpus
	$(CARGO) build --quiet --workspace --bins
	KUBECONFIG=$(KUBECONFIG_LOCAL) TEMPLATECACHE_JOBS=node $(CARGO) test --test api_validation \
		--test bad_input --test helm_chart --test hostile_tenant --test forged_jobs --test removal \
		--test copy_resume --test copy_parallel --test copy_end_to_end -- --include-ignored
	$(MAKE) chaos
	hack/reliability.sh
