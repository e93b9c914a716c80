"""Prefill reuse for `kvwire eval`: one question's prefills shared across its settings (eval-only; the
daemons prefill every request)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from kvwire.kvcodec.pipeline import Edge, EdgeRequest, Timings
from kvwire.kvcodec.prefill import PrefillResult
from kvwire.kvcodec.prompt import Prompt


class PrefillMemo:
    """Prefills of one prompt kept for reuse across several EdgeRequests (kvwire eval runs many
    (selector, retention, profile) settings per question and would otherwise prefill for each).

    A prompt's KV does not depend on which attention rows were captured, so an entry serves a request
    for the same prompt ids that captures the same rows, or none. A reused prefill adds the seconds it
    took when it ran to the request's "prefill" timing, so per-request timings read as if run alone.
    Hold one memo per question: entries keep whole KV caches alive.
    """

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self._entries: dict[tuple, tuple[PrefillResult, float]] = {}  # (prompt ids, rows or None) -> entry
        self.runs = 0  # prefills actually computed
        self.seconds = 0.0  # their total time

    @staticmethod
    def _key(prompt: Prompt, rows: torch.Tensor | None) -> tuple:
        return (prompt.ids, None if rows is None or not len(rows) else tuple(rows.tolist()))

    def get(self, prompt: Prompt, rows: torch.Tensor | None) -> tuple[PrefillResult, float] | None:
        """(PrefillResult, seconds) serving `rows` for this prompt, or None."""
        key = self._key(prompt, rows)
        if key in self._entries:
            return self._entries[key]
        if key[1] is None:  # KV only: any prefill of the same prompt will do; take the one that captured least
            same = [k for k in self._entries if k[0] == prompt.ids]
            return self._entries[min(same, key=lambda k: len(k[1] or ()))] if same else None
        return None

    def put(self, prompt: Prompt, rows: torch.Tensor | None, result: PrefillResult, seconds: float) -> None:
        self._entries[self._key(prompt, rows)] = (result, seconds)
        self.runs += 1
        self.seconds += seconds

    def kv(self, prompt: Prompt) -> PrefillResult:
        """A prefill of `prompt` for its KV alone: one the memo holds (any captured rows), or a new one
        without capture, kept for later requests."""
        hit = self.get(prompt, None)
        if hit is not None:
            return hit[0]
        t = time.perf_counter()
        pre = self.edge.prefill(prompt, None)
        self.put(prompt, None, pre, time.perf_counter() - t)
        return pre

    def stream(self, req: EdgeRequest, timings: Timings | None = None) -> Iterator[bytes]:
        """Edge.stream(req) with the prefill taken from the memo when it holds one that serves `req`
        (the frames are the same either way)."""
        timings = timings if timings is not None else Timings()
        self.edge.validate(req)
        prompt, selector = self.edge.prompt(req), self.edge.selector(req)
        rows = selector.query_rows(prompt) if selector is not None else None
        hit = self.get(prompt, rows)
        if hit is None:
            t = time.perf_counter()
            pre = self.edge.prefill(prompt, selector)
            seconds = time.perf_counter() - t
            self.put(prompt, rows, pre, seconds)
        else:
            pre, seconds = hit
        timings.add("prefill", seconds)
        return self.edge.stream(req, timings, prefilled=pre)
