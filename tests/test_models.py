"""Model loading: local folders, dtypes, the embedded model, and clear errors for what cannot load."""

import pytest
import torch

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.fingerprint import geometry_mismatch, kv_geometry, tokenizer_fingerprint
from kvwire.kvcodec.models import cache_dir, embedded_model_dir, load_model
from kvwire.kvcodec.prefill import CAPTURE_ATTENTION


@pytest.mark.parametrize(
    "dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_local_folder_in_each_dtype(tiny_model_dir, dtype, torch_dtype):
    loaded = load_model(tiny_model_dir, dtype=dtype)
    assert loaded.dtype == torch_dtype and loaded.device.type == "cpu"
    # sdpa with kvwire's attention capture installed once at load (kvcodec/prefill.py), never eager
    assert loaded.model.config._attn_implementation == CAPTURE_ATTENTION


def test_missing_folder_and_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="does not exist"):
        load_model("/no/such/model")
    with pytest.raises(ConfigError, match="as a local folder or hub id"):
        load_model("nobody-kvwire/no-such-model")
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        load_model("/no/such/model", dtype="fp8")


def test_embedded_model_geometry(embedded_loaded):
    geo = kv_geometry(embedded_loaded.model)
    assert (geo["num_layers"], geo["kv_heads"], geo["head_dim"]) == (30, 3, 64)
    assert embedded_model_dir().is_dir()
    assert embedded_loaded.tokenizer.eos_token == "<|im_end|>"


def test_fingerprints_tell_models_apart(tiny_loaded, tiny_other_geometry_dir, tiny_model_dir_no_template):
    other = load_model(tiny_other_geometry_dir)
    diffs = geometry_mismatch(kv_geometry(tiny_loaded.model), kv_geometry(other.model))
    assert any(d.startswith("num_layers: stream has 3, this model has 4") for d in diffs)
    assert tokenizer_fingerprint(other.tokenizer) == tokenizer_fingerprint(tiny_loaded.tokenizer)
    plain = load_model(tiny_model_dir_no_template)
    assert tokenizer_fingerprint(plain.tokenizer) != tokenizer_fingerprint(tiny_loaded.tokenizer)


def test_cache_folder_argument_then_environment_read_per_call(tmp_path, monkeypatch):
    monkeypatch.setenv("KVWIRE_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"  # read when asked, not when kvwire was imported
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("KVWIRE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kvwire"
