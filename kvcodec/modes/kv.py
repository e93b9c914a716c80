"""kv: the edge streams the quantized KV of the kept positions; the cloud injects it and generates.

A header may leave the fixed segments to the cloud (docs/codec.md, "Fixed positions"): with template
"cloud" the cloud puts its own cached KV of the template prefix first, with question "cloud" it
prefills the question and template suffix itself on top of the injected context KV.
"""

from __future__ import annotations

import time

from kvwire.kvcodec.cache import build_cache
from kvwire.kvcodec.generate import GREEDY
from kvwire.kvcodec.modes.base import Mode


class KVMode(Mode):
    name = "kv"
    description = "quantized KV of the kept positions from the edge (the cloud's model needs the same KV geometry)"
    carries_kv = True

    def answer(self, cloud, received, max_new_tokens, timings=None, options=None, decoding=GREEDY):
        h = received.header
        cache = self.cache(cloud, received, timings)
        return cloud.generate(
            cache, None, h.context_span, max_new_tokens, self.name, timings, received, decoding=decoding
        )

    @staticmethod
    def cache(cloud, received, timings=None):
        """The cache generation starts from: the cloud's template KV (when the header leaves it to the cloud),
        the injected KV, and the question prefilled on top (when it is the cloud's)."""
        h = received.header
        t = time.perf_counter()
        cache, _ = build_cache(received, cloud.loaded.dtype, cloud.loaded.device, cloud.template_cache(h))
        if timings is not None:
            timings.add("inject", time.perf_counter() - t)
        t = time.perf_counter()
        cache = cloud.extend(cache, h, range(h.tail_start, h.n_prompt - 1))  # the question, when it is the cloud's
        if timings is not None and h.question == "cloud":
            timings.add("prefill", time.perf_counter() - t)
        return cache

    def setup_positions(self, prompt_len, kept):
        return kept  # building the cache copies the positions that arrived
