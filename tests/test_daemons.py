"""edge-agent and cloud-agent as real subprocesses on loopback, with the tiny model.

One module-scoped set of daemons serves every test; daemons a test stops on purpose are its alone
(edge_doomed/cloud_orphan for "edge stopped", cloud_doomed for graceful shutdown), so no test
depends on another's order.
"""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import httpx
import pytest
from edges import daemon_env
from prometheus_client.parser import text_string_to_metric_families

from kvwire.agent_common.edge_client import KEEPALIVE_TIME_MS
from kvwire.agent_common.edge_messages import PrefillReply, PrefillRequest
from kvwire.agent_common.launch import Daemon
from kvwire.cloud_agent.service import ReserveEstimator
from kvwire.kvcodec.pipeline import Edge, EdgeRequest
from kvwire.kvcodec.selectors import selector_names
from kvwire.proto import kvwire_pb2_grpc

CONTEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under their leader Rollo, "
    "agreed to swear fealty to King Charles III of West Francia."
)
QUESTION = "Who was the leader?"
MAX_CONTEXT_TOKENS = 400
COMMON = ["--host", "127.0.0.1", "--http-port", "0", "--threads", "1"]  # 1 thread: no OMP thrashing on 2 shared cores
SAFETY_S = 60.0  # the longest a test waits for something that will happen
# as on the real edge (edge_agent/main.py): the cloud's keepalive pings get no GOAWAY "too_many_pings"
EDGE_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
]


def _start(name: str, module: str, args: list[str]) -> Daemon:
    return Daemon(name, module, [*COMMON, *args], env=daemon_env())


class HeldEdge(kvwire_pb2_grpc.EdgeServiceServicer):
    """An edge in this process that holds every Prefill call, sending nothing, until `release` is set;
    then it sends the real stream. A request it holds is in flight on its cloud for as long as the test
    wants, whatever the host's speed."""

    def __init__(self, loaded):
        self.edge = Edge(loaded)
        self.called = threading.Event()  # a call has arrived and is held
        self.release = threading.Event()

    def Prefill(self, request, context):
        req = PrefillRequest.from_pb(request)
        self.called.set()
        self.release.wait(SAFETY_S)
        edge_req = EdgeRequest(req.context, req.question, req.mode, req.selector, req.retention, req.profile or "int8")
        for frame in self.edge.stream(edge_req):
            yield PrefillReply(req.request_id, frame=frame).to_pb()

    def serve(self) -> tuple[grpc.Server, str]:
        server = grpc.server(ThreadPoolExecutor(4), options=EDGE_SERVER_OPTIONS)
        kvwire_pb2_grpc.add_EdgeServiceServicer_to_server(self, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def daemons(tiny_model_dir, tiny_other_geometry_dir, tiny_loaded):
    """Two edges, then five clouds, started in parallel per phase and always stopped. The two clouds
    with --max-concurrency 1 talk to HeldEdges in this process (held_limited, held_doomed)."""
    started: list[Daemon] = []
    held = {"held_limited": HeldEdge(tiny_loaded), "held_doomed": HeldEdge(tiny_loaded)}
    servers = {name: edge.serve() for name, edge in held.items()}
    try:
        edge = _start("edge", "kvwire.edge_agent", ["--model", tiny_model_dir, "--grpc-port", "0", "--profile", "int8"])
        edge_doomed = _start("edge_doomed", "kvwire.edge_agent", ["--model", tiny_model_dir, "--grpc-port", "0"])
        started += [edge, edge_doomed]
        for d in (edge, edge_doomed):
            d.wait_listening()
        clouds = {
            "cloud": [
                "--model",
                tiny_model_dir,
                "--edge",
                edge.grpc_address,
                "--max-context-tokens",
                str(MAX_CONTEXT_TOKENS),
            ],
            "cloud_other": ["--model", tiny_other_geometry_dir, "--edge", edge.grpc_address],
            "cloud_limited": [
                "--model",
                tiny_model_dir,
                "--edge",
                servers["held_limited"][1],
                "--max-concurrency",
                "1",
            ],
            "cloud_orphan": ["--model", tiny_model_dir, "--edge", edge_doomed.grpc_address],
            "cloud_doomed": [
                *("--model", tiny_model_dir, "--edge", servers["held_doomed"][1], "--max-concurrency", "1"),
                *("--grace-seconds", str(SAFETY_S)),  # the drain waits for the held request as long as the test may
            ],
        }
        handles = {name: _start(name, "kvwire.cloud_agent", args) for name, args in clouds.items()}
        started += list(handles.values())
        for d in handles.values():
            d.wait_listening()
        yield SimpleNamespace(edge=edge, edge_doomed=edge_doomed, **handles, **held)
    finally:
        for edge in held.values():
            edge.release.set()
        for d in started:  # all drain at once; then wait for each
            d.terminate()
        for d in started:
            d.stop()
        for server, _ in servers.values():
            server.stop(0)


def ask(daemon: Daemon, timeout: float = 120, **body) -> httpx.Response:
    payload = {"question": QUESTION, "context": CONTEXT, **body}
    return httpx.post(daemon.http_url + "/answer", json=payload, timeout=timeout)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def metric_samples(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of every sample on a /metrics page (parsed by prometheus_client)."""
    reply = httpx.get(url + "/metrics", timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


# --- modes -------------------------------------------------------------------------------------


def test_kv_fp16_full_retention_is_exactly_the_text_answer(daemons):
    text = ok(ask(daemons.cloud, mode="text", max_new_tokens=16))
    stream = {"template_kv": "stream", "question_kv": "stream"}  # every position from the edge
    kv = ok(ask(daemons.cloud, mode="kv", profile="fp16", retention=1.0, max_new_tokens=16, **stream))
    assert text["answer"] and kv["answer"] == text["answer"]
    assert kv["kept_positions"] == kv["prompt_tokens"] - 1 == text["kept_positions"]
    assert 1.0 <= kv["wire_ratio"] < 1.05  # all positions at FP16 plus framing
    cloud = {"template_kv": "cloud", "question_kv": "cloud"}
    computed = ok(ask(daemons.cloud, mode="kv", profile="fp16", retention=1.0, max_new_tokens=16, **cloud))
    assert computed["answer"] == text["answer"]  # the cloud's template and question: still exact
    context_share = computed["context_tokens"] / computed["prompt_tokens"]
    assert context_share <= computed["wire_ratio"] < context_share + 0.05  # only the context travels
    assert text["bytes_on_wire"] == len(CONTEXT.encode()) + len(QUESTION.encode()) and kv["bytes_on_wire"] > 0
    t = kv["timings_ms"]
    assert t["edge_prefill"] > 0 and t["decode"] > 0 and t["generate"] > 0 and t["total"] >= t["generate"]


def test_scout_keeps_the_edge_positions_and_sends_only_ids(daemons):
    text = ok(ask(daemons.cloud, mode="text", max_new_tokens=8))
    full = ok(ask(daemons.cloud, mode="scout", retention=1.0, max_new_tokens=8))
    assert full["answer"] == text["answer"]  # the cloud prefilled everything itself
    half = ok(ask(daemons.cloud, mode="scout", retention=0.5, max_new_tokens=8))
    dropped = half["context_tokens"] - -(-half["context_tokens"] // 2)  # context minus ceil(0.5 x context)
    assert half["kept_positions"] == half["prompt_tokens"] - 1 - dropped
    assert half["bytes_on_wire"] < 4 * half["prompt_tokens"] + 1024 and half["wire_ratio"] < 0.05
    assert half["timings_ms"]["prefill"] > 0 and half["timings_ms"]["edge_prefill"] > 0


def test_fixed_positions_computed_on_the_cloud_through_the_daemons(daemons):
    """template_kv/question_kv travel from /answer to the edge: the stream leaves those positions out, the
    cloud computes them, and at fp16 and retention 1.0 the answer is still exactly the streamed one."""
    streamed, cloud = (
        ok(ask(daemons.cloud, mode="kv", profile="fp16", retention=1.0, max_new_tokens=8, template_kv=s, question_kv=s))
        for s in ("stream", "cloud")
    )
    assert cloud["answer"] == streamed["answer"] and cloud["kept_positions"] == streamed["kept_positions"]
    assert cloud["bytes_on_wire"] < streamed["bytes_on_wire"]
    sparse = ok(ask(daemons.cloud, mode="scout", retention=0.5, max_new_tokens=4))
    full = ok(ask(daemons.cloud, mode="scout", retention=0.5, max_new_tokens=4, scout_prefill="full"))
    assert sparse["bytes_on_wire"] < full["bytes_on_wire"]  # only a full scout's header carries every id


def test_kv_with_selection_and_the_edge_default_profile(daemons):
    full = ok(ask(daemons.cloud, mode="kv", profile="fp16", retention=1.0, max_new_tokens=4))
    # no profile: the edge's --profile (int8 here), a quarter of the context kept
    small = ok(ask(daemons.cloud, mode="kv", retention=0.25, selector="snapkv", max_new_tokens=4))
    assert small["kept_positions"] < full["kept_positions"]
    assert small["bytes_on_wire"] < 0.5 * full["bytes_on_wire"]
    assert [e["profile"] for e in daemons.edge.wait_events("prefill", request_id=small["request_id"])] == ["int8"]


def test_request_id_travels_to_the_edge_logs(daemons):
    reply = httpx.post(
        daemons.cloud.http_url + "/answer",
        json={"question": QUESTION, "context": CONTEXT, "max_new_tokens": 2},
        headers={"X-Request-ID": "trace-42"},
        timeout=60,
    )
    body = ok(reply)
    assert body["request_id"] == reply.headers["x-request-id"] == "trace-42"
    # the logs are read on threads of their own: wait for the records (Daemon.wait_events), never race them
    (done,) = daemons.edge.wait_events("prefill", request_id="trace-42")
    assert daemons.cloud.wait_events("answer", request_id="trace-42")
    # the edge logged the stream done only after the cloud's receipt, which counted every byte it sent
    assert done["confirmed_bytes"] == done["bytes"] == body["bytes_on_wire"]


def test_cloud_warms_up_before_listening_and_measures_its_speed(daemons):
    (warm,) = daemons.cloud.events("warmed_up")  # logged before `listening`: read before it
    assert warm["steps"] >= 1 and warm["seconds"] > 0
    # the reserve now comes from this host's speed, whatever it is: the warm-up's generation took at most
    # its `seconds` (rounded to ms), so a step at most seconds/steps; kv's per-position rate keeps its
    # prior (2e-4 s) until the first kv answer. The slow-host priors would give ~5077 ms.
    step_s = (warm["seconds"] + 0.0005) / warm["steps"]
    setup_s = ReserveEstimator.PRIOR_POSITION_S["kv"] * 256
    bound_ms = 1000 * (ReserveEstimator.SAFETY * (step_s * 32 + setup_s) + ReserveEstimator.MARGIN_S) + 0.5
    assert 0 < warm["reserve_ms_for_32_tokens_256_positions"] <= bound_ms


# --- refusals ----------------------------------------------------------------------------------


def test_other_kv_geometry_gets_409_and_scout_still_works(daemons):
    reply = ask(daemons.cloud_other, mode="kv", max_new_tokens=4)
    assert reply.status_code == 409, reply.text
    detail = reply.json()["detail"]
    assert "num_layers" in detail and "head_dim" in detail and "scout" in detail
    assert reply.json()["error"] == "mismatch"
    ok(ask(daemons.cloud_other, mode="scout", retention=0.5, max_new_tokens=4))


def test_oversized_context_is_413(daemons):
    reply = ask(daemons.cloud, mode="kv", context=CONTEXT * 8)
    assert reply.status_code == 413, reply.text
    assert f"at most {MAX_CONTEXT_TOKENS}" in reply.json()["detail"]


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'{"question": "Who?", "context": "x"', "not valid JSON"),
        (b'{"question": "Who?"}', "context"),
        (b'{"question": "Who?", "context": "x", "retention": 1.5}', "retention"),
        (b'{"question": "Who?", "context": "x", "mode": "telepathy"}', "mode"),
        (b'{"question": "Who?", "context": "x", "retension": 0.5}', "retension"),
    ],
)
def test_malformed_requests_are_422(daemons, content, needle):
    reply = httpx.post(
        daemons.cloud.http_url + "/answer", content=content, headers={"content-type": "application/json"}, timeout=30
    )
    assert reply.status_code == 422, reply.text
    assert needle in reply.json()["detail"] and reply.json()["request_id"]


@pytest.mark.parametrize(
    "field, allowed",
    [
        ("selector", selector_names()),
        ("profile", ["fp16", "bf16", "int8", "int4", "mixed-int4"]),
    ],
)
def test_unknown_selector_or_profile_is_422_naming_the_allowed_values(daemons, field, allowed):
    reply = ask(daemons.cloud, mode="kv", **{field: "bogus"})
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert "bogus" in detail and all(name in detail for name in allowed)


def test_missed_deadline_is_504(daemons):
    reply = ask(daemons.cloud, mode="kv", deadline_ms=1, context=CONTEXT * 2)
    assert reply.status_code == 504, reply.text
    assert "deadline" in reply.json()["detail"]


def test_more_concurrent_requests_than_allowed_get_429(daemons):
    cloud, edge = daemons.cloud_limited, daemons.held_limited
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(ask, cloud, mode="kv", max_new_tokens=4)
        assert edge.called.wait(SAFETY_S), "the first request never reached the edge"
        # the first request is in flight (held at the edge) for as long as this test says: one more is refused
        refused = [ask(cloud, mode=mode, max_new_tokens=4) for mode in ("kv", "text")]
        edge.release.set()
        ok(held.result(SAFETY_S))
    for reply in refused:
        assert reply.status_code == 429, reply.text
        assert reply.headers["retry-after"] and "limit of 1" in reply.json()["detail"]
    samples = metric_samples(cloud.http_url)
    for mode in ("kv", "text"):
        assert samples[("kvwire_requests_total", (("mode", mode), ("outcome", "overloaded")))] == 1
    assert samples[("kvwire_requests_total", (("mode", "kv"), ("outcome", "ok")))] == 1
    ok(ask(cloud, mode="text", max_new_tokens=4))  # nothing in flight: served again


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_parse_and_byte_counters_agree_on_both_sides(daemons):
    before_edge, before_cloud = (
        metric_samples(f"http://127.0.0.1:{daemons.edge.listening['http_port']}"),
        metric_samples(daemons.cloud.http_url),
    )
    replies = [
        ok(ask(daemons.cloud, mode=mode, retention=r, max_new_tokens=2, **extra))
        for mode, r, extra in (("kv", 1.0, {"profile": "mixed-int4"}), ("kv", 0.5, {}), ("scout", 0.5, {}))
    ]
    edge, cloud = (
        metric_samples(f"http://127.0.0.1:{daemons.edge.listening['http_port']}"),
        metric_samples(daemons.cloud.http_url),
    )
    sent = total(edge, "kvwire_sent_bytes_total") - total(before_edge, "kvwire_sent_bytes_total")
    received = total(cloud, "kvwire_received_bytes_total") - total(before_cloud, "kvwire_received_bytes_total")
    assert sent == received == sum(r["bytes_on_wire"] for r in replies) > 0
    for samples, side in ((edge, "edge"), (cloud, "cloud")):
        names = {n for n, _ in samples}
        assert {"kvwire_stage_seconds_bucket", "kvwire_requests_total", "kvwire_inflight_requests"} <= names
        assert samples[("kvwire_stage_seconds_count", (("mode", "kv"), ("side", side), ("stage", "total")))] >= 2
        assert samples[("kvwire_requests_total", (("mode", "kv"), ("outcome", "ok")))] >= 2
    assert cloud[("kvwire_wire_ratio_count", (("mode", "scout"),))] >= 1
    assert edge[("kvwire_sent_bytes_total", (("kind", "chunk"), ("mode", "kv")))] > 0
    assert ("kvwire_stage_seconds_sum", (("mode", "kv"), ("side", "edge"), ("stage", "prefill"))) in edge
    assert ("kvwire_stage_seconds_sum", (("mode", "kv"), ("side", "cloud"), ("stage", "inject"))) in cloud


def test_metrics_route_does_not_redirect(daemons):
    reply = httpx.get(daemons.cloud.http_url + "/metrics", follow_redirects=False, timeout=10)
    assert reply.status_code == 200 and "kvwire_inflight_requests" in reply.text


def test_health_and_readiness(daemons):
    edge_http = f"http://127.0.0.1:{daemons.edge.listening['http_port']}"
    for url in (edge_http, daemons.cloud.http_url):
        assert httpx.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200


# --- lifecycle ---------------------------------------------------------------------------------


def test_edge_stopped_readyz_fails_remote_modes_503_text_answers(daemons):
    assert httpx.get(daemons.cloud_orphan.http_url + "/readyz", timeout=10).status_code == 200
    assert daemons.edge_doomed.stop() == 0  # SIGTERM: a clean drain
    assert daemons.edge_doomed.wait_events("stopped")
    ready = httpx.get(daemons.cloud_orphan.http_url + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["ready"] is False and "unreachable" in ready.json()["reason"]
    for mode in ("kv", "scout"):
        reply = ask(daemons.cloud_orphan, mode=mode, max_new_tokens=2)
        assert reply.status_code == 503, reply.text
        assert "unreachable" in reply.json()["detail"] and "mode=text" in reply.json()["detail"]
    ok(ask(daemons.cloud_orphan, mode="text", max_new_tokens=2))


def test_sigterm_lets_the_request_in_flight_finish_and_refuses_new_ones(daemons):
    cloud, edge = daemons.cloud_doomed, daemons.held_doomed
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(ask, cloud, mode="kv", max_new_tokens=4)
        assert edge.called.wait(SAFETY_S), "the request never reached the edge"
        cloud.proc.send_signal(signal.SIGTERM)  # while the request is held at the edge
        cloud.wait_events("draining")
        # a new request: refused, by the draining service (503) or, once the listener closed, the connection
        try:
            late = ask(cloud, mode="text", max_new_tokens=2, timeout=SAFETY_S)
        except httpx.ConnectError:
            pass
        else:
            assert late.status_code == 503 and late.json()["error"] == "shutting_down", late.text
        assert cloud.proc.poll() is None  # still draining: the request in flight holds it
        edge.release.set()
        ok(in_flight.result(SAFETY_S))
    assert cloud.proc.wait(SAFETY_S) == 0
    assert cloud.wait_events("stopped")
    with pytest.raises(httpx.ConnectError):
        httpx.get(cloud.http_url + "/healthz", timeout=5)
