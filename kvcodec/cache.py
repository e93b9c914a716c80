"""Cache assembly: decoded KV -> a DynamicCache in the model's dtype and device; per-head position sets
-> a padded cache whose padding the attention function masks out per head."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
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


@dataclass(frozen=True)
class HeadPadding:
    """Which entries of a padded per-head cache are real: per layer [kv_heads, padded_len] bool (True: a
    kept position; False: padding that must receive no attention). Entries appended after assembly (the
    tokens generated on the cache) are real in every head."""

    valid: tuple[torch.Tensor, ...]

    @property
    def kept(self) -> list[list[int]]:
        """Real entries per layer and head."""
        return [v.sum(dim=1).tolist() for v in self.valid]


def build_head_cache(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    positions: Sequence[Sequence[torch.Tensor]],
    dtype: torch.dtype | None = None,
    device=None,
) -> tuple[DynamicCache, HeadPadding]:
    """A cache where each (layer, KV head) holds its own positions: keys[l], values[l] are [kv_heads,
    stream_len, head_dim] (after RoPE, so order in the cache does not matter), positions[l][h] the
    positions head h of layer l keeps. Each layer is padded to its largest head with zeros; generate on
    it inside `padded_heads(padding)` so that attention gives the padding exactly zero weight. Absolute
    position ids as for a one-set cache: the next token sits at the prompt's last position."""
    pairs, valid = [], []
    for k, v, heads in zip(keys, values, positions, strict=True):
        if len(heads) != k.shape[0]:
            raise ValueError(f"{len(heads)} position sets for {k.shape[0]} KV heads")
        width = max(len(p) for p in heads)
        kk = k.new_zeros(k.shape[0], width, k.shape[2])
        vv = v.new_zeros(v.shape[0], width, v.shape[2])
        real = torch.zeros(k.shape[0], width, dtype=torch.bool)
        for h, pos in enumerate(heads):
            pos = pos.long().to(k.device)
            kk[h, : len(pos)], vv[h, : len(pos)], real[h, : len(pos)] = k[h, pos], v[h, pos], True
        pairs.append(
            (
                kk[None].to(dtype=dtype or k.dtype, device=device or k.device),
                vv[None].to(dtype=dtype or v.dtype, device=device or v.device),
            )
        )
        valid.append(real.to(device or k.device))
    return DynamicCache(pairs), HeadPadding(tuple(valid))


# the padding of the per-head cache that forward passes in this context (thread or task) run on
_padding: ContextVar[HeadPadding | None] = ContextVar("kvwire_head_padding", default=None)


@contextmanager
def padded_heads(padding: HeadPadding | None):
    """Forward passes run in this context attend on a cache from build_head_cache with `padding`
    masked out per head (models running kvwire's attention function, which load_model installs).
    None: a one-set cache, nothing masked."""
    token = _padding.set(padding)
    try:
        yield
    finally:
        _padding.reset(token)


def head_padding_mask(layer_idx: int, query: torch.Tensor, key: torch.Tensor, attention_mask):
    """The attention mask for one layer's forward pass: `attention_mask` unchanged outside
    `padded_heads`; inside, a boolean [1, q_heads, q_len, key_len] mask that hides each head's padding
    and keeps this pass's rows causal (one sequence, no padded inputs: what generation on a per-head
    cache runs). The model's own mask is not used there: it is sized for layer 0's cache, and layers of
    a per-head cache may differ in length."""
    padding = _padding.get()
    if padding is None:
        return attention_mask
    real = padding.valid[layer_idx].to(key.device)  # [kv_heads, padded_len]
    q_heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    new = k_len - real.shape[1]  # entries appended since assembly: this pass's and earlier generated ones
    if new < q_len:
        raise RuntimeError(f"layer {layer_idx}: {k_len} keys for a padded cache of {real.shape[1]} and {q_len} rows")
    cols = torch.cat([real, real.new_ones(real.shape[0], new)], dim=1)
    cols = cols.repeat_interleave(q_heads // real.shape[0], dim=0)  # query head i reads KV head i // group
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=key.device).tril(k_len - q_len)
    return cols[None, :, None, :] & causal[None, None]
