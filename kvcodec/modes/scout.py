"""scout: the edge streams only the kept positions; the cloud prefills with its own model and keeps those
positions (works across model sizes of one family: same tokenizer, any geometry).

scout_prefill "sparse" (SpecPrefill's step): the cloud prefills ONLY the kept tokens, each at its original
position id, so a 50% selection halves the cloud's prefill; "full": it prefills the whole prompt and then
drops the other positions (the same positions, each computed with the whole prompt in view). The edge
must know which: a sparse scout's header carries the ids of the kept positions only, a full scout's every
id (EdgeRequest.scout_prefill). With template "cloud" the template prefix comes from the cloud's cache
(kvcodec/template_cache.py) instead of being prefilled; with question "cloud" the question's ids travel as
the header's tail and are prefilled in the same pass.
"""

from __future__ import annotations

import time

import torch

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.generate import GREEDY
from kvwire.kvcodec.modes.base import Mode

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
        first = h.context_span[0] if h.template == "cloud" else 0
        if how == "full" and not all(p in h.token_ids for p in range(first, h.n_prompt)):
            raise ConfigError(
                "scout_prefill full needs every prompt id, and this stream's header carries only the kept "
                "positions' ids: ask the edge with scout_prefill=full"
            )
        t = time.perf_counter()
        tail = list(range(h.tail_start, h.n_prompt - 1))
        cache = cloud.template_cache(h)
        if how == "sparse":  # the kept tokens alone, at their absolute positions (+ the cloud's question)
            cache = cloud.extend(cache, h, received.positions.tolist() + tail)
        else:
            cache = self._full(cloud, h, cache, received.positions.tolist() + tail)
        if timings is not None:
            timings.add("prefill", time.perf_counter() - t)
        return cloud.generate(
            cache, None, h.context_span, max_new_tokens, self.name, timings, received, decoding=decoding
        )

    def setup_positions(self, prompt_len, kept):
        return kept  # the default sparse prefill runs the kept tokens only

    @staticmethod
    def _full(cloud, h, cache, held: list[int]):
        """Prefill every position (on the cloud's template KV when it is the cloud's), then keep the
        template, the held positions and nothing else (held: ascending, after the template)."""
        start = h.context_span[0] if cache is not None else 0
        cache = cloud.extend(cache, h, range(start, h.n_prompt - 1))
        keep = torch.tensor(
            [*range(h.context_span[0] if h.template == "cloud" else 0), *held], device=cloud.loaded.device
        )
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(2, keep)
            layer.values = layer.values.index_select(2, keep)
        return cache
