"""EdgeService.Prefill: build the prompt, prefill, select, encode, and stream the frames."""
from __future__ import annotations

import itertools
import logging
import threading
import time

from agent_common.errors import OverloadedError, ShuttingDownError
from agent_common.logs import log_event
from agent_common.metrics import Metrics
from edge_agent.messages import PrefillReply, PrefillRequest
from edge_agent.settings import EdgeSettings
from kvcodec.errors import ConfigError
from kvcodec.models import LoadedModel
from kvcodec.pipeline import Edge, EdgeRequest, Timings
from kvcodec.profiles import PrecisionProfile, get_profile, profile_names
from kvcodec.wire import peek_type
from proto import kvwire_pb2_grpc

log = logging.getLogger("edge_agent")


class EdgeServicer(kvwire_pb2_grpc.EdgeServiceServicer):
    """Serves Prefill streams from one loaded model.

    Forward passes run one at a time (the model lock): concurrent prefills on one model gain nothing
    on a CPU and would share the attention-capture switch. Up to max_concurrency streams may be in
    progress (waiting for the lock or streaming); more are refused at once.
    """

    def __init__(self, loaded: LoadedModel, settings: EdgeSettings, metrics: Metrics):
        self.edge = Edge(loaded)
        self.settings, self.metrics = settings, metrics
        # the configured profile is read once, and must fit the model: a start-up error, not a per-request one
        self.default_profile: PrecisionProfile = get_profile(settings.profile)
        self.default_profile.resolve(self.edge.geometry["num_layers"], self.edge.geometry["head_dim"])
        self._slots = threading.BoundedSemaphore(settings.max_concurrency)
        self._model_lock = threading.Lock()
        self.draining = False

    def profile_for(self, name: str) -> PrecisionProfile | str:
        """A request names a built-in profile, the configured one by its name, or none (the configured one).

        Requests never name files: only the operator chooses what the edge reads from disk.
        """
        if not name or name == self.default_profile.name:
            return self.default_profile
        if name in profile_names():
            return name
        allowed = list(dict.fromkeys([*profile_names(), self.default_profile.name]))
        raise ConfigError(f"unknown profile {name!r}; allowed: {', '.join(allowed)}")

    def Prefill(self, request, context):
        req = PrefillRequest.from_pb(request)
        if self.draining:
            raise ShuttingDownError("edge-agent is shutting down; retry against another edge or later")
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(f"edge-agent is at its limit of {self.settings.max_concurrency} concurrent prefill streams")
        try:
            yield from self._stream(req, context)
        finally:
            self._slots.release()

    def _stream(self, req: PrefillRequest, context):
        started = time.perf_counter()
        profile = self.profile_for(req.profile)
        edge_req = EdgeRequest(context=req.context, question=req.question, mode=req.mode, selector=req.selector or "q2c",
                               retention=req.retention, profile=profile, compress=req.compress,
                               chunk_bytes=req.chunk_bytes or self.settings.chunk_bytes)
        self.edge.validate(edge_req)
        timings = Timings()
        frames = self.edge.stream(edge_req, timings)
        with self._model_lock:
            if not context.is_active():  # the caller gave up while this request waited for the model
                return
            first = next(frames)  # the forward pass and selection run here; chunks are encoded lazily after
        sent = count = 0
        for frame in itertools.chain([first], frames):
            yield PrefillReply(req.request_id, frame=frame).to_pb()
            # counted once gRPC has taken the message: bytes actually written to the stream
            self.metrics.bytes.labels(req.mode, peek_type(frame)).inc(len(frame))
            sent, count = sent + len(frame), count + 1
        timings.add("total", time.perf_counter() - started)
        self.metrics.observe_stages(req.mode, timings.values)
        yield PrefillReply(req.request_id, timings_ms=timings.ms()).to_pb()
        log_event(log, "prefill", mode=req.mode, selector=edge_req.selector, retention=req.retention,
                  profile=profile if isinstance(profile, str) else profile.name, frames=count, bytes=sent,
                  timings_ms=timings.ms())
