# Omniva: `make run` serves everything, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
# The gRPC service's code, generated from its .proto: the path under protos/ is the
# Python package it lands in (grpc_services.generated, git-ignored; docs/grpc.md).
GRPC_PROTO := protos/grpc_services/generated/orchestrator.proto
GRPC_CODE := grpc_services/generated/orchestrator_pb2_grpc.py

.PHONY: install run test lint bench schema grpc

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(GRPC_CODE): $(GRPC_PROTO) $(STAMP)
	$(BIN)/python -m jobs.grpc.codegen

grpc: $(GRPC_CODE)

install: $(STAMP) $(GRPC_CODE)

run: install
	$(BIN)/python manage.py serve

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

schema: install
	$(BIN)/python manage.py spectacular --validate --fail-on-warn --file /dev/null

bench: install
	$(BIN)/python manage.py bench
