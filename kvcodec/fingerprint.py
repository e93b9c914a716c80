"""Fingerprints: KV geometry and tokenizer identity, so a receiver refuses KV it cannot use."""

from __future__ import annotations

import hashlib
import json


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def kv_geometry(model) -> dict:
    """The facts two models must share for one's KV cache to be valid in the other."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    return {
        "num_layers": int(cfg.num_hidden_layers),
        "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "rope": {k: v for k, v in sorted(dict(rope).items())},
    }


def model_fingerprint(model) -> str:
    """Identifies the weights too (not only the shapes): config plus a sample of the first layer."""
    import torch

    params = dict(model.named_parameters())
    probe = next(iter(params.values()))
    with torch.no_grad():
        sample = [float(x) for x in probe.detach().flatten()[:64].float().cpu()]
    return _digest(
        {"config": model.config.to_dict().get("architectures"), "geometry": kv_geometry(model), "sample": sample}
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, the special tokens and the chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return _digest(
        {
            "vocab": vocab,
            "special": sorted(map(str, tokenizer.all_special_tokens)),
            "template": getattr(tokenizer, "chat_template", None),
        }
    )


def ids_digest(ids) -> str:
    """16 hex digits of SHA-256 over token ids (each as 8 little-endian bytes): names a template prefix
    in a stream header, so a receiver checks it holds the same prefix before using its own KV of it."""
    h = hashlib.sha256()
    for i in ids:
        h.update(int(i).to_bytes(8, "little"))
    return h.hexdigest()[:16]


def geometry_mismatch(expected: dict, got: dict) -> list[str]:
    """Human-readable differences between the receiver's geometry (expected) and a stream's (got)."""
    diffs = []
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            diffs.append(f"{key}: stream has {got.get(key)!r}, this model has {expected.get(key)!r}")
    return diffs
