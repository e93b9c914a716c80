"""scout: the edge streams only the kept positions; the cloud prefills the prompt with its own model and
keeps those positions (works across model sizes of one family: same tokenizer, any geometry)."""

from __future__ import annotations

import time

from kvwire.kvcodec.modes.base import Mode
from kvwire.kvcodec.prefill import prefill
from kvwire.kvcodec.prompt import Prompt


class ScoutMode(Mode):
    name = "scout"
    description = "the edge's kept positions only; the cloud prefills with its own model (same tokenizer)"

    def answer(self, cloud, received, max_new_tokens, timings=None):
        h = received.header
        prompt = Prompt(ids=tuple(h.prompt_ids), context_start=h.context_span[0], context_end=h.context_span[1])
        t = time.perf_counter()
        pre = prefill(cloud.loaded.model, prompt)
        if timings is not None:
            timings.add("prefill", time.perf_counter() - t)
        t = time.perf_counter()
        keep = received.positions.to(cloud.loaded.device)
        for layer in pre.cache.layers:
            layer.keys = layer.keys.index_select(2, keep)
            layer.values = layer.values.index_select(2, keep)
        if timings is not None:
            timings.add("inject", time.perf_counter() - t)
        return cloud.generate(pre.cache, h.prompt_ids, h.context_span, max_new_tokens, self.name, timings, received)
