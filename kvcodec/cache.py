"""Cache assembly: decoded KV -> a DynamicCache in the model's dtype and device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

if TYPE_CHECKING:
    from kvwire.kvcodec.stream import DecodedKV


def build_cache(decoded: DecodedKV, dtype: torch.dtype | None = None, device=None) -> tuple[DynamicCache, int]:
    """A DynamicCache holding the kept positions in ascending order, and the absolute position id of
    the next token (the last prompt token, which the receiver feeds itself)."""
    pairs = []
    for k, v in zip(decoded.keys, decoded.values):
        pairs.append(
            (
                k.to(dtype=dtype or k.dtype, device=device or k.device),
                v.to(dtype=dtype or v.dtype, device=device or v.device),
            )
        )
    return DynamicCache(pairs), decoded.header.prompt_len - 1
