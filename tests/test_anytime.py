"""Importance-ordered anytime streaming (docs/anytime.md): chunk order, answers from a cut stream,
deadline_ms as the whole request's deadline, fallback "text", and the metrics that count them.

No outcome here depends on the host's speed. The in-process tests run the real AnswerService on a
FakeClock against a real gRPC edge (SlowEdge) that sends a precomputed stream and holds it where the
test says, so what arrives before a cut is fixed; the daemon tests run both agents as subprocesses:
a cloud daemon is cut on a SlowEdge holding its stream (the cut stream carries the same frames
whenever the cut comes), and bench.relay stalls or resets the real edge's link. Latencies are
benchmark figures (docs/anytime.md), not asserted.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import torch
from edges import REPO
from test_daemons import CONTEXT as DAEMON_CONTEXT
from test_daemons import EDGE_SERVER_OPTIONS, SAFETY_S, _start, metric_samples, ok, total
from test_daemons import QUESTION as DAEMON_QUESTION

from kvwire.agent_common.edge_client import EdgeClient
from kvwire.agent_common.edge_messages import PrefillReply, PrefillRequest
from kvwire.agent_common.errors import DeadlineExceededError
from kvwire.agent_common.metrics import Metrics
from kvwire.cloud_agent.api import AnswerRequest
from kvwire.cloud_agent.service import AnswerService, ReserveEstimator
from kvwire.cloud_agent.settings import CloudSettings
from kvwire.kvcodec.errors import FrameError
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest
from kvwire.kvcodec.prefill import prefill
from kvwire.kvcodec.profiles import get_profile
from kvwire.kvcodec.selectors import get_selector, selector_names
from kvwire.kvcodec.stream import StreamDecoder, StreamEncoder, StreamHeader
from kvwire.kvcodec.wire import CHUNK, parse_frame
from kvwire.proto import kvwire_pb2_grpc

CONTEXT = (
    "The Normans gave their name to Normandy, a region in France. They were descended from Norse raiders "
    "from Denmark, Iceland and Norway. Their leader was Rollo. The Eiffel Tower is in Paris. It was built in 1889."
)
QUESTION = "Who was the leader of the Norse raiders?"


def chunk_positions(frames: list[bytes]) -> list[list[int]]:
    """The positions each chunk frame carries, in the order the frames were sent."""
    dec, seen, out = StreamDecoder(), set(), []
    for frame in frames[:-1]:  # without the trailer: partial() shows what each chunk added
        dec.feed(frame)
        if parse_frame(frame).kind == CHUNK:
            now = set(dec.partial().positions.tolist())
            out.append(sorted(now - seen))
            seen = now
    return out


# --- order and correctness of partial streams (no daemons) ---------------------------------------


@pytest.mark.parametrize("name", selector_names())
@pytest.mark.parametrize("retention", [0.5, 1.0])
def test_chunks_send_template_and_question_first_then_context_by_descending_score(tiny_loaded, name, retention):
    edge = Edge(tiny_loaded)
    req = EdgeRequest(CONTEXT, QUESTION, "kv", name, retention, "int8", chunk_bytes=600)
    chunks = chunk_positions(list(edge.stream(req)))
    assert len(chunks) > 4
    prompt = edge.prompt(req)
    selector = get_selector(name)
    scores = selector.score(edge.score_inputs(prompt, selector, edge.prefill(prompt, selector))).float()
    if scores.dim() == 3:  # per-(layer, head) scores (kvzip): a one-set stream ranks by their reduction
        scores = selector.one_set(scores)
    start, end = prompt.context_start, prompt.context_end
    # template/question positions outrank every context position; context positions rank by score
    priority = [[math.inf if not start <= p < end else float(scores[p - start]) for p in chunk] for chunk in chunks]
    for i, (earlier, later) in enumerate(zip(priority, priority[1:])):
        assert min(earlier) >= max(later), f"chunk {i + 1} carries a position that outranks one of chunk {i}"
    sent = [p for chunk in chunks for p in chunk]
    assert len(sent) == len(set(sent))
    assert set(prompt.fixed_positions().tolist()) <= set(sent)
    assert sum(1 for p in sent if start <= p < end) == math.ceil(retention * prompt.context_len)


def test_answer_from_a_partial_stream_equals_a_complete_stream_of_the_positions_that_arrived(tiny_loaded):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    req = EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 1.0, "int8", chunk_bytes=600)
    frames = list(edge.stream(req))
    receiver = cloud.receiver(expect_mode="kv")
    receiver.feed(frames[0])
    rest = iter(frames[1:])
    while receiver.decoder.partial().missing_fixed:  # every template/question position, then three chunks of context
        receiver.feed(next(rest))
    for _ in range(3):
        receiver.feed(next(rest))
    receiver.cut()
    partial = receiver.result()
    h = partial.header
    assert not partial.complete and partial.missing_fixed == 0 and len(partial.positions) < len(h.kept)
    from_partial = cloud.answer(partial, 6)
    # the same positions sent as a complete stream of their own: the edge's KV, the same profile
    arrived = partial.positions.tolist()
    pre = prefill(tiny_loaded.model, edge.prompt(req))
    own = StreamHeader(
        mode="kv",
        prompt_ids=list(edge.prompt(req).ids),
        context_span=h.context_span,
        kept=arrived,
        geometry=h.geometry,
        model=h.model,
        tokenizer=h.tokenizer,
        dtype=h.dtype,
        profile=get_profile("int8"),
    )
    enc = StreamEncoder(own)
    complete = cloud.receive(
        [enc.header_frame(), *enc.chunk_frames(pre.keys, pre.values, torch.tensor(arrived)), enc.trailer_frame()]
    )
    from_complete = cloud.answer(complete, 6)
    assert complete.complete and torch.equal(complete.positions, partial.positions)
    assert torch.equal(from_partial.generation.first_logits, from_complete.generation.first_logits)
    assert from_partial.tokens == from_complete.tokens
    assert from_partial.retention_achieved == from_complete.retention_achieved < 1.0
    assert not from_partial.complete and from_complete.complete
    full = cloud.answer(cloud.receive(frames), 6)  # and what was dropped mattered: the test can fail
    assert not torch.equal(full.generation.first_logits, from_partial.generation.first_logits)


def test_reserve_estimate_starts_conservative_then_follows_measured_speed():
    est = ReserveEstimator()
    prior = est.estimate("kv", 300, 32)
    assert prior > 3.0  # 0.1 s per step before anything was measured
    est.observe("kv", 300, setup_s=0.003, steps=32, generate_s=0.064)  # 2 ms per step, 10 us per position
    measured = est.estimate("kv", 300, 32)
    assert measured == pytest.approx(ReserveEstimator.SAFETY * (0.002 * 32 + 1e-5 * 300) + 0.05)
    assert (
        est.estimate("kv", 300, 64) > measured and est.estimate("text", 300, 32) > measured
    )  # text: prior per position
    assert est.cut_reserve("kv", 300, 32) == measured
    assert ReserveEstimator(fixed_ms=250).cut_reserve("kv", 300, 32) == 0.25
    est.observe("scout", 300, setup_s=0.3, steps=32, generate_s=0.064)  # 1 ms per position of this cloud's prefill
    assert est.estimate("text", 300, 32) == est.estimate("scout", 300, 32)
    assert est.estimate("scout", 300, 32) == pytest.approx(ReserveEstimator.SAFETY * (0.064 + 0.3) + 0.05)
    # a fixed cost per prefill (20 ms) plus 1 ms per position, seen at two lengths: a long prompt is not
    # charged the short prompt's fixed cost per position
    est.observe("text", 20, setup_s=0.04, steps=32, generate_s=0.064)
    est.observe("text", 200, setup_s=0.22, steps=32, generate_s=0.064)
    assert est.setup_estimate("text", 400) == pytest.approx(0.42, rel=0.05)


# --- the service against a real gRPC edge whose pace the test sets ---------------------------------
#
# No outcome here depends on how fast the host runs. The service counts deadlines on a FakeClock that
# stands still except at a cut; the edge sends a precomputed stream and, where a test wants a cut
# stream, holds it (sends nothing more) until the cloud cancels the call. Where a test needs frames to
# arrive before the cut, the test delivers the cut itself once they have arrived (CuttingClient raises
# the DeadlineExceededError gRPC's deadline raises), instead of racing a real deadline against the edge;
# where nothing must arrive first (the cut before the header), the real gRPC deadline cuts the stream.
# How late answers land in real time is a benchmark figure (docs/anytime.md), not asserted here.


class FakeClock:
    """AnswerService's clock: stands still, except that a cut moves it on to the cut's moment, so the
    time left at each decision (cut, fallback) is exactly what the request's deadline says."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class SlowEdge(kvwire_pb2_grpc.EdgeServiceServicer):
    """A gRPC edge sending the real stream of a request (computed before it sends anything): every frame,
    or with `hold_after` = n only the first n and then nothing until the caller cancels the call.
    Frame `corrupt` (an index) gets one payload bit flipped. `cancelled`: the call ended (the caller's
    cancel, or its deadline) before this edge sent its whole stream."""

    def __init__(self, loaded, hold_after: int | None = None, corrupt: int | None = None):
        self.edge = Edge(loaded)
        self.hold_after, self.corrupt = hold_after, corrupt
        self.holding = threading.Event()  # it sent what it sends and waits for the cancel
        self.cancelled = threading.Event()
        self.sent = 0
        self._streams: dict[tuple, list[bytes]] = {}

    def frames(
        self, mode: str, retention: float, selector: str = "q2c", context: str = CONTEXT, question: str = QUESTION
    ) -> list[bytes]:
        """The stream this edge sends for such a request (the same one each time)."""
        key = (context, question, mode, selector, retention)
        if key not in self._streams:
            # 2000 bytes: for CONTEXT, 28 chunks of 6 positions, the first 17 carrying the template and question
            req = EdgeRequest(context, question, mode, selector, retention, "int8", chunk_bytes=2000)
            self._streams[key] = list(self.edge.stream(req))
        return self._streams[key]

    def Prefill(self, request, context):
        req = PrefillRequest.from_pb(request)
        ended, done = threading.Event(), threading.Event()

        def on_end() -> None:  # gRPC calls it when the call ends, also when it stops this generator itself
            ended.set()
            if not done.is_set():
                self.cancelled.set()

        context.add_callback(on_end)
        for i, frame in enumerate(self.frames(req.mode, req.retention, req.selector, req.context, req.question)):
            if i == self.hold_after:
                self.holding.set()
                ended.wait(SAFETY_S)
            if not context.is_active():
                return
            if i == self.corrupt:
                frame = frame[:-1] + bytes([frame[-1] ^ 1])
            yield PrefillReply(req.request_id, frame=frame).to_pb()
            self.sent += 1
        done.set()


class CuttingClient:
    """The service's EdgeClient, recording the timeout (the cut) the service gives each call and moving
    the FakeClock to the cut's moment when a cut happens. With `cut_after` = n, the call is cut once n
    frames have reached the service (the real call only gets SAFETY_S); without it, gRPC's own
    deadline cuts it after the service's timeout, in real time."""

    def __init__(self, client: EdgeClient, clock: FakeClock, cut_after: int | None = None):
        self.client, self.clock, self.cut_after = client, clock, cut_after
        self.timeouts: list[float] = []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def prefill(self, request: PrefillRequest, timeout_s: float):
        self.timeouts.append(timeout_s)
        started, frames = self.clock.now, 0
        stream = self.client.prefill(request, timeout_s if self.cut_after is None else SAFETY_S)
        try:
            for reply in stream:
                yield reply
                frames += reply.frame is not None
                if frames == self.cut_after:
                    raise DeadlineExceededError("the test cut the stream at its deadline")
        except DeadlineExceededError:
            self.clock.now = started + timeout_s
            raise
        finally:
            stream.close()  # cancels the edge's stream if it was cut


def serve(servicer: SlowEdge) -> tuple[grpc.Server, str]:
    """`servicer` as a gRPC server on loopback; (server, its address)."""
    server = grpc.server(ThreadPoolExecutor(4), options=EDGE_SERVER_OPTIONS)
    kvwire_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def slow_cloud(tiny_loaded, tiny_model_dir):
    """make(edge, reserve_ms, cut_after) -> (AnswerService, Metrics) talking to `edge` over real gRPC on
    loopback, through a CuttingClient (service.edge) on a FakeClock (service.clock)."""
    made = []

    def make(servicer: SlowEdge, reserve_ms: int | None = 200, cut_after: int | None = None):
        server, address = serve(servicer)
        client = EdgeClient(address)
        clock = FakeClock()
        metrics = Metrics("cloud")
        service = AnswerService(
            tiny_loaded,
            CloudSettings(model=tiny_model_dir, deadline_reserve_ms=reserve_ms),
            CuttingClient(client, clock, cut_after),
            metrics,
            clock=clock,
        )
        made.append((server, client, service))
        return service, metrics

    yield make
    for server, client, service in made:
        service.close()
        client.close()
        server.stop(0)


def answer(service: AnswerService, **body):
    """The response of one /answer call on the service, as the HTTP route makes it."""
    req = AnswerRequest(question=QUESTION, context=CONTEXT, max_new_tokens=6, **body)
    return asyncio.run(service.answer(req, "test"))


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def frames_to_fixed(frames: list[bytes]) -> int:
    """How many frames of a stream carry its header and every template/question position."""
    dec = StreamDecoder()
    for n, frame in enumerate(frames, 1):
        dec.feed(frame)
        if n > 1 and dec.partial().missing_fixed == 0:
            return n
    raise AssertionError("the stream never completed its template/question positions")


def arrived_positions(frames: list[bytes]) -> tuple[list[int], int, int]:
    """(positions, how many of them are context, positions the header announced) of a cut stream's frames."""
    dec = StreamDecoder()
    for frame in frames:
        dec.feed(frame)
    arrived = dec.partial()
    start, end = arrived.header.context_span
    positions = arrived.positions.tolist()
    return positions, sum(1 for p in positions if start <= p < end), len(arrived.header.kept)


def test_cut_stream_gives_a_partial_answer_from_what_arrived_and_cancels_the_edge(slow_cloud, tiny_loaded):
    edge = SlowEdge(tiny_loaded)
    frames = edge.frames("kv", 0.75)
    sent = frames_to_fixed(frames) + 3  # the header, the template/question positions, three chunks of context
    edge.hold_after = sent
    service, metrics = slow_cloud(edge, reserve_ms=200, cut_after=sent)
    reply = answer(service, mode="kv", retention=0.75, deadline_ms=1200)
    assert service.edge.timeouts == [pytest.approx(1.0)]  # the cut: deadline_ms after arrival, less the reserve
    assert not reply.complete and reply.fallback is None
    # the answer used exactly the positions that arrived before the cut
    arrived, context, announced = arrived_positions(frames[:sent])
    assert reply.kept_positions == len(arrived) < announced
    assert reply.kept_positions > reply.prompt_tokens - 1 - reply.context_tokens  # template/question plus some context
    assert reply.retention_achieved == pytest.approx(context / reply.context_tokens, abs=1e-6)
    assert 0 < reply.retention_achieved < 0.75
    assert edge.cancelled.wait(SAFETY_S), "the edge never saw the cut"
    assert edge.sent == sent
    assert sample(metrics, "kvwire_partial_answers_total", mode="kv") == 1
    assert sample(metrics, "kvwire_retention_achieved_ratio_count", mode="kv") == 1
    assert sample(metrics, "kvwire_requests_total", mode="kv", outcome="ok") == 1


def test_cut_scout_stream_answers_from_its_header_alone(slow_cloud, tiny_loaded):
    edge = SlowEdge(tiny_loaded, hold_after=1)  # the header, then nothing until the cut
    service, metrics = slow_cloud(edge, reserve_ms=200, cut_after=1)
    reply = answer(service, mode="scout", retention=0.5, deadline_ms=800)
    assert service.edge.timeouts == [pytest.approx(0.6)]
    assert not reply.complete and reply.bytes_on_wire == len(edge.frames("scout", 0.5)[0]) > 0
    assert reply.retention_achieved == pytest.approx(
        math.ceil(0.5 * reply.context_tokens) / reply.context_tokens, abs=1e-6
    )
    assert edge.cancelled.wait(SAFETY_S), "the edge never saw the cut"
    assert sample(metrics, "kvwire_partial_answers_total", mode="scout") == 1


def test_generous_deadline_gets_the_complete_answer(slow_cloud, tiny_loaded):
    service, metrics = slow_cloud(SlowEdge(tiny_loaded), reserve_ms=200)
    reply = answer(service, mode="kv", retention=0.75, deadline_ms=30_000)
    assert service.edge.timeouts == [pytest.approx(29.8)]
    assert reply.complete and reply.fallback is None and reply.fallback_reason is None
    assert reply.retention_achieved == pytest.approx(
        math.ceil(0.75 * reply.context_tokens) / reply.context_tokens, abs=1e-6
    )
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    direct = cloud.answer(cloud.receive(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.75, "int8"))), 6)
    assert reply.answer == direct.text
    assert sample(metrics, "kvwire_partial_answers_total", mode="kv") == 0


def test_cut_before_the_header_is_504_or_a_text_answer_when_time_is_left(slow_cloud, tiny_loaded):
    # the edge sends nothing until the cancel: gRPC's own deadline cuts the call, 300 ms after it began,
    # and the FakeClock then leaves exactly the reserve (300 ms) for a fallback
    edge = SlowEdge(tiny_loaded, hold_after=0)
    service, metrics = slow_cloud(edge, reserve_ms=300)
    with pytest.raises(DeadlineExceededError, match="before the edge sent its header"):
        answer(service, mode="kv", deadline_ms=600)
    assert edge.cancelled.wait(SAFETY_S), "the edge never saw the cut"
    prompt_len = len(Edge(tiny_loaded).prompt(EdgeRequest(CONTEXT, QUESTION)).ids)
    # fallback asked, but the text estimate before any measurement (slow-host priors) does not fit 300 ms
    assert service.reserve.estimate("text", prompt_len, 6) > 0.3
    with pytest.raises(DeadlineExceededError, match="before the edge sent its header"):
        answer(service, mode="kv", deadline_ms=600, fallback="text")
    text = answer(service, mode="text")
    # a measured speed whose text estimate fits: set, not measured here, so that no host is too slow for it
    service.reserve = ReserveEstimator(300)
    service.reserve.observe("text", 100, setup_s=0.001, steps=10, generate_s=0.01)  # 10 us per position, 1 ms a step
    assert service.reserve.estimate("text", prompt_len, 6) < 0.3
    reply = answer(service, mode="kv", deadline_ms=600, fallback="text")
    assert service.edge.timeouts == [pytest.approx(0.3)] * 3
    assert reply.fallback == "text" and reply.mode == "text" and reply.fallback_reason.startswith("deadline:")
    assert reply.answer == text.answer and reply.complete and reply.retention_achieved == 1.0
    assert sample(metrics, "kvwire_fallbacks_total", mode="kv", reason="deadline") == 1
    assert edge.sent == 0


def test_deadline_shorter_than_the_reserve_is_504_at_once(slow_cloud, tiny_loaded):
    edge = SlowEdge(tiny_loaded)
    service, _ = slow_cloud(edge, reserve_ms=500)
    with pytest.raises(DeadlineExceededError, match="keeps 500 ms before the deadline"):
        answer(service, mode="kv", deadline_ms=300)
    assert edge.sent == 0 and service.edge.timeouts == []  # no call to the edge at all


@pytest.mark.parametrize("fallback", ["none", "text"])
def test_a_corrupt_chunk_is_never_answered_from(slow_cloud, tiny_loaded, fallback):
    edge = SlowEdge(tiny_loaded, corrupt=20)  # a chunk after the template/question positions
    service, metrics = slow_cloud(edge)
    if fallback == "none":
        with pytest.raises(FrameError):
            answer(service, mode="kv", deadline_ms=30_000)
    else:
        text = answer(service, mode="text")
        reply = answer(service, mode="kv", deadline_ms=30_000, fallback="text")
        assert reply.fallback == "text" and reply.fallback_reason.startswith("frame_error:")
        assert reply.answer == text.answer and reply.bytes_on_wire == text.bytes_on_wire > 0
        assert sample(metrics, "kvwire_fallbacks_total", mode="kv", reason="frame_error") == 1
    assert sum(v for (n, _), v in _samples(metrics).items() if n == "kvwire_frames_rejected_total") == 1


def _samples(metrics: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in metrics.registry.collect() for s in f.samples}


# --- real daemons, with bench.relay making the link slow or cutting it -----------------------------


class Relay:
    """bench.relay as a child process; its first stdout line says where it listens."""

    def __init__(self, target: str, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvwire.bench.relay", "--target", target, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        self.address = f"127.0.0.1:{json.loads(line)['port']}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def anytime_daemons(tiny_model_dir, tiny_loaded):
    """An edge behind a stalling relay and a resetting relay, a SlowEdge in this process that holds its
    stream (held_edge), and four clouds: one behind each relay, one on the held edge and one whose edge
    is down."""
    started, relays = [], []
    held_edge = SlowEdge(tiny_loaded)
    held_server, held_address = serve(held_edge)
    try:
        edge = _start(
            "edge",
            "kvwire.edge_agent",
            ["--model", tiny_model_dir, "--grpc-port", "0", "--profile", "int8", "--chunk-bytes", "4096"],
        )
        started.append(edge)
        edge.wait_listening()
        # every read of the edge's bytes held up to 100 ms: a stream of ~40 chunks takes seconds
        slow = Relay(edge.grpc_address, "--stall-prob", "1", "--stall-max-ms", "100", "--seed", "7")
        # every connection reset after 20 kB from the edge: the header and the first chunks, then a dead link
        killed = Relay(edge.grpc_address, "--reset-after-bytes", "20000", "--reset-direction", "down")
        relays += [slow, killed]
        clouds = {
            "cut": ["--model", tiny_model_dir, "--edge", held_address, "--deadline-reserve-ms", "500"],
            "slow": ["--model", tiny_model_dir, "--edge", slow.address, "--deadline-reserve-ms", "500"],
            "killed": ["--model", tiny_model_dir, "--edge", killed.address],
            "orphan": ["--model", tiny_model_dir, "--edge", _closed_port()],
        }
        handles = {name: _start(f"cloud_{name}", "kvwire.cloud_agent", args) for name, args in clouds.items()}
        started += list(handles.values())
        for d in handles.values():
            d.wait_listening()
        yield type("Daemons", (), {"edge": edge, "held_edge": held_edge, **handles})
    finally:
        for d in started:
            d.terminate()
        for d in started:
            d.stop()
        for r in relays:
            r.stop()
        held_server.stop(0)


def post(daemon, **body):
    payload = {"question": DAEMON_QUESTION, "context": DAEMON_CONTEXT * 4, "max_new_tokens": 8, **body}
    return httpx.post(daemon.http_url + "/answer", json=payload, timeout=120)


def test_daemons_tight_deadline_partial_then_generous_deadline_complete(anytime_daemons):
    cloud, edge = anytime_daemons.cut, anytime_daemons.held_edge
    context, question = DAEMON_CONTEXT * 4, DAEMON_QUESTION
    frames = edge.frames("kv", 0.8, context=context, question=question)  # computed before the request
    edge.hold_after = frames_to_fixed(frames) + 3  # then nothing until the cloud daemon cuts the call
    # the cut: 2.5 s after arrival, gRPC's deadline on the cloud daemon; the frames before the hold are
    # already computed, so they are there long before it whatever the host's load
    body = ok(post(cloud, mode="kv", retention=0.8, deadline_ms=3000))
    assert edge.holding.is_set() and edge.cancelled.wait(SAFETY_S), "the edge never saw the cut"
    assert body["complete"] is False and body["fallback"] is None
    positions, in_context, announced = arrived_positions(frames[: edge.hold_after])
    assert body["kept_positions"] == len(positions) < announced
    assert body["retention_achieved"] == pytest.approx(in_context / body["context_tokens"], abs=1e-6)
    assert 0 < body["retention_achieved"] < 0.8
    assert body["bytes_on_wire"] == sum(len(f) for f in frames[: edge.hold_after])
    (cut,) = cloud.wait_events("stream_cut", request_id=body["request_id"])
    assert cut["reserve_ms"] == 500 and cut["kept_positions"] == body["kept_positions"]
    samples = metric_samples(cloud.http_url)
    assert samples[("kvwire_partial_answers_total", (("mode", "kv"),))] == 1
    assert samples[("kvwire_retention_achieved_ratio_count", (("mode", "kv"),))] == 1
    assert samples[("kvwire_requests_total", (("mode", "kv"), ("outcome", "ok")))] == 1
    # the same request over a slow but working link, with a deadline the stream fits in many times over
    cloud = anytime_daemons.slow
    full = ok(post(cloud, mode="kv", retention=0.8, deadline_ms=60_000))
    assert full["complete"] is True and full["retention_achieved"] >= 0.8
    assert full["kept_positions"] > body["kept_positions"] and full["bytes_on_wire"] > body["bytes_on_wire"]
    samples = metric_samples(cloud.http_url)
    assert samples.get(("kvwire_partial_answers_total", (("mode", "kv"),)), 0) == 0
    assert samples[("kvwire_retention_achieved_ratio_count", (("mode", "kv"),))] == 1
    assert samples[("kvwire_requests_total", (("mode", "kv"), ("outcome", "ok")))] == 1


def test_daemons_edge_down_is_503_or_the_text_answer_with_fallback(anytime_daemons):
    cloud = anytime_daemons.orphan
    for mode in ("kv", "scout"):
        reply = post(cloud, mode=mode)
        assert reply.status_code == 503 and reply.json()["error"] == "edge_unavailable", reply.text
    text = ok(post(cloud, mode="text"))
    body = ok(post(cloud, mode="kv", fallback="text"))
    assert body["fallback"] == "text" and body["mode"] == "text" and body["answer"] == text["answer"]
    assert body["fallback_reason"].startswith("edge_unavailable:") and "unreachable" in body["fallback_reason"]
    assert body["complete"] is True and body["retention_achieved"] == 1.0
    samples = metric_samples(cloud.http_url)
    assert samples[("kvwire_fallbacks_total", (("mode", "kv"), ("reason", "edge_unavailable")))] == 1
    assert samples[("kvwire_requests_total", (("mode", "kv"), ("outcome", "edge_unavailable")))] == 1
    assert samples[("kvwire_requests_total", (("mode", "kv"), ("outcome", "ok")))] == 1


def test_daemons_edge_killed_mid_stream_is_503_not_a_wait_for_the_deadline_or_the_text_answer(anytime_daemons):
    cloud = anytime_daemons.killed
    # a 503 (edge_unavailable), not the 504 or the partial answer the deadline would give: the cloud did
    # not wait for the deadline once the link died
    reply = post(cloud, mode="kv", deadline_ms=60_000)
    assert reply.status_code == 503 and reply.json()["error"] == "edge_unavailable", reply.text
    assert total(metric_samples(cloud.http_url), "kvwire_received_bytes_total") > 0  # the stream had begun
    body = ok(post(cloud, mode="kv", fallback="text"))
    assert body["fallback"] == "text" and body["fallback_reason"].startswith("edge_unavailable:")
    assert total(metric_samples(cloud.http_url), "kvwire_fallbacks_total") == 1
