# vmm-control-plane: `make run` starts a local control plane, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEBS := etcd-server qemu-system-x86 busybox-static lz4 cpio gcc binutils libc6-dev python3-venv
GUEST_DIR := var/guests

.PHONY: run test bench proto proto-check docs lint buf-lint guest deps venv clean

run: deps venv guest
	$(PY) -m tools.fleet.local_run

test: deps venv guest buf-lint
	$(PY) -m pytest -q

bench: deps venv guest
	$(PY) -m tools.bench

proto: venv
	$(PY) -m tools.codegen.proto

proto-check: venv
	$(PY) -m tools.codegen.proto --check

# docs/backends.md, the support matrix generated from the runtimes' capability data.
docs: venv
	$(PY) -m tools.codegen.backend_docs

guest: venv
	$(PY) -m tools.guests --cache $(GUEST_DIR)

lint: venv buf-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

buf-lint: node_modules/.bin/buf
	node_modules/.bin/buf lint proto

node_modules/.bin/buf: package.json
	npm ci --no-audit --no-fund --silent
	touch $@

# System packages, installed only when missing (a fresh Debian machine as root). Node.js
# may come from elsewhere than Debian: only its commands are required.
deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$(echo $$missing)" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) var build *.egg-info node_modules
