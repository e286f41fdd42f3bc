# scm-relay developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
# kustomize renders deploy/k8s in the tests; built from the Go module proxy into .tools.
KUSTOMIZE_VERSION := v5.7.1
KUSTOMIZE := $(TOOLS)/bin/kustomize
PROMETHEUS_OPERATOR_VERSION := v0.85.0
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LOCAL := deploy/local-kafka/kafka-local
# Port of the local test broker; a free one is picked when unset.
export SCM_RELAY_KAFKA_PORT ?=

.PHONY: help demo setup lint audit fmt test test-unit test-repo sim bench chaos schemas settings-doc k8s-rules crd-schemas kafka-up kafka-down kafka-status lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# The virtual environment is rebuilt whenever a lock file changes.
$(VENV)/.synced: requirements/dev.lock pyproject.toml | $(UV)
	[ -x $(BIN)/python ] || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --python $(BIN)/python --require-hashes requirements/dev.lock
	$(UV) pip install --quiet --python $(BIN)/python --no-deps --editable .
	touch $@

# The demo needs the runtime packages only (Python and Java, nothing else): the
# lint and test tools of `setup` (kustomize from Go, promtool from apt) are not used.
# `uv pip install` adds to the environment and never removes the dev tools.
$(VENV)/.runtime: requirements/runtime.lock pyproject.toml | $(UV)
	[ -x $(BIN)/python ] || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(BIN)/python --require-hashes -r requirements/runtime.lock
	$(UV) pip install --quiet --python $(BIN)/python --no-deps --editable .
	touch $@

demo: $(VENV)/.runtime ## the whole job locally: Kafka, simulator, relay, sample events, a summary (Python and Java only)
	$(BIN)/scm-relay demo

# promtool (Debian's prometheus package) checks and tests the alert rules.
/usr/bin/promtool:
	@echo "installing Debian's prometheus package for promtool"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null

$(KUSTOMIZE):
	@command -v go >/dev/null || { echo "Go is needed once to build kustomize $(KUSTOMIZE_VERSION)"; exit 1; }
	GOBIN=$(abspath $(TOOLS))/bin GOFLAGS=-mod=mod go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

setup: $(VENV)/.synced /usr/bin/promtool $(KUSTOMIZE) ## create .venv from the lock files, install promtool and kustomize (idempotent)

lock: | $(UV) ## re-resolve requirements/*.lock from pyproject.toml
	$(UV) pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 -q -o requirements/runtime.lock
	$(UV) pip compile pyproject.toml --group dev --generate-hashes --universal --python-version 3.11 -q -o requirements/dev.lock
	$(UV) pip compile requirements/build.in --generate-hashes --universal --python-version 3.11 -q -o requirements/build.lock

schemas: setup ## regenerate schemas/*.schema.json from the models
	$(BIN)/python -m devkit.schemas write schemas

settings-doc: setup ## regenerate docs/settings.md from the Settings class
	$(BIN)/python -m devkit.settings_reference > docs/settings.md

k8s-rules: setup ## regenerate the PrometheusRule in deploy/k8s from deploy/prometheus/alerts.yml
	$(BIN)/python deploy/k8s/prometheusrule.py > deploy/k8s/base/prometheusrule.yaml

crd-schemas: setup ## re-vendor the ServiceMonitor/PrometheusRule CRD schemas the k8s tests use
	dir=$$(go mod download -json github.com/prometheus-operator/prometheus-operator@$(PROMETHEUS_OPERATOR_VERSION) \
	  | $(BIN)/python -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'); \
	  $(BIN)/python tests/k8s_schemas/vendor.py "$$dir" $(PROMETHEUS_OPERATOR_VERSION); \
	  cp "$$dir/LICENSE" tests/k8s_schemas/LICENSE-prometheus-operator

lint: setup ## ruff (lint + format check), mypy --strict, hadolint, promtool on the alert rules
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	cd deploy/prometheus && promtool check rules alerts.yml && promtool test rules alerts.test.yml

# pip-audit on the runtime lock (PyPI's vulnerability data); accepted findings, each with
# a reason and an expiry, in requirements/audit-accepted.toml. It fails, saying so,
# when it cannot read the data for a package (the script exits 3; make reports 2).
audit: $(VENV)/.synced ## the runtime lock against known vulnerabilities (fails if it cannot check)
	$(BIN)/python requirements/audit.py

fmt: setup ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-unit: setup ## the pure unit tests only (no broker)
	$(BIN)/pytest tests/unit

test-repo: setup ## the tests of the repository's other files that need no broker (Dockerfile, deploy/, wheel, schemas/, the simulation)
	$(BIN)/pytest tests/repository -m "not kafka"

# Lint, then the whole suite against a broker this target starts and always stops.
test: lint ## lint + every test against a freshly started local Kafka broker
	$(KAFKA_LOCAL) start
	trap '$(KAFKA_LOCAL) stop' EXIT; \
	  SCM_RELAY_TEST_KAFKA=$$($(KAFKA_LOCAL) address) $(BIN)/pytest || { \
	    rc=$$?; echo "--- tail of the Kafka broker log ---"; $(KAFKA_LOCAL) logs 60; exit $$rc; }

# The deterministic simulation (sim): SEEDS histories from START, or one SEED with its
# history when HISTORY is set. No broker: Kafka and the API are in memory.
SEEDS ?= 200
START ?= 0
sim: setup ## the deterministic simulation: make sim SEEDS=N [START=S], or make sim SEED=S [HISTORY=1]
	@if [ -n "$(SEED)" ]; then \
	  $(BIN)/python -m sim --seed $(SEED) $(if $(HISTORY),--history,); \
	else \
	  $(BIN)/python -m sim --seeds $(SEEDS) --start $(START); \
	fi

# The benchmarks start a broker of their own (bench/.run) and write docs/benchmarks.md.
# Both parts always run and record what they measured; either failing fails the target.
CHAOS_SEEDS ?= 10000
chaos: setup ## the fault suite (about 30 minutes, a broker of its own) and CHAOS_SEEDS (10 000) seeds of the simulation (about an hour); writes docs/reliability.md
	rc=0; \
	  $(BIN)/python -m chaos.run --write docs/reliability.md || rc=1; \
	  $(BIN)/python -m sim --seeds $(CHAOS_SEEDS) --write docs/reliability.md || rc=1; \
	  exit $$rc

bench: setup ## run every benchmark (about 15 minutes) and write docs/benchmarks.md
	$(BIN)/python -m bench.run_all

kafka-up: ## start the local broker (prints its address)
	$(KAFKA_LOCAL) start
	@$(KAFKA_LOCAL) address

kafka-down: ## stop the local broker and delete its data
	$(KAFKA_LOCAL) stop

kafka-status: ## is the local broker running?
	$(KAFKA_LOCAL) status

clean: kafka-down ## remove the virtual environments and caches (keeps the jar cache)
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache .hypothesis dist build
