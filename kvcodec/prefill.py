"""Prefill with attention capture: run the model over prompt[:-1] and, per layer, the attention
that chosen query rows pay to the context — from those rows' query states only, so prefill keeps
its fast attention (sdpa) and no [prompt x prompt] matrix is ever built."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvwire import kernels
from kvwire.kvcodec.prompt import Prompt

_CAPTURE = "kvwire_capture"
_local = threading.local()  # the capture in progress on this thread (daemons prefill on worker threads)


@dataclass
class _Capture:
    rows: torch.Tensor  # [Lq] absolute row positions
    ctx: tuple[int, int]
    per_layer: dict[int, torch.Tensor]


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    cap: _Capture | None = getattr(_local, "capture", None)
    if cap is not None:
        # query: [1, Hq, S, D] after RoPE; key: [1, Hkv, S, D] after RoPE (the whole prefix)
        rows = cap.rows.to(query.device)
        q = query[0].index_select(1, rows)
        cap.per_layer[module.layer_idx] = kernels.q2c_scores(
            q, key[0], rows, cap.ctx[0], cap.ctx[1], scale=module.scaling
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_CAPTURE, _capturing_attention)
AttentionMaskInterface.register(_CAPTURE, sdpa_mask)


@dataclass
class PrefillResult:
    """KV of prompt[:-1] and, if rows were given, attention[layer, context] of those rows."""

    cache: DynamicCache
    attention: torch.Tensor | None

    @property
    def keys(self) -> list[torch.Tensor]:
        return [layer.keys[0] for layer in self.cache.layers]  # each [kv_heads, stream_len, head_dim]

    @property
    def values(self) -> list[torch.Tensor]:
        return [layer.values[0] for layer in self.cache.layers]


@torch.inference_mode()
def prefill(model, prompt: Prompt, rows: torch.Tensor | None = None) -> PrefillResult:
    """Prefill prompt[:-1]; capture the attention of `rows` to the context when rows is given."""
    ids = prompt.tensor(model.device)[:, :-1]
    if rows is None or len(rows) == 0:
        out = model(input_ids=ids, use_cache=True)
        return PrefillResult(out.cache, None)
    previous = model.config._attn_implementation
    _local.capture = _Capture(rows=rows.long(), ctx=(prompt.context_start, prompt.context_end), per_layer={})
    try:
        model.set_attn_implementation(_CAPTURE)
        out = model(input_ids=ids, use_cache=True)
        per_layer = _local.capture.per_layer
    finally:
        model.set_attn_implementation(previous)
        _local.capture = None
    attention = torch.stack([per_layer[i] for i in sorted(per_layer)])
    return PrefillResult(out.cache, attention)
