"""AnswerService: one /answer request from validation to the answer, in kv, scout or text mode."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kvwire.agent_common.edge_client import EdgeClient
from kvwire.agent_common.edge_messages import PrefillRequest
from kvwire.agent_common.errors import (
    DeadlineExceededError,
    EdgeBusyError,
    EdgeFailedError,
    EdgeUnavailableError,
    OverloadedError,
    ServiceError,
    ShuttingDownError,
)
from kvwire.agent_common.logs import log_event
from kvwire.agent_common.metrics import Metrics
from kvwire.cloud_agent.api import AnswerRequest, AnswerResponse, AutoChoice, TimingsMs
from kvwire.cloud_agent.auto import AUTO, CostModel, LineFit, Plan, QualityTable, RequestFacts, plan
from kvwire.cloud_agent.engines.base import Engine
from kvwire.cloud_agent.engines.registry import get_engine
from kvwire.cloud_agent.errors import classify, message_of
from kvwire.cloud_agent.settings import CloudSettings
from kvwire.cloud_agent.streaming import AnswerStream, TextStream
from kvwire.kvcodec.errors import ConfigError, FrameError, GeometryMismatchError, PromptTooLongError
from kvwire.kvcodec.generate import GREEDY, Decoding
from kvwire.kvcodec.models import LoadedModel
from kvwire.kvcodec.modes import get_mode
from kvwire.kvcodec.pipeline import Answer, Cloud, Timings, fp16_kv_bytes
from kvwire.kvcodec.prompt import build_prompt, model_window, user_token_ids
from kvwire.kvcodec.receiver import NothingToAnswerError
from kvwire.kvcodec.stream import DecodedKV

log = logging.getLogger("kvwire.cloud_agent")
EDGE_COMPUTE_STAGES = ("prefill", "question_prefill", "select", "encode")
# the edge stream's failures a request with fallback "text" survives; a wrong request (ConfigError,
# PromptTooLongError) or a model that cannot use the stream (GeometryMismatchError) is still the caller's to fix
FALLBACK_ERRORS = (EdgeUnavailableError, EdgeBusyError, EdgeFailedError, FrameError, DeadlineExceededError)
DOCUMENT_TIMEOUT_S = 10.0  # a document lookup is one small unary call (its text: the document's UTF-8 bytes)
WARM_UP_CONTEXT = "KVWire warms up its model with this sentence before it serves."
WARM_UP_QUESTION = "What does KVWire warm up?"
WARM_UP_TOKENS = 4
WARM_UP_LONG_POSITIONS = 192  # the second warm-up prompt: long enough to tell the per-position cost from the fixed one
# mode auto's link probe: a short kv stream at fp16, big enough (~20 KB per token on the embedded model) to
# measure the link's throughput, sent when auto has no recent measurement of it (docs/auto.md)
PROBE_CONTEXT = " ".join([WARM_UP_CONTEXT] * 8)
PROBE_AFTER_S = 60.0


@dataclasses.dataclass(frozen=True)
class RequestShape:
    """What validate() learnt of a request: its prompt length, the context text if it is here, the token
    counts of the context and of the question + template suffix, and the edge's document if it named one."""

    prompt_len: int
    text: str | None
    context_tokens: int
    question_tokens: int
    doc: object | None = None


def context_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class ReserveEstimator:
    """How long this cloud needs, once the edge stream is cut, to inject the KV and generate the answer.

    reserve = SAFETY x (setup[mode](positions) + step_s x max_new_tokens) + MARGIN_S, where setup[mode]
    is a line fitted (weighted to recent answers) to the measured seconds of the work between the
    stream and the first step (kv: building the cache; scout and text: the cloud's own prefill plus
    pruning) against the positions it covered, and step_s an EWMA of the seconds per generation step
    (one forward pass of one token). Every answer, in any mode, updates them; the warm-up measures
    text at two prompt lengths before the cloud serves. Until a mode is measured, scout and text
    stand in for each other and the priors assume a slow host. `fixed_ms` (--deadline-reserve-ms)
    replaces the estimate for cutting kv/scout streams.
    """

    ALPHA = 0.3  # weight of the newest measurement: follows a load change within a few requests
    PRIOR_STEP_S = 0.1
    PRIOR_POSITION_S = {"kv": 2e-4, "scout": 2e-3, "text": 2e-3}
    SAFETY = 1.15  # answers' speed varies a little from one to the next, and the host's load with them
    MARGIN_S = 0.05  # the HTTP reply and the scheduling around the forward passes
    # scout and text both prefill the whole prompt here: one's measurement stands in for the other's
    STAND_IN = {"scout": "text", "text": "scout"}

    def __init__(self, fixed_ms: int | None = None):
        self.fixed_s = None if fixed_ms is None else fixed_ms / 1000
        self.step_s: float | None = None
        self.setup: dict[str, LineFit] = {}
        self._lock = threading.Lock()

    def observe(self, mode: str, positions: int, setup_s: float, steps: int, generate_s: float) -> None:
        """Record one answer: `setup_s` for `positions` prompt positions, `generate_s` for `steps` forward steps."""
        with self._lock:
            if steps > 0:
                rate = generate_s / steps
                self.step_s = rate if self.step_s is None else (1 - self.ALPHA) * self.step_s + self.ALPHA * rate
            if positions > 0:
                self.setup.setdefault(mode, LineFit(self.ALPHA)).add(positions, setup_s)

    def setup_estimate(self, mode: str, positions: int) -> float:
        """Predicted seconds from the stream's end (or the request, in text mode) to the first generation step."""
        with self._lock:
            fit = self.setup.get(mode) or self.setup.get(self.STAND_IN.get(mode, mode))
            return fit.predict(positions) if fit is not None else self.PRIOR_POSITION_S[mode] * positions

    def generation_estimate(self, max_new_tokens: int) -> float:
        """Predicted seconds to generate an answer of max_new_tokens tokens."""
        with self._lock:
            step = self.step_s if self.step_s is not None else self.PRIOR_STEP_S
        return step * max_new_tokens

    def estimate(self, mode: str, positions: int, max_new_tokens: int) -> float:
        """Seconds to keep free before the deadline for a `mode` answer over `positions` prompt positions."""
        predicted = self.setup_estimate(mode, positions) + self.generation_estimate(max_new_tokens)
        return self.SAFETY * predicted + self.MARGIN_S

    def cut_reserve(self, mode: str, positions: int, max_new_tokens: int) -> float:
        """The reserve a kv/scout stream is cut with: the configured one, else the estimate."""
        return self.fixed_s if self.fixed_s is not None else self.estimate(mode, positions, max_new_tokens)


class AnswerService:
    """Serves /answer with one loaded model and one edge client.

    At most max_concurrency requests are in progress; one more is refused at once (OverloadedError,
    HTTP 429), never queued. Forward passes run one at a time on a worker thread (the model lock),
    so the event loop keeps answering /healthz, /metrics and refusals while a model runs.

    `clock` (seconds, monotonic) is what deadlines are counted on: a request's arrival, its cut and
    the time left for a fallback. Tests pass their own to decide what time it is; the gRPC call's
    timeout (the cut) is still real time, the budget this clock leaves.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        settings: CloudSettings,
        edge: EdgeClient,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        quality_table: QualityTable | None = None,
        engine: Engine | None = None,
    ):
        """engine: what generates the answers (None: the one settings.engine names, started here)."""
        self.loaded, self.settings, self.edge, self.metrics = loaded, settings, edge, metrics
        self.clock = clock
        self.cloud = engine.cloud if engine is not None else Cloud(loaded)
        self.engine = engine if engine is not None else get_engine(settings.engine)(self.cloud, settings)
        self.reserve = ReserveEstimator(settings.deadline_reserve_ms)
        self.costs = CostModel(self.reserve, clock)  # mode auto's estimates (docs/auto.md)
        self.quality_table: QualityTable | None = quality_table
        self._kv_refused = False  # a kv stream's header did not fit this model: auto stops choosing kv
        self._probing = threading.Lock()
        self.probe_thread: threading.Thread | None = None  # the latest link probe (tests join it)
        self.inflight = 0
        self.draining = False
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="cloud-work")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.close()

    def warm_up(self) -> dict:
        """Short text answers before serving: the first forward passes pay one-time costs (lazy
        initialisation, allocator growth), so the first answer is not measured; then one over a long
        prompt and one over a short one give the reserve estimate this host's fixed and per-position
        prefill cost and its step time, instead of its slow-host priors."""
        started = time.monotonic()
        window = model_window(self.loaded.model) or 1 << 20
        budget = min(WARM_UP_LONG_POSITIONS, window // 2, self.settings.max_context_tokens)
        sentence = len(user_token_ids(self.loaded.tokenizer, WARM_UP_CONTEXT + " "))
        long_context = " ".join([WARM_UP_CONTEXT] * max(1, budget // max(1, sentence)))
        steps = 0
        for context, measured in ((WARM_UP_CONTEXT, False), (long_context, True), (WARM_UP_CONTEXT, True)):
            timings = Timings()
            ans = self._answer_text(
                AnswerRequest(question=WARM_UP_QUESTION, context=context, mode="text", max_new_tokens=WARM_UP_TOKENS),
                timings,
            )
            steps += ans.generation.steps
            if measured:
                self._observe_speed(ans, timings)
        self.cloud.templates.kv()  # the template prefix KV a template_kv=cloud stream needs: computed once, now
        return {
            "seconds": round(time.monotonic() - started, 3),
            "steps": steps,
            "reserve_ms_for_32_tokens_256_positions": round(self.reserve.estimate("kv", 256, 32) * 1000),
            "text_reserve_ms_for_32_tokens_256_positions": round(self.reserve.estimate("text", 256, 32) * 1000),
        }

    def _admit(self) -> None:
        """Take a request slot, or refuse at once (shutting down, at max_concurrency). Call on the event
        loop: no await between the check and the count, so no race."""
        if self.draining:
            raise ShuttingDownError("cloud-agent is shutting down; retry later")
        if self.inflight >= self.settings.max_concurrency:
            raise OverloadedError(
                f"cloud-agent is at its limit of {self.settings.max_concurrency} concurrent requests; retry later"
            )
        self.inflight += 1
        self.metrics.inflight.inc()

    def _release(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.dec()

    def _failed(self, req: AnswerRequest, exc: Exception) -> str:
        outcome = classify(exc)[1]
        level = logging.ERROR if outcome == "error" else logging.WARNING
        log_event(log, "answer_failed", level, mode=req.mode, outcome=outcome, reason=str(exc))
        return outcome

    async def answer(self, req: AnswerRequest, request_id: str) -> AnswerResponse:
        arrived = self.clock()  # deadline_ms counts from here
        outcome = "error"
        try:
            self._admit()
            try:
                ctx = contextvars.copy_context()  # the request id travels into the worker thread's logs
                loop = asyncio.get_running_loop()
                response = await loop.run_in_executor(self._pool, ctx.run, self._answer, req, request_id, arrived)
            finally:
                self._release()
            outcome = "ok"
            return response
        except Exception as exc:
            outcome = self._failed(req, exc)
            raise
        finally:
            self.metrics.requests.labels(req.mode, outcome).inc()

    async def answer_stream(self, req: AnswerRequest, request_id: str) -> AnswerStream:
        """Start a streamed answer and wait for its first token; the request's errors until then raise
        here (so they get their status code). The slot is freed when the worker ends, not when the
        client leaves: a client that disconnects sets the stream's `cancelled`, and generation stops at
        its next token."""
        arrived = time.monotonic()
        try:
            self._admit()
        except Exception as exc:
            self.metrics.requests.labels(req.mode, self._failed(req, exc)).inc()
            raise
        loop = asyncio.get_running_loop()
        stream = AnswerStream(loop)
        ctx = contextvars.copy_context()
        work = loop.run_in_executor(self._pool, ctx.run, self._answer_streamed, req, request_id, arrived, stream)
        work.add_done_callback(lambda _: self._release())
        await stream.first()
        return stream

    def _answer_streamed(self, req: AnswerRequest, request_id: str, arrived: float, stream: AnswerStream) -> None:
        outcome = "error"
        try:
            response = self._answer(req, request_id, arrived, stream)
            outcome = "cancelled" if response.finish_reason == "cancelled" else "ok"
            stream.finish(response)
        except Exception as exc:
            outcome = self._failed(req, exc)
            stream.fail(exc)
        finally:
            self.metrics.requests.labels(req.mode, outcome).inc()

    async def ready(self) -> tuple[bool, dict]:
        """(ready, details): the model is loaded (always, once serving), the engine can answer (a vLLM worker
        is alive) and the edge answers its health check."""
        info = {"model": self.loaded.source, "edge": self.edge.address}
        if self.draining:
            return False, {**info, "reason": "shutting down"}
        problem = self.engine.problem()
        if problem is not None:
            return False, {**info, "reason": problem}
        try:
            await asyncio.to_thread(self.edge.check_health, self.settings.readyz_timeout_s)
        except ServiceError as exc:
            return False, {**info, "reason": str(exc)}
        return True, info

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token of this tokenizer stands for (+1: a word-start marker decoded away)."""
        tokenizer = self.loaded.tokenizer
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        return max(len(p.encode("utf-8", "surrogatepass")) for p in pieces) + 1

    def validate(self, req: AnswerRequest, request_id: str = "") -> tuple[int, str | None]:
        """ConfigError (422) / PromptTooLongError (413) for what this cloud owns (its limits, its model's
        window) before any work; returns (prompt length, the context text). Names the edge owns (selector,
        profile) go to the edge, whose refusal comes back as a 422 with its message.

        With a doc_id the edge describes the document (DocumentNotFoundError, 404, if it has none) and
        sends its text only in text mode; a streamed mode's context text stays on the edge (None)."""
        shape = self.shape(req, request_id, include_text=req.mode != AUTO and not get_mode(req.mode).streamed)
        return shape.prompt_len, shape.text

    def shape(self, req: AnswerRequest, request_id: str = "", include_text: bool = False) -> RequestShape:
        """validate()'s checks, and what they learnt (RequestShape)."""
        if req.heads and self.engine.name != "hf":  # a cache per head needs the hf engine's masked attention
            raise ConfigError(
                f"heads (a position set per KV head) needs --engine hf; this cloud runs {self.engine.name}"
            )
        if req.max_new_tokens > self.settings.max_new_tokens:
            raise ConfigError(
                f"max_new_tokens={req.max_new_tokens} is above this cloud-agent's limit of {self.settings.max_new_tokens}"
            )
        tokenizer, window = self.loaded.tokenizer, model_window(self.loaded.model)
        doc = None
        if req.doc_id is None:
            text = req.context
            # no token holds more than max_token_bytes bytes: a context that long in bytes is over the limit
            # without tokenizing it (a 4 MiB body would otherwise be tokenized in full before its 413)
            at_least = -(-len(text.encode("utf-8", "surrogatepass")) // self.max_token_bytes)
            if at_least > self.settings.max_context_tokens:
                raise PromptTooLongError(
                    f"the context is at least {at_least} tokens; this cloud-agent accepts at most "
                    f"{self.settings.max_context_tokens} (--max-context-tokens)"
                )
            context_tokens = len(user_token_ids(tokenizer, text))
        else:
            doc = self._document(req.doc_id, include_text, request_id)
            text, context_tokens = doc.text, doc.tokens
        if context_tokens > self.settings.max_context_tokens:
            raise PromptTooLongError(
                f"the context is {context_tokens} tokens; this cloud-agent accepts at most "
                f"{self.settings.max_context_tokens} (--max-context-tokens)"
            )
        if text is not None:
            prompt = build_prompt(tokenizer, text, req.question, max_len=window)
            return RequestShape(len(prompt), text, context_tokens, len(prompt) - prompt.context_end, doc)
        # the document's tokens plus the template and question around a one-token stand-in
        stand_in = build_prompt(tokenizer, ".", req.question, max_len=window)
        questions = len(stand_in) - stand_in.context_end
        return RequestShape(len(stand_in) - 1 + context_tokens, None, context_tokens, questions, doc)

    def _document(self, doc_id: str, include_text: bool, request_id: str = ""):
        return self.edge.get_document(doc_id, include_text, DOCUMENT_TIMEOUT_S, request_id)

    def _decoding(self, req: AnswerRequest, stream: AnswerStream | None) -> tuple[Decoding, TextStream]:
        """How this request's tokens are chosen, and the text stream that sees them (stop strings, the
        stream's deltas). Without stop strings or a stream no callback runs: plain greedy stays plain."""
        text = TextStream(
            self.loaded.tokenizer,
            req.stop,
            emit=stream.token if stream else None,
            cancelled=stream.cancelled if stream else None,
        )
        on_token = text.push if (req.stop or stream) else None
        return Decoding(req.temperature, req.top_p, req.seed, on_token), text

    def _answer(
        self, req: AnswerRequest, request_id: str, arrived: float, stream: AnswerStream | None = None
    ) -> AnswerResponse:
        if "max_new_tokens" not in req.model_fields_set and req.max_new_tokens > self.settings.max_new_tokens:
            req = req.model_copy(update={"max_new_tokens": self.settings.max_new_tokens})  # the default fits the limit
        deadline_at = arrived + (req.deadline_ms or self.settings.default_deadline_ms) / 1000
        timings = Timings()
        auto_plan = None
        if req.mode == AUTO:
            shape = self.shape(req, request_id)
            req, auto_plan = self._choose(req, shape)
            prompt_len, text = shape.prompt_len, shape.text  # text mode on a document fetches its text
        else:
            prompt_len, text = self.validate(req, request_id)
        decoding, said = self._decoding(req, stream)
        edge_ms: dict[str, float] = {}
        fallback_reason = None
        if not get_mode(req.mode).streamed:
            if req.deadline_ms is not None:  # an explicit deadline bounds text mode too: refused if it cannot fit
                self._refuse_text_unless_it_fits(req, prompt_len, deadline_at)
            ans = self._answer_text(req, timings, text, decoding)
        else:
            try:
                decoded, edge_ms = self._receive(req, request_id, timings, prompt_len, deadline_at)
            except FALLBACK_ERRORS as exc:
                fallback_reason = self._fall_back_or_raise(
                    req, exc, prompt_len, deadline_at
                )  # re-raises without a fallback
                timings = Timings()  # the failed stream's stages are not this answer's
                ans = self._answer_text(req, timings, text, decoding)
            else:
                ans = self.engine.answer(
                    decoded, req.max_new_tokens, timings, {"scout_prefill": req.scout_prefill}, decoding
                )
                self.metrics.wire_ratio.labels(req.mode).observe(ans.wire_ratio)
                self.metrics.retention_achieved.labels(req.mode).observe(ans.retention_achieved)
                if not ans.complete:
                    self.metrics.partial_answers.labels(req.mode).inc()
        timings.add("total", self.clock() - arrived)
        self._observe_speed(ans, timings)
        self.metrics.observe_stages(ans.mode, timings.values)
        final = said.final(ans.text)
        if stream is not None and said.rest(final):
            stream.token(len(ans.tokens), said.rest(final))  # the text the last token settled
        finish = "stop" if said.stopped else ans.generation.finish_reason
        ans = dataclasses.replace(ans, text=final)
        response = self._response(ans, request_id, timings, edge_ms, fallback_reason, finish)
        if auto_plan is not None:
            response.auto = AutoChoice.model_validate(auto_plan.describe())
            predicted = auto_plan.chosen.ttft_s
            if predicted > 0:
                measured = response.timings_ms.time_to_first_token / 1000
                self.metrics.auto_prediction_ratio.labels(ans.mode).observe(measured / predicted)
        log_event(
            log,
            "answer",
            mode=ans.mode,
            bytes_on_wire=ans.bytes_on_wire,
            wire_ratio=round(ans.wire_ratio, 5),
            kept_positions=ans.kept_positions,
            context_tokens=ans.context_tokens,
            answer_tokens=len(ans.tokens),
            complete=ans.complete,
            retention_achieved=response.retention_achieved,
            fallback=response.fallback,
            finish_reason=finish,
            timings_ms=response.timings_ms.model_dump(),
        )
        return response

    def _choose(self, req: AnswerRequest, shape: RequestShape) -> tuple[AnswerRequest, Plan]:
        """Mode auto: the setting this request is answered with (docs/auto.md), as a concrete request."""
        context_bytes = shape.doc.bytes if shape.doc is not None else len(shape.text.encode("utf-8", "surrogatepass"))
        held = bool(shape.doc.cached) if shape.doc is not None else self.costs.holds_context(context_key(shape.text))
        facts = RequestFacts(
            prompt_tokens=shape.prompt_len,
            context_tokens=shape.context_tokens,
            question_tokens=shape.question_tokens,
            context_bytes=context_bytes,
            question_bytes=len(req.question.encode("utf-8", "surrogatepass")),
            fp16_kv_bytes=fp16_kv_bytes(self.cloud.geometry, shape.prompt_len),
            max_new_tokens=req.max_new_tokens,
            doc_id=req.doc_id,
            edge_holds_prefix=held,
        )
        chosen = plan(
            self.costs,
            self.quality_table,
            facts,
            req.min_quality,
            req.deadline_ms / 1000 if req.deadline_ms is not None else None,
            allowed=lambda setting: not (setting.mode == "kv" and self._kv_refused),
        )
        self._probe_if_stale()
        setting = chosen.chosen.candidate.setting
        update = {"mode": setting.mode}
        if setting.mode != "text":
            update.update(selector=setting.selector, retention=setting.retention, profile=setting.profile)
            if "fallback" not in req.model_fields_set:  # text is auto's own candidate: a failed stream falls back
                update["fallback"] = "text"
            if setting.scout_prefill is not None:
                update["scout_prefill"] = setting.scout_prefill
        self.metrics.auto_choices.labels(setting.mode).inc()
        log_event(
            log,
            "auto_choice",
            chose=setting.label(),
            predicted_ttft_ms={p.candidate.setting.label(): round(p.ttft_s * 1000) for p in chosen.predictions},
            edge_holds_prefix=held,
            known=self.costs.known(),
        )
        return req.model_copy(update=update), chosen

    def _probe_if_stale(self) -> None:
        """Measure the link in the background when mode auto has no recent measurement of it: the edge's health
        check's round trip (latency) and one short fp16 kv stream (throughput, and the edge's prefill rate)."""
        age = self.costs.link.age_s()
        if (age is not None and age < PROBE_AFTER_S) or self.quality_table is None:
            return
        if not self._probing.acquire(blocking=False):
            return  # one probe at a time

        def probe() -> None:
            try:
                started = time.perf_counter()
                self.edge.check_health(self.settings.readyz_timeout_s)
                self.costs.link.observe_rtt(time.perf_counter() - started)
                req = AnswerRequest(
                    question=WARM_UP_QUESTION, context=PROBE_CONTEXT, mode="kv", profile="fp16", max_new_tokens=1
                )
                shape = self.shape(req)
                self._receive(req, "auto-probe", Timings(), shape.prompt_len, self.clock() + 30.0)
                log_event(log, "auto_probe", link_ms_per_mb=round(self.costs.link.predict(1 << 20) * 1000, 1))
            except Exception as exc:  # a probe that fails leaves the estimates as they were
                log_event(log, "auto_probe_failed", logging.WARNING, reason=str(exc))
            finally:
                self._probing.release()

        self.probe_thread = threading.Thread(target=probe, name="auto-probe", daemon=True)
        self.probe_thread.start()

    def _answer_text(
        self, req: AnswerRequest, timings: Timings, text: str | None = None, decoding: Decoding = GREEDY
    ) -> Answer:
        """Text mode: the context text (a document's is fetched from the edge, and counted as crossing)."""
        if text is None:
            text = req.context if req.doc_id is None else self._document(req.doc_id, True).text
        return self.engine.answer_text(text, req.question, req.max_new_tokens, timings, decoding)

    def _refuse_text_unless_it_fits(self, req: AnswerRequest, prompt_len: int, deadline_at: float) -> None:
        """DeadlineExceededError (504) at once when a text answer is estimated not to fit before the deadline."""
        need = self.reserve.estimate("text", prompt_len, req.max_new_tokens)
        left = deadline_at - time.monotonic()
        if need > left:
            raise DeadlineExceededError(
                f"deadline_ms={req.deadline_ms} is too short for a text answer: it needs about {need * 1000:.0f} ms "
                f"({prompt_len} prompt positions, {req.max_new_tokens} new tokens at this cloud's measured speed) "
                f"and {max(0.0, left) * 1000:.0f} ms are left; raise deadline_ms or lower max_new_tokens"
            )

    def _fall_back_or_raise(self, req: AnswerRequest, exc: Exception, prompt_len: int, deadline_at: float) -> str:
        """Why a failed kv/scout request is answered in text mode; re-raises `exc` when it may not be:
        the request did not ask for a fallback, or the text answer would not fit before the deadline."""
        outcome = classify(exc)[1]
        if req.fallback != "text":
            raise exc
        need = self.reserve.estimate("text", prompt_len, req.max_new_tokens)
        left = deadline_at - self.clock()
        if need > left:
            log_event(
                log,
                "fallback_refused",
                logging.WARNING,
                mode=req.mode,
                reason=outcome,
                needed_ms=round(need * 1000),
                left_ms=round(left * 1000),
            )
            exc.args = (
                f"{exc}; the requested text fallback was tried and refused: it needs about {need * 1000:.0f} ms "
                f"and {max(0.0, left) * 1000:.0f} ms of the deadline are left",
            )
            raise exc
        self.metrics.fallbacks.labels(req.mode, outcome).inc()
        log_event(log, "fallback", logging.WARNING, mode=req.mode, reason=outcome, detail=str(exc))
        return f"{outcome}: {message_of(exc)}"

    def _observe_speed(self, ans: Answer, timings: Timings) -> None:
        """Feed this answer's own speed to the reserve estimate (docs/anytime.md)."""
        values = timings.values
        positions = get_mode(ans.mode).setup_positions(ans.prompt_len, ans.kept_positions)
        self.reserve.observe(
            ans.mode,
            positions,
            values.get("inject", 0.0) + values.get("prefill", 0.0),
            ans.generation.steps,
            ans.generation.total_s,
        )

    def _receive(
        self, req: AnswerRequest, request_id: str, timings: Timings, prompt_len: int, deadline_at: float
    ) -> tuple[DecodedKV, dict[str, float]]:
        """Stream the edge's frames into a decoder until the trailer or the cut (deadline - reserve);
        refuse an incompatible header before any KV is decoded. A cut stream yields the positions that
        arrived when the template and question positions did (DeadlineExceededError otherwise)."""
        positions = get_mode(req.mode).setup_positions(prompt_len, prompt_len - 1)
        reserve_s = self.reserve.cut_reserve(req.mode, positions, req.max_new_tokens)
        deadline_ms = req.deadline_ms or self.settings.default_deadline_ms
        budget_s = deadline_at - reserve_s - self.clock()
        if budget_s <= 0:
            raise DeadlineExceededError(
                f"deadline_ms={deadline_ms} leaves no time for the edge stream: "
                f"this cloud keeps {reserve_s * 1000:.0f} ms before the deadline to inject and generate "
                f"{req.max_new_tokens} tokens (docs/anytime.md); raise deadline_ms or lower max_new_tokens"
            )
        request = PrefillRequest(
            request_id=request_id,
            mode=req.mode,
            context=req.context or "",
            doc_id=req.doc_id or "",
            question=req.question,
            selector=req.selector,
            retention=req.retention,
            profile=req.profile or "",
            template_kv=req.template_kv,
            question_kv=req.question_kv,
            scout_prefill=req.scout_prefill,
            heads=req.heads or "",
            confirm=True,
        )  # the edge counts the stream ok once this cloud confirms it
        # the header is checked against this model as it arrives (GeometryMismatchError -> 409, closing the stream)
        receiver = self.cloud.receiver(
            expect_mode=req.mode,
            on_frame=lambda kind, n: self.metrics.bytes.labels(req.mode, kind).inc(n),  # every byte read off the wire
            on_reject=lambda reason: self.metrics.frames_rejected.labels(reason).inc(),
        )
        edge_ms: dict[str, float] = {}
        started = time.perf_counter()
        # the call's own deadline is the cut: gRPC stops the blocked read then and cancels the edge's stream
        stream = self.edge.prefill(request, timeout_s=budget_s)
        try:
            for msg in stream:
                if msg.frame is None:
                    edge_ms = msg.timings_ms
                else:
                    receiver.feed(msg.frame)
        except DeadlineExceededError:
            receiver.cut()
        except GeometryMismatchError:
            if req.mode == "kv":
                self._kv_refused = True  # the edge's KV does not fit this model: auto stops choosing kv
            raise
        finally:
            stream.close()  # cancels the edge's stream if we stopped early
        try:
            decoded = receiver.result()
        except NothingToAnswerError as exc:
            raise DeadlineExceededError(
                f"the edge stream was cut {reserve_s * 1000:.0f} ms before the deadline of {deadline_ms} ms "
                f"(time kept to answer), {exc}"
            ) from None
        if receiver.was_cut:
            log_event(
                log,
                "stream_cut",
                mode=req.mode,
                reserve_ms=round(reserve_s * 1000),
                frames=decoded.frames,
                kept_positions=len(decoded.positions),
                announced_positions=len(decoded.header.kept),
                complete=decoded.complete,
            )
        edge_compute = sum(edge_ms.get(stage, 0.0) for stage in EDGE_COMPUTE_STAGES) / 1000
        transfer_s = max(0.0, time.perf_counter() - started - receiver.decode_s - edge_compute)
        timings.add("decode", receiver.decode_s)
        timings.add("transfer", transfer_s)
        self._observe_stream(req, decoded, edge_ms, transfer_s, receiver.decode_s)
        return decoded, edge_ms

    def _observe_stream(
        self, req: AnswerRequest, decoded: DecodedKV, edge_ms: dict, transfer_s: float, decode_s: float
    ) -> None:
        """Feed mode auto's cost model with one stream's measurements (every stream, whatever asked for it)."""
        h = decoded.header
        start, end = h.context_span
        if decoded.complete:  # a cut stream's transfer time is the cut's, not the link's
            self.costs.observe_transfer(decoded.wire_bytes, transfer_s)
            self.costs.observe_decode(decoded.wire_bytes, decode_s)
        self.costs.observe_edge(req.mode, edge_ms, h.prompt_len, h.prompt_len - end, end - start)
        # the edge keys its prefix cache by the prompt: a hit is a stream with only the question prefilled
        hit = edge_ms.get("prefill", 0.0) == 0 and edge_ms.get("question_prefill", 0.0) > 0
        if req.context is not None or hit:
            self.costs.observe_context(context_key(req.context) if req.context is not None else None, hit)

    def _response(
        self,
        ans: Answer,
        request_id: str,
        timings: Timings,
        edge_ms: dict,
        fallback_reason: str | None,
        finish_reason: str = "stop",
    ) -> AnswerResponse:
        ms = timings.ms()
        # the first token existed `generate - first_token` before generation ended, which `total` marks
        to_first = ms.get("total", 0.0) - ms.get("generate", 0.0) + ms.get("first_token", 0.0)
        return AnswerResponse(
            answer=ans.text,
            mode=ans.mode,
            bytes_on_wire=ans.bytes_on_wire,
            wire_ratio=round(ans.wire_ratio, 6),
            kept_positions=ans.kept_positions,
            context_tokens=ans.context_tokens,
            prompt_tokens=ans.prompt_len,
            request_id=request_id,
            complete=ans.complete,
            retention_achieved=round(ans.retention_achieved, 6),
            fallback="text" if fallback_reason else None,
            fallback_reason=fallback_reason,
            answer_tokens=len(ans.tokens),
            finish_reason=finish_reason,
            timings_ms=TimingsMs(
                time_to_first_token=round(to_first, 3),
                edge_prefill=edge_ms.get("prefill", 0.0) + edge_ms.get("question_prefill", 0.0),
                edge_question_prefill=edge_ms.get("question_prefill", 0.0),
                select=edge_ms.get("select", 0.0),
                encode=edge_ms.get("encode", 0.0),
                **{
                    k: ms.get(k, 0.0)
                    for k in ("transfer", "decode", "inject", "prefill", "first_token", "generate", "total")
                },
            ),
        )
