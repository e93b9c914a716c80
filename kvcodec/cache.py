"""Cache assembly: decoded KV -> a DynamicCache in the model's dtype and device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

if TYPE_CHECKING:
    from kvwire.kvcodec.stream import DecodedKV


def build_cache(
    decoded: DecodedKV, dtype: torch.dtype | None = None, device=None, prefix: DynamicCache | None = None
) -> tuple[DynamicCache, int]:
    """A DynamicCache holding the kept positions in ascending order, and the absolute position id of
    the next token (the last prompt token, which the receiver feeds itself). prefix: a cache of the
    positions before every kept one (the cloud's template KV), put first."""
    pairs = []
    for layer, (k, v) in enumerate(zip(decoded.keys, decoded.values)):
        k = k.to(dtype=dtype or k.dtype, device=device or k.device)
        v = v.to(dtype=dtype or v.dtype, device=device or v.device)
        if prefix is not None:
            k = torch.cat([prefix.layers[layer].keys.to(k), k], dim=2)
            v = torch.cat([prefix.layers[layer].values.to(v), v], dim=2)
        pairs.append((k, v))
    return DynamicCache(pairs), decoded.header.prompt_len - 1
