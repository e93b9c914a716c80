"""The one pipeline every entry point uses (demo, eval, both daemons):

edge:  prompt -> prefill (+ attention capture) -> select -> encode -> frames
cloud: frames -> verify/decode -> cache -> feed last prompt token -> greedy answer
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from kvwire.kvcodec.cache import build_head_cache, padded_heads
from kvwire.kvcodec.errors import ConfigError, GeometryMismatchError
from kvwire.kvcodec.fingerprint import geometry_mismatch, kv_geometry, model_fingerprint, tokenizer_fingerprint
from kvwire.kvcodec.generate import GREEDY, Decoding, Generation, eos_ids, generate
from kvwire.kvcodec.models import LoadedModel
from kvwire.kvcodec.modes import get_mode, streamed_mode_names
from kvwire.kvcodec.modes.scout import DEFAULT_SCOUT_PREFILL, SCOUT_PREFILLS
from kvwire.kvcodec.prefill import PrefillResult, prefill, prefill_from
from kvwire.kvcodec.prefix_cache import PrefixCache, PrefixEntry, prefix_key
from kvwire.kvcodec.profiles import get_profile
from kvwire.kvcodec.prompt import Prompt, build_prompt, model_window
from kvwire.kvcodec.receiver import StreamReceiver
from kvwire.kvcodec.selectors import (
    DEFAULT_SELECTOR,
    HEAD_BUDGETS,
    ScoreInputs,
    Selection,
    Selector,
    check_retention,
    full_selection,
    get_selector,
)
from kvwire.kvcodec.stream import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_QUESTION_KV,
    DEFAULT_TEMPLATE_KV,
    FIXED_SOURCES,
    DecodedKV,
    StreamDecoder,
    StreamEncoder,
    StreamHeader,
)
from kvwire.kvcodec.template_cache import TemplateCache


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
    doc_version: int | None = None  # that document's version (a cache refuses entries of versions it knows are old)
    # fixed positions (docs/codec.md): "stream" sends the template prefix / the question + template suffix,
    # "cloud" leaves them to the cloud (its cached template KV; its own prefill of the question)
    template_kv: str = DEFAULT_TEMPLATE_KV
    question_kv: str = DEFAULT_QUESTION_KV
    scout_prefill: str = DEFAULT_SCOUT_PREFILL  # scout: "full" makes the header carry every prompt id
    # "": one position set for every layer and head; a HEAD_BUDGETS entry ("global", "layer"): a set per
    # (layer, KV head) under that budget, streamed in the per-head layout (docs/selection.md), kv mode only
    heads: str = ""


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

    def __init__(
        self, loaded: LoadedModel, prefix_cache: PrefixCache | None = None, document_selectors: Sequence[Selector] = ()
    ):
        self.loaded = loaded
        self.prefix_cache = prefix_cache  # None: every request prefills its whole prompt
        # selectors whose context-only scores (kvzip's) warm_prefix computes with a document's prefix KV
        self.document_selectors = tuple(document_selectors)
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
        for name in ("template_kv", "question_kv"):
            if getattr(req, name) not in FIXED_SOURCES:
                raise ConfigError(f"{name} {getattr(req, name)!r}: use one of {', '.join(FIXED_SOURCES)}")
        if req.scout_prefill not in SCOUT_PREFILLS:
            raise ConfigError(f"scout_prefill {req.scout_prefill!r}: use one of {', '.join(SCOUT_PREFILLS)}")
        if req.heads:
            if req.heads not in HEAD_BUDGETS:
                raise ConfigError(f"heads {req.heads!r}: use one of {', '.join(HEAD_BUDGETS)}, or none for one set")
            if not mode.carries_kv or req.selector is None:
                raise ConfigError("heads (a position set per layer and KV head) needs mode kv and a selector")

    def prompt(self, req: EdgeRequest) -> Prompt:
        return build_prompt(self.loaded.tokenizer, req.context, req.question, max_len=model_window(self.loaded.model))

    def selector(self, req: EdgeRequest) -> Selector | None:
        """The request's selector; None: no selection (every position, in prompt order, nothing scored)."""
        return None if req.selector is None else get_selector(req.selector)

    def prefill(
        self,
        prompt: Prompt,
        selector: Selector | None,
        timings: Timings | None = None,
        doc_id: str | None = None,
        doc_version: int | None = None,
    ) -> PrefillResult:
        """Prefill the prompt, capturing the attention rows the selector asks for (none without one).

        With a prefix cache, [template prefix][context] comes from the cache (computed and kept on a
        miss, tagged with `doc_id` and `doc_version`) and only the question and template suffix run through the model
        ("question_prefill"); the KV and the captured attention are those of a full prefill.
        """
        timings = timings if timings is not None else Timings()
        rows = selector.query_rows(prompt) if selector is not None else None
        t = time.perf_counter()
        if self.prefix_cache is None:
            pre = prefill(self.loaded.model, prompt, rows)
            timings.add("prefill", time.perf_counter() - t)
            return pre
        entry = self.prefix_entry(prompt, timings, doc_id, doc_version)
        inner = outer = None
        if rows is not None and len(rows):
            inner, outer = rows[rows < prompt.context_end], rows[rows >= prompt.context_end]
        t = time.perf_counter()
        pre = prefill_from(self.loaded.model, prompt, (entry.keys, entry.values), outer)
        timings.add("question_prefill", time.perf_counter() - t)
        if inner is None:
            return replace(pre, prefix_scores=entry.scores)
        parts = [] if pre.attention is None else [pre.attention]
        if len(inner):  # rows of the prefix itself: their attention is the prefix's, computed once per row set
            parts.append(self._prefix_attention(entry, prompt, inner, timings))
        return PrefillResult(pre.cache, sum(parts[1:], parts[0]), rows.long().cpu(), entry.scores)

    def prefix_entry(
        self, prompt: Prompt, timings: Timings, doc_id: str | None = None, doc_version: int | None = None
    ) -> PrefixEntry:
        """The cached KV of the prompt's [template prefix][context] (memory, else disk); prefilled ("prefill")
        and kept on a miss."""
        ids = prompt.ids[: prompt.context_end]
        key = prefix_key(self.model_fp, ids)
        entry = self.prefix_cache.get(key, ids)
        if entry is None:
            entry = self._compute_prefix(prompt, key, timings, doc_id, doc_version)
        return entry

    def warm_prefix(self, context: str, doc_id: str | None = None, doc_version: int | None = None) -> bool:
        """Prefill and keep [template prefix][context] unless the cache holds it already (True: prefilled now),
        and the context-only scores of `document_selectors` with it (kept in the entry: PrefixEntry.scores).

        For background work (a document prefilled when it is put): counts no hit or miss; the forward pass
        stops at the next layer when the surrounding `stop_when` says so (PrefillCancelled)."""
        prompt = build_prompt(self.loaded.tokenizer, context, "?", max_len=model_window(self.loaded.model))
        ids = prompt.ids[: prompt.context_end]
        key = prefix_key(self.model_fp, ids)
        entry = self.prefix_cache.peek(key, ids)
        computed = entry is None
        if entry is None:
            entry = self._compute_prefix(prompt, key, Timings(), doc_id, doc_version)
        elif doc_id is not None and entry.doc_id is None:  # an inline context's entry: now the document's too
            self.prefix_cache.put(key, replace(entry, doc_id=doc_id, doc_version=doc_version))
        for selector in self.document_selectors:  # the same memo: replace() keeps the entry's scores dict
            inputs = ScoreInputs(
                prompt, None, entry.keys, entry.values, self.loaded.model, self.loaded.tokenizer, entry.scores
            )
            selector.context_scores(inputs)
        return computed

    def _compute_prefix(self, prompt, key, timings, doc_id, doc_version) -> PrefixEntry:
        t = time.perf_counter()
        pre = prefill(self.loaded.model, self._prefix_prompt(prompt))
        seconds = time.perf_counter() - t
        timings.add("prefill", seconds)
        ids = prompt.ids[: prompt.context_end]
        entry = PrefixEntry(ids, pre.keys, pre.values, seconds, doc_id, doc_version)
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
        """A position set per (layer, KV head) (Selector.select_heads; budget "layer" or "global"): what a
        request with `heads` streams, and what Cloud.answer_heads answers from in process."""
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
            prefix_scores=pre.prefix_scores,
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
            pre = self.prefill(prompt, selector, timings, req.doc_id, req.doc_version)
        else:
            pre = prefilled
        t = time.perf_counter()
        if req.heads:
            sel = self.select_heads(prompt, selector, pre, req.retention, req.heads)
        else:
            sel = self.select(prompt, selector, pre, req.retention)
        timings.add("select", time.perf_counter() - t)
        yield from self.encode(prompt, req, pre, sel, timings)

    def encode(
        self, prompt: Prompt, req: EdgeRequest, pre: PrefillResult, sel: Selection, timings: Timings | None = None
    ) -> Iterator[bytes]:
        """The frames of a selection of `pre` (the prefill of `prompt`) for `req`: header, chunks (the per-head
        layout when `sel` is per head), trailer. Edge.stream selects and then runs this; a benchmark that holds
        the selection already (bench/selection_bench.py) runs it alone."""
        timings = timings if timings is not None else Timings()
        streamed = self._streamed(prompt, req)
        kept, order = sel.kept[streamed[sel.kept]], sel.order[streamed[sel.order]]
        header = StreamHeader(
            mode=req.mode,
            prompt_ids=list(prompt.ids),
            context_span=(prompt.context_start, prompt.context_end),
            kept=kept.tolist(),
            geometry=self.geometry,
            model=self.model_fp,
            tokenizer=self.tokenizer_fp,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            profile=get_profile(req.profile) if get_mode(req.mode).carries_kv else None,
            selector=req.selector or "",
            retention=req.retention,
            template=req.template_kv,
            question=req.question_kv,
            ids="all" if req.mode == "scout" and req.scout_prefill == "full" else "",
            head_counts=sel.head_counts(prompt) if sel.heads is not None else None,
        )
        enc = StreamEncoder(header, compress=req.compress, chunk_bytes=req.chunk_bytes)
        t = time.perf_counter()
        yield enc.header_frame()
        if get_mode(req.mode).carries_kv:
            if sel.heads is None:
                chunks = enc.chunk_frames(pre.keys, pre.values, order)
            else:  # template and question rows first, then every head's entries by importance
                fixed = order[(order < prompt.context_start) | (order >= prompt.context_end)]
                chunks = enc.head_chunk_frames(pre.keys, pre.values, fixed, sel.entry_order(prompt))
            for frame in chunks:
                timings.add("encode", time.perf_counter() - t)
                yield frame
                t = time.perf_counter()
        yield enc.trailer_frame()
        timings.add("encode", time.perf_counter() - t)

    @staticmethod
    def _streamed(prompt: Prompt, req: EdgeRequest) -> torch.Tensor:
        """[stream_len] bool: the positions this request streams (a fixed segment the cloud computes is not)."""
        streamed = torch.ones(prompt.stream_len, dtype=torch.bool)
        if req.template_kv == "cloud":
            streamed[: prompt.context_start] = False
        if req.question_kv == "cloud":
            streamed[prompt.context_end :] = False
        return streamed


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
        self.templates = TemplateCache(loaded)

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
        if not problems and header.template == "cloud":
            self.templates.check(header.template_hash, header.context_span[0])
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

    def template_cache(self, header: StreamHeader) -> DynamicCache | None:
        """A fresh cache over this cloud's template prefix KV when the header leaves the template to the cloud
        (computed once: TemplateCache); None when the template is streamed or empty."""
        if header.template != "cloud":
            return None
        keys, values = self.templates.kv()
        return DynamicCache([(k[None], v[None]) for k, v in zip(keys, values)]) if keys else None

    @torch.inference_mode()
    def extend(self, cache: DynamicCache | None, header: StreamHeader, positions: Sequence[int]) -> DynamicCache | None:
        """Run the header's tokens at `positions` (ascending absolute position ids) through this model on
        top of `cache` (None: an empty one) in one forward pass; returns the cache holding them too."""
        if not len(positions):
            return cache
        device = self.loaded.device
        kwargs = {
            "input_ids": torch.tensor([header.ids_at(positions)], device=device),
            "position_ids": torch.tensor([list(positions)], device=device),
            "use_cache": True,
        }
        if cache is not None:
            kwargs["cache"] = cache
        return self.loaded.model(**kwargs).cache

    def generate(
        self,
        cache,
        prompt_ids: Sequence[int] | None,
        context_span: tuple[int, int],
        max_new_tokens: int,
        mode: str,
        timings: Timings | None = None,
        received: DecodedKV | None = None,
        wire_bytes: int = 0,
        decoding: Decoding = GREEDY,
    ) -> Answer:
        """Feed the last prompt token on `cache` (all prompt positions but the last, or the received ones)
        at its absolute position and decode (greedy unless `decoding` samples). received: the stream the cache
        came from (its positions, the ones the cloud computed for it, and its bytes are the answer's); None:
        the cache holds the whole prompt. prompt_ids: the prompt's (None with `received`: its header's)."""
        prompt_len = len(prompt_ids) if received is None else received.header.n_prompt
        last = prompt_ids[-1] if received is None else received.header.ids_at([prompt_len - 1])[0]
        gen = generate(self.loaded.model, cache, last, prompt_len - 1, max_new_tokens, self.stop, decoding)
        return self.answer_of(gen, prompt_len, context_span, mode, timings, received, wire_bytes)

    def answer_of(
        self,
        gen: Generation,
        prompt_len: int,
        context_span: tuple[int, int],
        mode: str,
        timings: Timings | None = None,
        received: DecodedKV | None = None,
        wire_bytes: int = 0,
    ) -> Answer:
        """The Answer of a generation over a prompt of prompt_len (whichever engine ran it); received: the
        stream it came from, as in `generate`."""
        if timings is not None:
            timings.add("first_token", gen.first_token_s)
            timings.add("generate", gen.total_s)
        start, end = context_span
        if received is None:
            kept, context_kept, complete = prompt_len - 1, end - start, True
        else:
            kept, complete, wire_bytes = received.held, received.complete, received.wire_bytes
            context_kept = received.context_kept
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
