"""AnswerService: one /answer request from validation to the answer, in kv, scout or text mode."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from agent_common.errors import OverloadedError, ServiceError, ShuttingDownError
from agent_common.logs import log_event
from agent_common.metrics import Metrics
from cloud_agent.api import AnswerRequest, AnswerResponse, TimingsMs
from cloud_agent.errors import classify
from cloud_agent.settings import CloudSettings
from edge_agent.client import EdgeClient
from edge_agent.messages import PrefillRequest
from kvcodec.errors import ConfigError, FrameError, PromptTooLongError
from kvcodec.models import LoadedModel
from kvcodec.pipeline import Answer, Cloud, Timings
from kvcodec.profiles import profile_names
from kvcodec.prompt import build_prompt, model_window
from kvcodec.selectors import get_selector
from kvcodec.stream import DecodedKV
from kvcodec.wire import FRAME_TYPES

log = logging.getLogger("cloud_agent")
EDGE_COMPUTE_STAGES = ("prefill", "select", "encode")


class AnswerService:
    """Serves /answer with one loaded model and one edge client.

    At most max_concurrency requests are in progress; one more is refused at once (OverloadedError,
    HTTP 429), never queued. Forward passes run one at a time on a worker thread (the model lock),
    so the event loop keeps answering /healthz, /metrics and refusals while a model runs.
    """

    def __init__(self, loaded: LoadedModel, settings: CloudSettings, edge: EdgeClient, metrics: Metrics):
        self.loaded, self.settings, self.edge, self.metrics = loaded, settings, edge, metrics
        self.cloud = Cloud(loaded)
        self.inflight = 0
        self.draining = False
        self._model_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="cloud-work")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def answer(self, req: AnswerRequest, request_id: str) -> AnswerResponse:
        outcome = "error"
        try:
            if self.draining:
                raise ShuttingDownError("cloud-agent is shutting down; retry later")
            if self.inflight >= self.settings.max_concurrency:
                raise OverloadedError(f"cloud-agent is at its limit of {self.settings.max_concurrency} concurrent requests; retry later")
            self.inflight += 1  # no await between the check and this line: no race on the event loop
            self.metrics.inflight.inc()
            try:
                ctx = contextvars.copy_context()  # the request id travels into the worker thread's logs
                loop = asyncio.get_running_loop()
                response = await loop.run_in_executor(self._pool, ctx.run, self._answer, req, request_id)
            finally:
                self.inflight -= 1
                self.metrics.inflight.dec()
            outcome = "ok"
            return response
        except Exception as exc:
            outcome = classify(exc)[1]
            level = logging.ERROR if outcome == "error" else logging.WARNING
            log_event(log, "answer_failed", level, mode=req.mode, outcome=outcome, reason=str(exc))
            raise
        finally:
            self.metrics.requests.labels(req.mode, outcome).inc()

    async def ready(self) -> tuple[bool, dict]:
        """(ready, details): the model is loaded (always, once serving) and the edge answers its health check."""
        info = {"model": self.loaded.source, "edge": self.edge.address}
        if self.draining:
            return False, {**info, "reason": "shutting down"}
        try:
            await asyncio.to_thread(self.edge.check_health, self.settings.readyz_timeout_s)
        except ServiceError as exc:
            return False, {**info, "reason": str(exc)}
        return True, info

    def validate(self, req: AnswerRequest) -> int:
        """ConfigError (422) / PromptTooLongError (413) before any work; returns the prompt length."""
        get_selector(req.selector)  # names the allowed selectors when unknown
        if req.profile is not None and req.profile not in profile_names():
            raise ConfigError(f"unknown profile {req.profile!r}; allowed: {', '.join(profile_names())} "
                              "(or leave it out to use the edge's configured --profile)")
        if req.max_new_tokens > self.settings.max_new_tokens:
            raise ConfigError(f"max_new_tokens={req.max_new_tokens} is above this cloud-agent's limit of {self.settings.max_new_tokens}")
        tokenizer = self.loaded.tokenizer
        context_tokens = len(tokenizer(req.context, add_special_tokens=False)["input_ids"])
        if context_tokens > self.settings.max_context_tokens:
            raise PromptTooLongError(f"the context is {context_tokens} tokens; this cloud-agent accepts at most "
                                     f"{self.settings.max_context_tokens} (--max-context-tokens)")
        return len(build_prompt(tokenizer, req.context, req.question, max_len=model_window(self.loaded.model)))

    def _answer(self, req: AnswerRequest, request_id: str) -> AnswerResponse:
        started = time.perf_counter()
        timings = Timings()
        self.validate(req)
        edge_ms: dict[str, float] = {}
        if req.mode == "text":
            with self._model_lock:
                ans = self.cloud.answer_text(req.context, req.question, req.max_new_tokens, timings)
        else:
            decoded, edge_ms = self._receive(req, request_id, timings)
            answer_fn = self.cloud.answer_kv if req.mode == "kv" else self.cloud.answer_scout
            with self._model_lock:
                ans = answer_fn(decoded, req.max_new_tokens, timings)
            self.metrics.wire_ratio.labels(req.mode).observe(ans.wire_ratio)
        timings.add("total", time.perf_counter() - started)
        self.metrics.observe_stages(req.mode, timings.values)
        response = self._response(req, request_id, ans, timings, edge_ms)
        log_event(log, "answer", mode=req.mode, bytes_on_wire=ans.bytes_on_wire, wire_ratio=round(ans.wire_ratio, 5),
                  kept_positions=ans.kept_positions, context_tokens=ans.context_tokens, answer_tokens=len(ans.tokens),
                  timings_ms=response.timings_ms.model_dump())
        return response

    def _receive(self, req: AnswerRequest, request_id: str, timings: Timings) -> tuple[DecodedKV, dict[str, float]]:
        """Stream the edge's frames into a decoder; refuse an incompatible header before any KV is decoded."""
        deadline_s = (req.deadline_ms or self.settings.default_deadline_ms) / 1000
        request = PrefillRequest(request_id=request_id, mode=req.mode, context=req.context, question=req.question,
                                 selector=req.selector, retention=req.retention, profile=req.profile or "")
        decoder = self.cloud.decoder()
        edge_ms: dict[str, float] = {}
        decode_s = 0.0
        started = time.perf_counter()
        stream = self.edge.prefill(request, timeout_s=deadline_s)
        try:
            for msg in stream:
                if msg.frame is None:
                    edge_ms = msg.timings_ms
                    continue
                t = time.perf_counter()
                kind = "rejected"
                try:
                    kind = FRAME_TYPES[decoder.feed(msg.frame)]
                    if kind == "header":
                        if decoder.header.mode != req.mode:
                            raise FrameError("wrong_mode", f"asked for a {req.mode} stream, the edge sent a {decoder.header.mode} stream")
                        self.cloud.check_compatible(decoder.header)  # GeometryMismatchError -> 409; closes the stream
                except FrameError as exc:
                    self.metrics.frames_rejected.labels(exc.reason).inc()
                    raise
                finally:
                    self.metrics.bytes.labels(req.mode, kind).inc(len(msg.frame))  # every byte read off the wire
                    decode_s += time.perf_counter() - t
        finally:
            stream.close()  # cancels the edge's stream if we stopped early
        try:
            decoded = decoder.result()
        except FrameError as exc:
            self.metrics.frames_rejected.labels(exc.reason).inc()
            raise
        edge_compute = sum(edge_ms.get(stage, 0.0) for stage in EDGE_COMPUTE_STAGES) / 1000
        timings.add("decode", decode_s)
        timings.add("transfer", max(0.0, time.perf_counter() - started - decode_s - edge_compute))
        return decoded, edge_ms

    def _response(self, req: AnswerRequest, request_id: str, ans: Answer, timings: Timings, edge_ms: dict) -> AnswerResponse:
        ms = timings.ms()
        return AnswerResponse(
            answer=ans.text, mode=req.mode, bytes_on_wire=ans.bytes_on_wire, wire_ratio=round(ans.wire_ratio, 6),
            kept_positions=ans.kept_positions, context_tokens=ans.context_tokens, prompt_tokens=ans.prompt_len,
            request_id=request_id,
            timings_ms=TimingsMs(
                edge_prefill=edge_ms.get("prefill", 0.0), select=edge_ms.get("select", 0.0), encode=edge_ms.get("encode", 0.0),
                **{k: ms.get(k, 0.0) for k in ("transfer", "decode", "inject", "prefill", "first_token", "generate", "total")},
            ),
        )
