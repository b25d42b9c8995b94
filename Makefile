# PayMesh front door. Every target builds .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed-stamp
PROTO_FILES = $(shell find protos -name '*.proto' | sort)
BREAKING_AGAINST ?= .git\#branch=main

.DEFAULT_GOAL := help
.PHONY: help venv gen gen-check lint typecheck unit test run breaking bench chaos status migrate k8s image clean

help:
	@echo "make run        start all eleven services (Ctrl-C stops them)"
	@echo "make test       lint, types, gen freshness, then every test (what CI runs)"
	@echo "make gen        regenerate gen/ from protos/"
	@echo "make lint       ruff, buf lint, buf format"
	@echo "make breaking   buf breaking against BREAKING_AGAINST (default: main)"
	@echo "make bench      benchmarks, printed as ratios"
	@echo "make chaos      fault injection against the running mesh"
	@echo "make status     one table of every service and edge (ARGS=--json, ARGS=--watch)"
	@echo "make migrate    apply every service's schema migrations to its configured database"
	@echo "make k8s        regenerate deploy/k8s/ (kustomize base, production overlay) from the topology"
	@echo "make image      build the image deploy/k8s runs (CONTAINER=podman, or docker)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# gen/ is produced only here. protoc-gen-mypy* come from mypy-protobuf in the venv.
define run_protoc
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(1) --grpc_python_out=$(1) --mypy_out=quiet:$(1) --mypy_grpc_out=quiet:$(1) \
	  $(PROTO_FILES:protos/%=%)
endef

gen: $(STAMP)
	rm -rf gen/paymesh
	mkdir -p gen
	$(call run_protoc,gen)

gen-check: $(STAMP)
	@tmp=$$(mktemp -d); $(call run_protoc,$$tmp) && \
	  if diff -r -x __pycache__ $$tmp/paymesh gen/paymesh >/dev/null; then echo "gen/ is fresh"; rm -rf $$tmp; \
	  else diff -r -x __pycache__ $$tmp/paymesh gen/paymesh | head -20; rm -rf $$tmp; \
	       echo "gen/ is stale: run 'make gen' and commit the result"; exit 1; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

typecheck: $(STAMP)
	$(BIN)/mypy interceptors services tests bench

breaking: $(STAMP)
	$(BIN)/buf breaking --against '$(BREAKING_AGAINST)'

test: lint typecheck gen-check
	$(BIN)/pytest -q

run: $(STAMP)
	@$(PY) -m services.tools.launcher

status: $(STAMP)
	@$(PY) -m services.tools.status $(ARGS)

migrate: $(STAMP)
	@$(PY) -m services.tools.migrate

bench: $(STAMP)
	$(PY) -m bench

chaos: $(STAMP)
	$(PY) -m tests.chaos

k8s: $(STAMP)
	$(PY) -m services.tools.k8s_manifests

CONTAINER ?= podman
image: $(STAMP)
	$(CONTAINER) build -f Containerfile \
	  -t "$$($(PY) -c 'from services.tools.k8s_manifests import image; print(image())')" .

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
