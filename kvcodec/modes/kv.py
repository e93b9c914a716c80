"""kv: the edge streams the quantized KV of the kept positions; the cloud injects it and generates."""

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
        t = time.perf_counter()
        cache, _ = build_cache(received, cloud.loaded.dtype, cloud.loaded.device)
        if timings is not None:
            timings.add("inject", time.perf_counter() - t)
        h = received.header
        return cloud.generate(
            cache, h.prompt_ids, h.context_span, max_new_tokens, self.name, timings, received, decoding=decoding
        )

    def setup_positions(self, prompt_len, kept):
        return kept  # building the cache copies the positions that arrived
