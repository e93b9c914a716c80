"""Prefill with attention capture: run the model over prompt[:-1] and, per layer, the attention
that chosen query rows pay to the context — from those rows' query states only, so prefill keeps
its fast attention (sdpa) and no [prompt x prompt] matrix is ever built.

The capture attention function is installed once per model (`install_capture`, called by
load_model; lazily by the first capturing prefill otherwise) and stays installed: without a
capture in progress it is plain sdpa. What one prefill captures (its rows, where results go)
lives in a ContextVar, so prefills on one model in several threads never see each other's
capture and nothing global is switched per call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvwire import kernels
from kvwire.kvcodec.cache import head_padding_mask
from kvwire.kvcodec.errors import ConfigError, KVWireError
from kvwire.kvcodec.prompt import Prompt

CAPTURE_ATTENTION = "kvwire_capture"  # the attention implementation name a model runs under once installed


@dataclass
class _Capture:
    """q2c-style capture: the attention chosen rows pay to the context, summed over rows and query heads."""

    rows: torch.Tensor  # [Lq] absolute row positions, all inside this forward pass's positions
    ctx: tuple[int, int]
    per_layer: dict[int, torch.Tensor]
    offset: int = 0  # absolute position of this forward pass's first query (a cached prefix's length)

    def record(self, module, query: torch.Tensor, key: torch.Tensor) -> None:
        # query: [1, Hq, S, D] after RoPE, positions offset..offset+S-1; key: [1, Hkv, offset+S, D]
        # after RoPE (a cached prefix's keys, then this pass's)
        rows = self.rows.to(query.device)
        q = query[0].index_select(1, rows - self.offset)
        self.per_layer[module.layer_idx] = kernels.q2c_scores(
            q, key[0], rows, self.ctx[0], self.ctx[1], scale=module.scaling
        )


@dataclass
class _HeadMaxCapture:
    """KVzip-style capture: per KV head, the largest attention any query of this pass (and any query head
    of the head's group) pays to each position of `span`. Softmax over the first `sink` positions, the
    span and this pass's own positions (causal), as KVzip scores a reconstruction chunk."""

    span: tuple[int, int]
    sink: int
    offset: int
    per_layer: dict[int, torch.Tensor]

    def record(self, module, query: torch.Tensor, key: torch.Tensor) -> None:
        start, end = self.span
        q = query[0].float()  # [Hq, S, D]
        hq, s, _ = q.shape
        k = key[0].float()  # [Hkv, offset+S, D]
        hkv = k.shape[0]
        cols = torch.cat([k[:, : self.sink], k[:, start:end], k[:, self.offset :]], dim=1)
        cols = cols.repeat_interleave(hq // hkv, dim=0)  # query head i reads KV head i // group
        logits = torch.matmul(q, cols.transpose(1, 2)) * module.scaling  # [Hq, S, sink + span + S]
        own = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)  # a row sees its pass only up to itself
        logits[:, :, -s:].masked_fill_(own, float("-inf"))
        weights = torch.softmax(logits, dim=-1)[:, :, self.sink : self.sink + end - start]
        self.per_layer[module.layer_idx] = weights.view(hkv, hq // hkv, s, end - start).amax(dim=(1, 2))


# the capture of the prefill running in this context (thread or task); None outside a capturing prefill
_capture: ContextVar[_Capture | _HeadMaxCapture | None] = ContextVar("kvwire_capture", default=None)
# whether the caller of the forward pass running in this context has gone (checked before every layer)
_cancelled: ContextVar[Callable[[], bool] | None] = ContextVar("kvwire_cancelled", default=None)


class PrefillCancelled(KVWireError):
    """The caller went away while its forward pass ran: it stopped between two layers."""


@contextmanager
def stop_when(cancelled: Callable[[], bool]):
    """Forward passes run in this context stop (PrefillCancelled) at the next layer once `cancelled()` is
    true, so a cancelled request frees the model within one layer's time instead of the whole pass's.
    Works on models running the capture attention function (installed by load_model)."""
    token = _cancelled.set(cancelled)
    try:
        yield
    finally:
        _cancelled.reset(token)


_install_lock = threading.Lock()


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    cancelled = _cancelled.get()
    if cancelled is not None and cancelled():
        raise PrefillCancelled(f"the caller left: the forward pass stopped at layer {module.layer_idx}")
    cap = _capture.get()
    if cap is not None:
        cap.record(module, query, key)
    attention_mask = head_padding_mask(module.layer_idx, query, key, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_ATTENTION, _capturing_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


def install_capture(model) -> None:
    """Make `model` run the capture attention function (sdpa plus capture when one is in progress).
    Idempotent; ConfigError for a model whose attention cannot be swapped."""
    with _install_lock:
        if model.config._attn_implementation == CAPTURE_ATTENTION:
            return
        model.set_attn_implementation(CAPTURE_ATTENTION)
        if model.config._attn_implementation != CAPTURE_ATTENTION:  # transformers only warns
            raise ConfigError(
                f"{type(model).__name__} does not use transformers' AttentionInterface: "
                "kvwire cannot capture its attention"
            )


@dataclass
class PrefillResult:
    """KV of prompt[:-1] and, if rows were given, attention[layer, context] of those rows."""

    cache: DynamicCache
    attention: torch.Tensor | None
    rows: torch.Tensor | None = None  # the rows `attention` was captured for (CPU, long)
    # from a prefix cache: the prefix entry's memo of question-agnostic selector scores (PrefixEntry.scores)
    prefix_scores: dict | None = None

    @property
    def keys(self) -> list[torch.Tensor]:
        return [layer.keys[0] for layer in self.cache.layers]  # each [kv_heads, stream_len, head_dim]

    @property
    def values(self) -> list[torch.Tensor]:
        return [layer.values[0] for layer in self.cache.layers]


@torch.inference_mode()
def prefill(model, prompt: Prompt, rows: torch.Tensor | None = None) -> PrefillResult:
    """Prefill prompt[:-1]; capture the attention of `rows` to the context when rows is given."""
    return prefill_from(model, prompt, None, rows)


@torch.inference_mode()
def prefill_from(
    model,
    prompt: Prompt,
    prefix: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
    rows: torch.Tensor | None = None,
) -> PrefillResult:
    """Prefill prompt[:-1] on top of the KV of its first P positions (`prefix`: keys and values per
    layer, each [kv_heads, P, head_dim]; None: P = 0), so only positions P.. run through the model.

    rows: absolute rows whose attention to the context to capture; they must lie at P or later (the
    attention of rows inside a prefix is fixed once the prefix is, and its owner keeps it). The
    result's cache holds all stream positions; the prefix tensors are shared, not copied or changed.
    """
    start = 0 if prefix is None else prefix[0][0].shape[1]
    if not 0 <= start < prompt.stream_len:
        raise ValueError(f"a prefix of {start} positions leaves nothing to prefill of {prompt.stream_len}")
    ids = prompt.tensor(model.device)[:, start:-1]
    kwargs = {"input_ids": ids, "use_cache": True}
    if prefix is not None:
        # a fresh cache object over the prefix tensors: update() concatenates into new tensors
        kwargs["cache"] = DynamicCache([(k[None], v[None]) for k, v in zip(*prefix, strict=True)])
        kwargs["position_ids"] = torch.arange(start, prompt.stream_len, device=model.device)[None]
    if rows is None or len(rows) == 0:
        return PrefillResult(model(**kwargs).cache, None)
    rows = rows.long().cpu()
    if int(rows.min()) < start:
        raise ValueError(f"rows before position {start} lie inside the prefix: their attention is the prefix's")
    install_capture(model)
    cap = _Capture(rows=rows, ctx=(prompt.context_start, prompt.context_end), per_layer={}, offset=start)
    token = _capture.set(cap)
    try:
        out = model(**kwargs)
    finally:
        _capture.reset(token)
    attention = torch.stack([cap.per_layer[i] for i in sorted(cap.per_layer)])
    return PrefillResult(out.cache, attention, rows)


@torch.inference_mode()
def head_max_attention(
    model,
    prefix: tuple[list[torch.Tensor], list[torch.Tensor]],
    ids: list[int],
    span: tuple[int, int],
    sink: int = 0,
) -> torch.Tensor:
    """Run `ids` on top of the KV of P positions (`prefix`: keys and values per layer, each
    [kv_heads, P, head_dim]; the new ids sit at positions P..) and return, per layer and KV head, the
    largest attention any of the new rows pays to each position of `span` (inside the prefix):
    [layers, kv_heads, span_end - span_start] fp32. The softmax runs over the first `sink` positions,
    the span and the new rows themselves (see _HeadMaxCapture). The prefix tensors are not changed and
    the new rows' KV is dropped: one call costs one forward pass over `ids`."""
    start = prefix[0][0].shape[1]
    if not 0 <= span[0] < span[1] <= start:
        raise ValueError(f"span {span} does not lie inside the {start}-position prefix")
    install_capture(model)
    cache = DynamicCache([(k[None], v[None]) for k, v in zip(*prefix, strict=True)])
    positions = torch.arange(start, start + len(ids), device=model.device)[None]
    cap = _HeadMaxCapture(span=span, sink=min(sink, span[0]), offset=start, per_layer={})
    token = _capture.set(cap)
    try:
        ids_t = torch.tensor([ids], dtype=torch.long, device=model.device)
        model(input_ids=ids_t, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    finally:
        _capture.reset(token)
    return torch.stack([cap.per_layer[i] for i in sorted(cap.per_layer)]).cpu()
