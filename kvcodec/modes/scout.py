"""scout: the edge streams only the kept positions; the cloud prefills with its own model and keeps those
positions (works across model sizes of one family: same tokenizer, any geometry).

scout_prefill "sparse" (SpecPrefill's step): the cloud prefills ONLY the kept tokens, each at its original
position id, so a 50% selection halves the cloud's prefill; "full": it prefills the whole prompt and then
drops the other positions (the same positions, each computed with the whole prompt in view).
"""

from __future__ import annotations

import time

import torch

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.generate import GREEDY
from kvwire.kvcodec.modes.base import Mode
from kvwire.kvcodec.prefill import prefill
from kvwire.kvcodec.prompt import Prompt

SCOUT_PREFILLS = ("sparse", "full")
DEFAULT_SCOUT_PREFILL = "sparse"


class ScoutMode(Mode):
    name = "scout"
    description = "the edge's kept positions only; the cloud prefills them with its own model (same tokenizer)"

    def answer(self, cloud, received, max_new_tokens, timings=None, options=None, decoding=GREEDY):
        how = (options or {}).get("scout_prefill", DEFAULT_SCOUT_PREFILL)
        if how not in SCOUT_PREFILLS:
            raise ConfigError(f"scout_prefill {how!r}: use one of {', '.join(SCOUT_PREFILLS)}")
        h = received.header
        t = time.perf_counter()
        keep = received.positions.to(cloud.loaded.device)
        cache = self._sparse(cloud, h.prompt_ids, keep) if how == "sparse" else self._full(cloud, h, keep)
        if timings is not None:
            timings.add("prefill", time.perf_counter() - t)
        return cloud.generate(
            cache, h.prompt_ids, h.context_span, max_new_tokens, self.name, timings, received, decoding=decoding
        )

    def setup_positions(self, prompt_len, kept):
        return kept  # the default sparse prefill runs the kept tokens only

    @staticmethod
    @torch.inference_mode()
    def _sparse(cloud, prompt_ids, keep: torch.Tensor):
        """KV of the kept tokens alone, at their absolute positions (keep: ascending)."""
        ids = torch.tensor([prompt_ids], device=keep.device)[:, keep]
        return cloud.loaded.model(input_ids=ids, position_ids=keep[None], use_cache=True).cache

    @staticmethod
    def _full(cloud, h, keep: torch.Tensor):
        prompt = Prompt(ids=tuple(h.prompt_ids), context_start=h.context_span[0], context_end=h.context_span[1])
        cache = prefill(cloud.loaded.model, prompt).cache
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(2, keep)
            layer.values = layer.values.index_select(2, keep)
        return cache
