"""The one pipeline every entry point uses (demo, eval, both daemons):

edge:  prompt -> prefill (+ attention capture) -> select -> encode -> frames
cloud: frames -> verify/decode -> cache -> feed last prompt token -> greedy answer
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvwire.kvcodec.cache import build_head_cache, padded_heads
from kvwire.kvcodec.errors import ConfigError, GeometryMismatchError
from kvwire.kvcodec.fingerprint import geometry_mismatch, kv_geometry, model_fingerprint, tokenizer_fingerprint
from kvwire.kvcodec.generate import GREEDY, Decoding, Generation, eos_ids, generate
from kvwire.kvcodec.models import LoadedModel
from kvwire.kvcodec.modes import get_mode, streamed_mode_names
from kvwire.kvcodec.prefill import PrefillResult, prefill, prefill_from
from kvwire.kvcodec.prefix_cache import PrefixCache, PrefixEntry, prefix_key
from kvwire.kvcodec.profiles import get_profile
from kvwire.kvcodec.prompt import Prompt, build_prompt, model_window
from kvwire.kvcodec.receiver import StreamReceiver
from kvwire.kvcodec.selectors import (
    DEFAULT_SELECTOR,
    ScoreInputs,
    Selection,
    Selector,
    check_retention,
    full_selection,
    get_selector,
)
from kvwire.kvcodec.stream import DEFAULT_CHUNK_BYTES, DecodedKV, StreamDecoder, StreamEncoder, StreamHeader


def fp16_kv_bytes(geometry: dict, tokens: int) -> int:
    """Bytes of an FP16 KV cache of `tokens` positions: the baseline every wire ratio divides by."""
    return tokens * geometry["num_layers"] * 2 * geometry["kv_heads"] * geometry["head_dim"] * 2


@dataclass
class EdgeRequest:
    context: str
    question: str
    mode: str = "kv"
    selector: str | None = DEFAULT_SELECTOR  # None: no selection (retention 1.0, prompt order, no capture)
    retention: float = 1.0
    profile: str = "mixed-int4"
    compress: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    doc_id: str | None = None  # the document `context` is the text of (tags its prefix-cache entries)


@dataclass
class Timings:
    """Seconds per stage; absent stages stay 0."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.values[stage] = self.values.get(stage, 0.0) + seconds

    def ms(self) -> dict[str, float]:
        return {k: round(v * 1000, 3) for k, v in self.values.items()}


class Edge:
    """The edge side: builds the prompt, prefills, selects, encodes.

    `stream` runs the steps in order; each step is public too (`prompt`, `selector`, `prefill`,
    `select`), so a caller that already holds a prefill of the prompt (kvwire eval reuses one across
    settings: bench/prefill_memo.py) passes it to `stream` as `prefilled`.
    """

    def __init__(self, loaded: LoadedModel, prefix_cache: PrefixCache | None = None):
        self.loaded = loaded
        self.prefix_cache = prefix_cache  # None: every request prefills its whole prompt
        self.geometry = kv_geometry(loaded.model)
        self.model_fp = model_fingerprint(loaded.model)
        self.tokenizer_fp = tokenizer_fingerprint(loaded.tokenizer)

    def validate(self, req: EdgeRequest) -> None:
        """Raise ConfigError for anything wrong with a request before any work is done."""
        mode = get_mode(req.mode)
        if not mode.streamed:
            raise ConfigError(f"the edge streams modes {' and '.join(streamed_mode_names())}, not {req.mode!r}")
        self.selector(req)
        check_retention(req.retention)
        if req.selector is None and req.retention < 1.0:
            raise ConfigError(f"retention {req.retention:g} needs a selector (no selection keeps every position)")
        if mode.carries_kv:
            get_profile(req.profile).resolve(self.geometry["num_layers"], self.geometry["head_dim"])

    def prompt(self, req: EdgeRequest) -> Prompt:
        return build_prompt(self.loaded.tokenizer, req.context, req.question, max_len=model_window(self.loaded.model))

    def selector(self, req: EdgeRequest) -> Selector | None:
        """The request's selector; None: no selection (every position, in prompt order, nothing scored)."""
        return None if req.selector is None else get_selector(req.selector)

    def prefill(
        self, prompt: Prompt, selector: Selector | None, timings: Timings | None = None, doc_id: str | None = None
    ) -> PrefillResult:
        """Prefill the prompt, capturing the attention rows the selector asks for (none without one).

        With a prefix cache, [template prefix][context] comes from the cache (computed and kept on a
        miss, tagged with `doc_id`) and only the question and template suffix run through the model
        ("question_prefill"); the KV and the captured attention are those of a full prefill.
        """
        timings = timings if timings is not None else Timings()
        rows = selector.query_rows(prompt) if selector is not None else None
        t = time.perf_counter()
        if self.prefix_cache is None:
            pre = prefill(self.loaded.model, prompt, rows)
            timings.add("prefill", time.perf_counter() - t)
            return pre
        entry = self.prefix_entry(prompt, timings, doc_id)
        inner = outer = None
        if rows is not None and len(rows):
            inner, outer = rows[rows < prompt.context_end], rows[rows >= prompt.context_end]
        t = time.perf_counter()
        pre = prefill_from(self.loaded.model, prompt, (entry.keys, entry.values), outer)
        timings.add("question_prefill", time.perf_counter() - t)
        if inner is None:
            return pre
        parts = [] if pre.attention is None else [pre.attention]
        if len(inner):  # rows of the prefix itself: their attention is the prefix's, computed once per row set
            parts.append(self._prefix_attention(entry, prompt, inner, timings))
        return PrefillResult(pre.cache, sum(parts[1:], parts[0]), rows.long().cpu())

    def prefix_entry(self, prompt: Prompt, timings: Timings, doc_id: str | None = None) -> PrefixEntry:
        """The cached KV of the prompt's [template prefix][context]; prefilled ("prefill") and kept on a miss."""
        key = prefix_key(self.model_fp, prompt.ids[: prompt.context_end])
        entry = self.prefix_cache.get(key)
        if entry is None:
            t = time.perf_counter()
            pre = prefill(self.loaded.model, self._prefix_prompt(prompt))
            seconds = time.perf_counter() - t
            timings.add("prefill", seconds)
            entry = PrefixEntry(prompt.ids[: prompt.context_end], pre.keys, pre.values, seconds, doc_id)
            self.prefix_cache.put(key, entry)
        return entry

    @staticmethod
    def _prefix_prompt(prompt: Prompt) -> Prompt:
        """The prompt cut after its context: prefilling it yields exactly positions [0, context_end)."""
        return Prompt(prompt.ids[: prompt.context_end + 1], prompt.context_start, prompt.context_end)

    def _prefix_attention(self, entry: PrefixEntry, prompt: Prompt, rows: torch.Tensor, timings: Timings):
        key = tuple(rows.tolist())
        if key not in entry.row_attention:
            t = time.perf_counter()
            entry.row_attention[key] = prefill(self.loaded.model, self._prefix_prompt(prompt), rows).attention
            timings.add("prefill", time.perf_counter() - t)
        return entry.row_attention[key]

    def select(self, prompt: Prompt, selector: Selector | None, pre: PrefillResult, retention: float) -> Selection:
        """Score and select from a prefill of `prompt` (its attention must be for the selector's rows)."""
        if selector is None:
            return full_selection(prompt)
        return selector.select(self.score_inputs(prompt, selector, pre), retention)

    def select_heads(
        self, prompt: Prompt, selector: Selector, pre: PrefillResult, retention: float, budget: str = "global"
    ) -> Selection:
        """A position set per (layer, KV head) (Selector.select_heads; budget "layer" or "global"). The
        wire carries one set today: Cloud.answer_heads uses this selection in process."""
        return selector.select_heads(self.score_inputs(prompt, selector, pre), retention, budget)

    def score_inputs(self, prompt: Prompt, selector: Selector, pre: PrefillResult) -> ScoreInputs:
        """What `selector.score` sees: the attention of its rows (None if it asked for none) and the KV."""
        if pre.keys[0].shape[1] != prompt.stream_len:
            raise ValueError(
                f"the prefill holds {pre.keys[0].shape[1]} positions, the prompt streams {prompt.stream_len}"
            )
        rows = selector.query_rows(prompt)
        attention = None
        if rows is not None and len(rows):
            if pre.rows is None or not torch.equal(pre.rows, rows.long().cpu()):
                raise ValueError(f"the prefill did not capture the attention rows selector {selector.name!r} needs")
            attention = pre.attention
        return ScoreInputs(
            prompt=prompt,
            attention=attention,
            keys=pre.keys,
            values=pre.values,
            model=self.loaded.model,
            tokenizer=self.loaded.tokenizer,
        )

    def stream(
        self, req: EdgeRequest, timings: Timings | None = None, prefilled: PrefillResult | None = None
    ) -> Iterator[bytes]:
        """Yield the frames of one request: header, chunks (most important first), trailer.

        prefilled: a prefill of this request's prompt made earlier (Edge.prefill with the same
        selector); the frames are the same as without it, and its time is the caller's to count.
        The request is validated now (ConfigError); the prefill and everything after it run only
        when the first frame is taken (the edge daemon takes it under its model lock).
        """
        self.validate(req)
        return self._frames(req, timings if timings is not None else Timings(), prefilled)

    def _frames(self, req: EdgeRequest, timings: Timings, prefilled: PrefillResult | None) -> Iterator[bytes]:
        prompt = self.prompt(req)
        selector = self.selector(req)
        if prefilled is None:
            # scored even at retention 1.0: the score decides the order chunks are sent in (anytime streaming)
            pre = self.prefill(prompt, selector, timings, req.doc_id)
        else:
            pre = prefilled
        t = time.perf_counter()
        sel = self.select(prompt, selector, pre, req.retention)
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
            selector=req.selector or "",
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


def answer_text(tokenizer, tokens: Sequence[int]) -> str:
    """The answer's text; an answer cut at max_new_tokens inside a multi-byte character drops that
    character's first bytes rather than end in U+FFFD (a character is at most 4 bytes: 3 tokens' worth)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for cut in range(1, min(3, len(tokens)) + 1):
        if not text.endswith("\ufffd"):
            break
        text = tokenizer.decode(tokens[:-cut], skip_special_tokens=True)
    return text.strip()


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

    def answer_heads(
        self,
        prompt: Prompt,
        pre: PrefillResult,
        selection: Selection,
        max_new_tokens: int,
        timings: Timings | None = None,
        decoding: Decoding = GREEDY,
    ) -> Answer:
        """Answer from a per-head selection (Edge.select_heads) of a prefill's KV, in process: each
        (layer, KV head) attends only to its own positions (build_head_cache, padded_heads). Streams
        carry one position set today, so nothing crosses a wire here (bytes_on_wire 0)."""
        if selection.heads is None:
            raise ValueError("answer_heads needs a per-head selection (Edge.select_heads)")
        t = time.perf_counter()
        cache, padding = build_head_cache(pre.keys, pre.values, selection.heads, self.loaded.dtype, self.loaded.device)
        if timings is not None:
            timings.add("inject", time.perf_counter() - t)
        with padded_heads(padding):
            ans = self.generate(
                cache,
                prompt.ids,
                (prompt.context_start, prompt.context_end),
                max_new_tokens,
                "kv",
                timings,
                decoding=decoding,
            )
        return dataclasses.replace(ans, kept_positions=len(selection.kept), context_kept=selection.context_kept)

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

    def answer(
        self,
        received: DecodedKV,
        max_new_tokens: int,
        timings: Timings | None = None,
        options=None,
        decoding: Decoding = GREEDY,
    ) -> Answer:
        """Answer from a received stream (complete or cut), the way its mode does (options: its choices,
        e.g. {"scout_prefill": "full"}; decoding: how tokens are chosen)."""
        return get_mode(received.header.mode).answer(self, received, max_new_tokens, timings, options, decoding)

    def answer_text(
        self,
        context: str,
        question: str,
        max_new_tokens: int,
        timings: Timings | None = None,
        decoding: Decoding = GREEDY,
    ) -> Answer:
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
            decoding=decoding,
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
        decoding: Decoding = GREEDY,
    ) -> Answer:
        """Feed the last prompt token on `cache` (all prompt positions but the last, or the received ones)
        at its absolute position and decode (greedy unless `decoding` samples). received: the stream the cache came from (its
        positions and bytes are the answer's); None: the cache holds the whole prompt."""
        prompt_len = len(prompt_ids)
        gen = generate(self.loaded.model, cache, prompt_ids[-1], prompt_len - 1, max_new_tokens, self.stop, decoding)
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
            text=answer_text(self.loaded.tokenizer, gen.tokens),
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
