# scm-relay developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LOCAL := deploy/local-kafka/kafka-local
# Port of the local test broker; a free one is picked when unset.
export SCM_RELAY_KAFKA_PORT ?=

.PHONY: help demo setup lint fmt test test-unit schemas settings-doc kafka-up kafka-down kafka-status lock clean

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

demo: setup ## the whole job locally: Kafka, simulator, relay, sample events, a summary
	$(BIN)/scm-relay demo

# promtool (Debian's prometheus package) checks and tests the alert rules.
/usr/bin/promtool:
	@echo "installing Debian's prometheus package for promtool"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null

setup: $(VENV)/.synced /usr/bin/promtool ## create .venv from the lock files, install promtool (idempotent)

lock: | $(UV) ## re-resolve requirements/*.lock from pyproject.toml
	$(UV) pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 -q -o requirements/runtime.lock
	$(UV) pip compile pyproject.toml --group dev --generate-hashes --universal --python-version 3.11 -q -o requirements/dev.lock

schemas: setup ## regenerate schemas/*.schema.json from the models
	$(BIN)/python -m service.schemas write schemas

settings-doc: setup ## regenerate docs/settings.md from the Settings class
	$(BIN)/python -m service.settings_reference > docs/settings.md

lint: setup ## ruff (lint + format check), mypy --strict, hadolint, promtool on the alert rules
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	cd deploy/prometheus && promtool check rules alerts.yml && promtool test rules alerts.test.yml

fmt: setup ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-unit: setup ## the pure unit tests only (no broker)
	$(BIN)/pytest tests/unit

# Lint, then the whole suite against a broker this target starts and always stops.
test: lint ## lint + every test against a freshly started local Kafka broker
	$(KAFKA_LOCAL) start
	trap '$(KAFKA_LOCAL) stop' EXIT; \
	  SCM_RELAY_TEST_KAFKA=$$($(KAFKA_LOCAL) address) $(BIN)/pytest || { \
	    rc=$$?; echo "--- tail of the Kafka broker log ---"; $(KAFKA_LOCAL) logs 60; exit $$rc; }

kafka-up: ## start the local broker (prints its address)
	$(KAFKA_LOCAL) start
	@$(KAFKA_LOCAL) address

kafka-down: ## stop the local broker and delete its data
	$(KAFKA_LOCAL) stop

kafka-status: ## is the local broker running?
	$(KAFKA_LOCAL) status

clean: kafka-down ## remove the virtual environments and caches (keeps the jar cache)
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache .hypothesis dist build
