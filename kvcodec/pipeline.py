"""The one pipeline every entry point uses (demo, eval, both daemons):

edge:  prompt -> prefill (+ attention capture) -> select -> encode -> frames
cloud: frames -> verify/decode -> cache -> feed last prompt token -> greedy answer
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvwire.kvcodec.errors import ConfigError, GeometryMismatchError
from kvwire.kvcodec.fingerprint import geometry_mismatch, kv_geometry, model_fingerprint, tokenizer_fingerprint
from kvwire.kvcodec.generate import Generation, eos_ids, greedy
from kvwire.kvcodec.models import LoadedModel
from kvwire.kvcodec.modes import get_mode, streamed_mode_names
from kvwire.kvcodec.prefill import prefill
from kvwire.kvcodec.profiles import get_profile
from kvwire.kvcodec.prompt import Prompt, build_prompt, model_window
from kvwire.kvcodec.receiver import StreamReceiver
from kvwire.kvcodec.selectors import check_retention_and_name, get_selector
from kvwire.kvcodec.stream import DEFAULT_CHUNK_BYTES, DecodedKV, StreamDecoder, StreamEncoder, StreamHeader


def fp16_kv_bytes(geometry: dict, tokens: int) -> int:
    """Bytes of an FP16 KV cache of `tokens` positions: the baseline every wire ratio divides by."""
    return tokens * geometry["num_layers"] * 2 * geometry["kv_heads"] * geometry["head_dim"] * 2


@dataclass
class EdgeRequest:
    context: str
    question: str
    mode: str = "kv"
    selector: str = "q2c"
    retention: float = 1.0
    profile: str = "mixed-int4"
    compress: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


@dataclass
class Timings:
    """Seconds per stage; absent stages stay 0."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.values[stage] = self.values.get(stage, 0.0) + seconds

    def ms(self) -> dict[str, float]:
        return {k: round(v * 1000, 3) for k, v in self.values.items()}


class PrefillMemo:
    """Prefills of one prompt kept for reuse across several EdgeRequests (kvwire eval runs many
    (selector, retention, profile) settings per question and would otherwise prefill for each).

    A prompt's KV does not depend on which attention rows were captured, so an entry serves a request
    for the same prompt ids that captures the same rows, or none. A reused prefill adds the seconds it
    took when it ran to the request's "prefill" timing, so per-request timings read as if run alone.
    Hold one memo per question: entries keep whole KV caches alive.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}  # (prompt ids, rows or None) -> (PrefillResult, seconds)
        self.runs = 0  # prefills actually computed
        self.seconds = 0.0  # their total time

    @staticmethod
    def _key(prompt: Prompt, rows: torch.Tensor | None) -> tuple:
        return (prompt.ids, None if rows is None else tuple(rows.tolist()))

    def get(self, prompt: Prompt, rows: torch.Tensor | None):
        """(PrefillResult, seconds) serving `rows` for this prompt, or None."""
        key = self._key(prompt, rows)
        if key in self._entries:
            return self._entries[key]
        if rows is None:  # KV only: any prefill of the same prompt will do; take the one that captured least
            same = [k for k in self._entries if k[0] == prompt.ids]
            return self._entries[min(same, key=lambda k: len(k[1]))] if same else None
        return None

    def put(self, prompt: Prompt, rows: torch.Tensor | None, result, seconds: float) -> None:
        self._entries[self._key(prompt, rows)] = (result, seconds)
        self.runs += 1
        self.seconds += seconds


class Edge:
    """The edge side: builds the prompt, prefills, selects, encodes."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.geometry = kv_geometry(loaded.model)
        self.model_fp = model_fingerprint(loaded.model)
        self.tokenizer_fp = tokenizer_fingerprint(loaded.tokenizer)

    def validate(self, req: EdgeRequest) -> None:
        """Raise ConfigError for anything wrong with a request before any work is done."""
        mode = get_mode(req.mode)
        if not mode.streamed:
            raise ConfigError(f"the edge streams modes {' and '.join(streamed_mode_names())}, not {req.mode!r}")
        check_retention_and_name(req.selector, req.retention)
        if mode.carries_kv:
            get_profile(req.profile).resolve(self.geometry["num_layers"], self.geometry["head_dim"])

    def prompt(self, req: EdgeRequest) -> Prompt:
        return build_prompt(self.loaded.tokenizer, req.context, req.question, max_len=model_window(self.loaded.model))

    def stream(
        self, req: EdgeRequest, timings: Timings | None = None, memo: PrefillMemo | None = None
    ) -> Iterator[bytes]:
        """Yield the frames of one request: header, chunks (most important first), trailer.

        memo: reuse a prefill of the same prompt from earlier requests (see PrefillMemo); the frames
        are the same as without it.
        """
        timings = timings if timings is not None else Timings()
        self.validate(req)
        prompt = self.prompt(req)
        selector = get_selector(req.selector)
        t = time.perf_counter()
        # scored even at retention 1.0: the score decides the order chunks are sent in (anytime streaming)
        rows = selector.query_rows(prompt)
        hit = memo.get(prompt, rows) if memo is not None else None
        if hit is None:
            pre = prefill(self.loaded.model, prompt, rows)
            seconds = time.perf_counter() - t
            if memo is not None:
                memo.put(prompt, rows, pre, seconds)
        else:
            pre, seconds = hit
        timings.add("prefill", seconds)
        t = time.perf_counter()
        # a memo entry may carry attention captured for other rows: a selector that asked for none gets none
        attention = pre.attention if rows is not None else None
        sel = selector.select(prompt, attention, req.retention)
        timings.add("select", time.perf_counter() - t)
        header = StreamHeader(
            mode=req.mode,
            prompt_ids=list(prompt.ids),
            context_span=(prompt.context_start, prompt.context_end),
            kept=sel.kept.tolist(),
            geometry=self.geometry,
            model=self.model_fp,
            tokenizer=self.tokenizer_fp,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            profile=get_profile(req.profile) if get_mode(req.mode).carries_kv else None,
            selector=req.selector,
            retention=req.retention,
        )
        enc = StreamEncoder(header, compress=req.compress, chunk_bytes=req.chunk_bytes)
        t = time.perf_counter()
        yield enc.header_frame()
        if get_mode(req.mode).carries_kv:
            for frame in enc.chunk_frames(pre.keys, pre.values, sel.order):
                timings.add("encode", time.perf_counter() - t)
                yield frame
                t = time.perf_counter()
        yield enc.trailer_frame()
        timings.add("encode", time.perf_counter() - t)


@dataclass
class Answer:
    text: str
    tokens: list[int]
    mode: str
    prompt_len: int
    context_tokens: int
    kept_positions: int
    bytes_on_wire: int
    wire_ratio: float
    generation: Generation
    complete: bool = True  # False: an anytime answer from the positions that arrived before a cut
    context_kept: int = 0  # context positions the answer attended to

    @property
    def retention_achieved(self) -> float:
        """Context positions used / context tokens (1.0 in text mode; below the request's retention
        when a deadline cut the stream)."""
        return self.context_kept / self.context_tokens if self.context_tokens else 1.0


class Cloud:
    """The cloud side: receives and verifies streams, answers from them (each mode its own way), generates."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.geometry = kv_geometry(loaded.model)
        self.tokenizer_fp = tokenizer_fingerprint(loaded.tokenizer)
        self.stop = eos_ids(loaded.model, loaded.tokenizer)

    def receiver(self, expect_mode: str | None = None, on_frame=None, on_reject=None) -> StreamReceiver:
        """A receiver for one stream that refuses, before allocating anything, a stream this model cannot use."""
        decoder = StreamDecoder(
            dtype=self.loaded.dtype,
            device=self.loaded.device,
            max_prompt=model_window(self.loaded.model) or 1 << 20,
            on_header=self.check_compatible,
        )
        return StreamReceiver(decoder, expect_mode, on_frame, on_reject)

    def receive(self, frames: Iterable[bytes], timings: Timings | None = None, stop=None) -> DecodedKV:
        """Feed every frame to a fresh receiver; complete and verified, or cut where `stop(frames, bytes)`
        says (see StreamReceiver.feed_all)."""
        receiver = self.receiver().feed_all(frames, stop)
        if timings is not None:
            timings.add("decode", receiver.decode_s)
        return receiver.result()

    def check_compatible(self, header: StreamHeader) -> None:
        """GeometryMismatchError if this model cannot use the stream (tokenizer; KV geometry when it carries KV)."""
        problems = []
        if header.tokenizer != self.tokenizer_fp:
            problems.append("tokenizer differs (vocabulary, special tokens or chat template)")
        carries_kv = get_mode(header.mode).carries_kv
        if carries_kv:
            problems += geometry_mismatch(self.geometry, header.geometry)
        if problems:
            same_tokenizer = header.tokenizer == self.tokenizer_fp
            hint = (
                " Use mode=scout with a model of the same family (same tokenizer)."
                if carries_kv and same_tokenizer
                else ""
            )
            raise GeometryMismatchError(
                f"the {header.mode} stream does not fit this model: " + "; ".join(problems) + "." + hint
            )

    def answer(self, received: DecodedKV, max_new_tokens: int, timings: Timings | None = None) -> Answer:
        """Answer from a received stream (complete or cut), the way its mode does."""
        return get_mode(received.header.mode).answer(self, received, max_new_tokens, timings)

    def answer_text(self, context: str, question: str, max_new_tokens: int, timings: Timings | None = None) -> Answer:
        """The baseline: prefill the plain text with this model."""
        prompt = build_prompt(self.loaded.tokenizer, context, question, max_len=model_window(self.loaded.model))
        t = time.perf_counter()
        pre = prefill(self.loaded.model, prompt)
        if timings is not None:
            timings.add("prefill", time.perf_counter() - t)
        span = (prompt.context_start, prompt.context_end)
        text = get_mode("text")
        return self.generate(
            pre.cache,
            prompt.ids,
            span,
            max_new_tokens,
            text.name,
            timings,
            wire_bytes=text.wire_bytes(context, question),
        )

    def generate(
        self,
        cache,
        prompt_ids: Sequence[int],
        context_span: tuple[int, int],
        max_new_tokens: int,
        mode: str,
        timings: Timings | None = None,
        received: DecodedKV | None = None,
        wire_bytes: int = 0,
    ) -> Answer:
        """Feed the last prompt token on `cache` (all prompt positions but the last, or the received ones)
        at its absolute position and decode greedily. received: the stream the cache came from (its
        positions and bytes are the answer's); None: the cache holds the whole prompt."""
        prompt_len = len(prompt_ids)
        gen = greedy(self.loaded.model, cache, prompt_ids[-1], prompt_len - 1, max_new_tokens, self.stop)
        if timings is not None:
            timings.add("first_token", gen.first_token_s)
            timings.add("generate", gen.total_s)
        start, end = context_span
        if received is None:
            kept, context_kept, complete = prompt_len - 1, end - start, True
        else:
            kept, complete, wire_bytes = len(received.positions), received.complete, received.wire_bytes
            context_kept = int(((received.positions >= start) & (received.positions < end)).sum())
        return Answer(
            text=self.loaded.tokenizer.decode(gen.tokens, skip_special_tokens=True).strip(),
            tokens=gen.tokens,
            mode=mode,
            prompt_len=prompt_len,
            context_tokens=end - start,
            kept_positions=kept,
            bytes_on_wire=wire_bytes,
            wire_ratio=wire_bytes / fp16_kv_bytes(self.geometry, prompt_len),
            generation=gen,
            complete=complete,
            context_kept=context_kept,
        )
