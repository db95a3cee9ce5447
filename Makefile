# Keybrake. `make demo` replays the 2am incident; `make test` is what CI runs.
# Every target installs or builds what it needs; heavy Go-built tools are cached under
# $(KEYBRAKE_CACHE) (default ~/.cache/keybrake), keyed by version.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
export KEYBRAKE_CACHE ?= $(HOME)/.cache/keybrake
CARGO ?= cargo

.PHONY: all build release test lint fmt crds crd-check test-unit test-e2e test-rules test-sdk \
        test-chart test-demo e2e-deps cluster cluster-down demo bench manifests chart clean

all: build

build:
	$(CARGO) build --workspace --all-targets

release:
	$(CARGO) build --release --workspace --bins

## test: everything CI checks. Benchmarks are not part of it.
test: lint crd-check test-unit test-rules test-sdk test-e2e test-chart test-demo
	@echo "make test: all checks passed"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## crds: regenerate crds/ from the Rust types.
crds:
	$(CARGO) run -q -p keybrake-api --bin crdgen -- crds/vaultkey.yaml

crd-check:
	@mkdir -p target
	@$(CARGO) run -q -p keybrake-api --bin crdgen -- target/vaultkey.generated.yaml
	@diff -u crds/vaultkey.yaml target/vaultkey.generated.yaml \
	  || { echo "crds/vaultkey.yaml is stale: run 'make crds' and commit it"; exit 1; }

## test-unit: unit and component tests (real PostgreSQL for the audit sink).
test-unit: e2e-deps
	scripts/with-postgres.sh $(CARGO) test --workspace --exclude keybrake-e2e

## e2e-deps: build (once, cached) etcd, kube-apiserver, kubectl and helm from Go modules.
e2e-deps:
	e2e/scripts/build-k8s.sh all

test-e2e: e2e-deps
	$(CARGO) build --workspace --bins
	$(CARGO) test -p keybrake-e2e -- --test-threads=2 --show-output

## cluster: start a local kube-apiserver + etcd and leave it running (see target/e2e/env).
cluster: e2e-deps
	e2e/scripts/cluster.sh up

cluster-down:
	e2e/scripts/cluster.sh down

test-rules:
	scripts/test-rules.sh

test-sdk:
	scripts/test-sdk.sh

test-chart: e2e-deps
	scripts/test-chart.sh

manifests:
	scripts/render-manifests.sh

demo:
	scripts/demo.sh

## test-demo: `make demo` as a smoke test (shorter agent loop), so the demo cannot rot.
test-demo:
	DEMO_FAST=1 scripts/demo.sh

bench:
	bench/run.sh

clean:
	$(CARGO) clean
