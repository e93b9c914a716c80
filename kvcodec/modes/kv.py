"""kv: the edge streams the quantized KV of the kept positions; the cloud injects it and generates.

A header may leave the fixed segments to the cloud (docs/codec.md, "Fixed positions"): with template
"cloud" the cloud puts its own cached KV of the template prefix first, with question "cloud" it
prefills the question and template suffix itself on top of the injected context KV.
"""

from __future__ import annotations

import time

import torch

from kvwire.kvcodec.cache import build_cache, build_head_cache, padded_heads
from kvwire.kvcodec.generate import GREEDY
from kvwire.kvcodec.modes.base import Mode


class KVMode(Mode):
    name = "kv"
    description = "quantized KV of the kept positions from the edge (the cloud's model needs the same KV geometry)"
    carries_kv = True

    def answer(self, cloud, received, max_new_tokens, timings=None, options=None, decoding=GREEDY):
        h = received.header
        cache, padding = self.cache_and_padding(cloud, received, timings)
        with padded_heads(padding):
            return cloud.generate(
                cache, None, h.context_span, max_new_tokens, self.name, timings, received, decoding=decoding
            )

    def cache(self, cloud, received, timings=None):
        """The cache generation starts from, for a one-set stream (cache_and_padding for any stream)."""
        if received.head_slots is not None:
            raise ValueError("a per-head stream's cache is read inside padded_heads: use cache_and_padding")
        return self.cache_and_padding(cloud, received, timings)[0]

    @staticmethod
    def cache_and_padding(cloud, received, timings=None) -> tuple:
        """The cache generation starts from: the cloud's template KV (when the header leaves it to the cloud),
        the injected KV, and the question prefilled on top (when it is the cloud's); and for a per-head
        stream the padding to mask (forward passes on the cache run inside padded_heads(padding)), else None."""
        h = received.header
        t = time.perf_counter()
        padding = None
        if received.head_slots is None:
            cache, _ = build_cache(received, cloud.loaded.dtype, cloud.loaded.device, cloud.template_cache(h))
        else:
            cache, padding = _head_cache(cloud, received)
        if timings is not None:
            timings.add("inject", time.perf_counter() - t)
        t = time.perf_counter()
        with padded_heads(padding):  # the question, when it is the cloud's
            cache = cloud.extend(cache, h, range(h.tail_start, h.n_prompt - 1))
        if timings is not None and h.question == "cloud":
            timings.add("prefill", time.perf_counter() - t)
        return cache, padding

    def setup_positions(self, prompt_len, kept):
        return kept  # building the cache copies the positions that arrived


def _head_cache(cloud, received) -> tuple:
    """A padded per-head cache of a per-head stream: each (layer, KV head) holds the positions it received,
    after the cloud's template KV (every head's) when the header leaves the template to the cloud."""
    prefix_k, prefix_v = cloud.templates.kv() if received.header.template == "cloud" else ([], [])
    keys, values, sets = [], [], []
    for layer, slots in enumerate(received.head_slots):
        k, v = received.keys[layer][0], received.values[layer][0]  # [kv_heads, n, head_dim]
        t = 0
        if prefix_k:
            t = prefix_k[layer].shape[1]
            k = torch.cat([prefix_k[layer].to(k), k], dim=1)
            v = torch.cat([prefix_v[layer].to(v), v], dim=1)
        keys.append(k)
        values.append(v)
        sets.append([torch.cat([torch.arange(t), s + t]) for s in slots])
    return build_head_cache(keys, values, sets, cloud.loaded.dtype, cloud.loaded.device)
