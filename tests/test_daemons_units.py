"""Daemon parts in-process: settings precedence, --help, message round trips, status mapping,
the edge's gRPC refusals through the real client, and frame rejection on the cloud."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fastapi.testclient import TestClient

from kvwire.agent_common.edge_client import EdgeClient
from kvwire.agent_common.edge_messages import PrefillReply, PrefillRequest
from kvwire.agent_common.errors import EdgeBusyError, OverloadedError, ShuttingDownError
from kvwire.agent_common.grpc_status import status_of
from kvwire.agent_common.metrics import Metrics
from kvwire.agent_common.settings import build_parser, load_settings
from kvwire.cloud_agent.settings import CloudSettings
from kvwire.edge_agent.settings import EdgeSettings
from kvwire.kvcodec.errors import ConfigError, PromptTooLongError
from kvwire.proto import kvwire_pb2_grpc

CONTEXT = "The Normans were descended from Norse raiders and pirates under their leader Rollo."


def _requests(metrics: Metrics, mode: str, outcome: str) -> float | None:
    """kvwire_requests_total{mode, outcome} as the registry exposes it (None: never counted)."""
    return metrics.registry.get_sample_value("kvwire_requests_total", {"mode": mode, "outcome": outcome})


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_settings_precedence_defaults_file_env_flags(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"edge{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"grpc_port": 1111, "http-port": 2222, "profile": "int8", "max_concurrency": 3}))
    else:
        path.write_text('grpc_port = 1111\nhttp-port = 2222\nprofile = "int8"\nmax_concurrency = 3\n')
    monkeypatch.setenv("KVWIRE_EDGE_HTTP_PORT", "3333")
    monkeypatch.setenv("KVWIRE_EDGE_PROFILE", "int4")
    s = load_settings(EdgeSettings, ["--config", str(path), "--profile", "fp16"], "edge-agent", "")
    assert s.grpc_port == 1111  # file over default
    assert s.http_port == 3333  # environment over file
    assert s.profile == "fp16"  # flag over environment
    assert s.max_concurrency == 3 and s.chunk_bytes == EdgeSettings.model_fields["chunk_bytes"].default


def test_config_file_from_the_environment_and_bad_settings_exit_2(tmp_path, monkeypatch, capsys):
    path = tmp_path / "cloud.json"
    path.write_text(json.dumps({"edge": "10.0.0.1:7000"}))
    monkeypatch.setenv("KVWIRE_CLOUD_CONFIG", str(path))
    assert load_settings(CloudSettings, [], "cloud-agent", "").edge == "10.0.0.1:7000"
    path.write_text(json.dumps({"edge_adress": "x"}))
    with pytest.raises(SystemExit) as exc:
        load_settings(CloudSettings, [], "cloud-agent", "")
    assert exc.value.code == 2 and "edge_adress" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(CloudSettings, ["--max-concurrency", "0"], "cloud-agent", "")
    assert "max_concurrency" in capsys.readouterr().err


@pytest.mark.parametrize("cls, prefix", [(EdgeSettings, "KVWIRE_EDGE_"), (CloudSettings, "KVWIRE_CLOUD_")])
def test_help_explains_every_option(cls, prefix):
    text = build_parser(cls, "agent", "").format_help()
    for name, field in cls.model_fields.items():
        assert "--" + name.replace("_", "-") in text and prefix + name.upper() in text
        assert field.description, f"{name} has no description"
    assert "--config" in text


# --- messages and status mapping ---------------------------------------------------------------


def test_messages_round_trip_through_protobuf():
    req = PrefillRequest("rid-1", "kv", CONTEXT, "Who?", "snapkv", 0.25, "int8", True, 65536)
    assert PrefillRequest.from_pb(req.to_pb()) == req
    frame = PrefillReply("rid-1", frame=b"\x00KVWF")
    assert PrefillReply.from_pb(frame.to_pb()) == frame
    timings = PrefillReply("rid-1", timings_ms={"prefill": 1.5, "encode": 0.25})
    assert PrefillReply.from_pb(timings.to_pb()) == timings


@pytest.mark.parametrize(
    "exc, code",
    [
        (PromptTooLongError("long"), grpc.StatusCode.OUT_OF_RANGE),
        (ConfigError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (OverloadedError("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ShuttingDownError("bye"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_edge_status_table(exc, code):
    assert status_of(exc)[0] == code


def test_cloud_status_table():
    from kvwire.agent_common.errors import DeadlineExceededError, EdgeUnavailableError
    from kvwire.cloud_agent.errors import classify
    from kvwire.kvcodec.errors import FrameError, GeometryMismatchError

    assert classify(PromptTooLongError("x")) == (413, "too_long")
    assert classify(ConfigError("x")) == (422, "invalid")
    assert classify(GeometryMismatchError("x")) == (409, "mismatch")
    assert classify(FrameError("checksum", "x")) == (502, "frame_error")
    assert classify(OverloadedError("x")) == (429, "overloaded")
    assert classify(EdgeUnavailableError("x"))[0] == classify(EdgeBusyError("x"))[0] == 503
    assert classify(DeadlineExceededError("x")) == (504, "deadline")
    assert classify(KeyError("x")) == (500, "error")


# --- an in-process edge ------------------------------------------------------------------------


@pytest.fixture
def edge_server(tiny_loaded):
    """The real EdgeServicer behind the real interceptor on a loopback port, max_concurrency 1."""
    from kvwire.edge_agent.main import build_grpc_server
    from kvwire.edge_agent.service import EdgeServicer

    settings = EdgeSettings(max_concurrency=1, profile="int8")
    metrics = Metrics("edge")
    servicer = EdgeServicer(tiny_loaded, settings, metrics)
    server, _ = build_grpc_server(servicer, metrics, settings)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = EdgeClient(f"127.0.0.1:{port}")
    yield servicer, client, metrics
    client.close()
    server.stop(None)


def _drain(client: EdgeClient, **fields) -> list[PrefillReply]:
    req = PrefillRequest(
        **{"request_id": "unit", "mode": "kv", "context": CONTEXT, "question": "Who?", "retention": 1.0, **fields}
    )
    return list(client.prefill(req, timeout_s=30))


def test_edge_streams_frames_then_timings(edge_server):
    _, client, metrics = edge_server
    replies = _drain(client, profile="fp16")
    assert all(r.frame for r in replies[:-1]) and replies[-1].frame is None
    assert {"prefill", "select", "encode", "total"} <= set(replies[-1].timings_ms)
    assert len(replies) >= 4  # header, >= 1 chunk, trailer, timings
    assert _requests(metrics, "kv", "ok") == 1


def test_edge_refusals_reach_the_client_as_domain_errors(edge_server):
    servicer, client, metrics = edge_server
    with pytest.raises(ConfigError, match="unknown selector 'nope'; known: q2c"):
        _drain(client, selector="nope")
    with pytest.raises(ConfigError, match="unknown profile '/etc/passwd'; allowed: .*fp16"):
        _drain(client, profile="/etc/passwd")  # requests never make the edge read a file
    with pytest.raises(ConfigError, match="edge streams modes kv and scout"):
        _drain(client, mode="text")
    assert servicer._slots.acquire(blocking=False)  # the one slot is taken: the next stream is refused at once
    try:
        with pytest.raises(EdgeBusyError, match="limit of 1 concurrent"):
            _drain(client)
    finally:
        servicer._slots.release()
    assert _requests(metrics, "kv", "overloaded") == 1
    assert _requests(metrics, "invalid", "invalid") == 1


# --- frame rejection on an in-process cloud ----------------------------------------------------


class _CorruptingEdge(kvwire_pb2_grpc.EdgeServiceServicer):
    """A real edge stream with one byte flipped in its second frame."""

    def __init__(self, loaded):
        from kvwire.kvcodec.pipeline import Edge

        self.edge = Edge(loaded)

    def Prefill(self, request, context):
        from kvwire.kvcodec.pipeline import EdgeRequest

        frames = list(self.edge.stream(EdgeRequest(request.context, request.question, request.mode, profile="int8")))
        frames[1] = frames[1][:40] + bytes([frames[1][40] ^ 0xFF]) + frames[1][41:]
        for frame in frames:
            yield PrefillReply(request.request_id, frame=frame).to_pb()


def test_corrupted_frame_is_502_and_counted_by_reason(tiny_loaded):
    from kvwire.cloud_agent.app import create_app
    from kvwire.cloud_agent.service import AnswerService

    server = grpc.server(ThreadPoolExecutor(2))
    kvwire_pb2_grpc.add_EdgeServiceServicer_to_server(_CorruptingEdge(tiny_loaded), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    metrics = Metrics("cloud")
    edge = EdgeClient(f"127.0.0.1:{port}")
    service = AnswerService(tiny_loaded, CloudSettings(), edge, metrics)
    try:
        with TestClient(create_app(service, metrics, 1 << 20)) as http:
            reply = http.post("/answer", json={"question": "Who?", "context": CONTEXT, "mode": "kv"})
            assert reply.status_code == 502, reply.text
            assert "checksum" in reply.json()["detail"] and reply.json()["error"] == "frame_error"
            page = http.get("/metrics").text
        assert 'kvwire_frames_rejected_total{reason="checksum"} 1.0' in page
        assert 'kvwire_requests_total{mode="kv",outcome="frame_error"} 1.0' in page
    finally:
        service.close()
        edge.close()
        server.stop(None)


# --- request limits on an in-process cloud ----------------------------------------------------


def test_body_size_chunked_bodies_and_max_new_tokens_are_refused_before_any_work(tiny_loaded):
    from kvwire.cloud_agent.app import create_app
    from kvwire.cloud_agent.service import AnswerService

    metrics = Metrics("cloud")
    edge = EdgeClient("127.0.0.1:1")  # never contacted: every request here is refused or in text mode
    service = AnswerService(tiny_loaded, CloudSettings(max_body_bytes=2048, max_new_tokens=8), edge, metrics)
    body = {"question": "Who?", "context": CONTEXT, "mode": "text"}
    try:
        with TestClient(create_app(service, metrics, 2048)) as http:
            big = http.post("/answer", json={**body, "context": CONTEXT * 40})
            assert big.status_code == 413 and "at most 2048 (--max-body-bytes)" in big.json()["detail"], big.text
            chunked = http.post(
                "/answer", content=iter([json.dumps(body).encode()]), headers={"content-type": "application/json"}
            )
            assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"], chunked.text
            many = http.post("/answer", json={**body, "max_new_tokens": 9})
            assert many.status_code == 422 and "limit of 8" in many.json()["detail"], many.text
            assert http.post("/answer", json={**body, "max_new_tokens": 8}).status_code == 200
        assert _requests(metrics, "unknown", "too_long") == 1
        assert _requests(metrics, "unknown", "invalid") == 1
        assert _requests(metrics, "text", "invalid") == 1
    finally:
        service.close()
        edge.close()


# --- deploy/ stays in step with the code -------------------------------------------------------


def _exposed_metric_names() -> set[str]:
    names = set()
    for side in ("edge", "cloud"):
        for family in Metrics(side).registry.collect():
            names |= {family.name + suffix for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    return names


def test_deploy_files_parse_and_name_only_real_metrics_and_settings():
    import re
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    rules = yaml.safe_load((deploy / "prometheus/kvwire-alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"KVWireEdgeDown", "KVWireHighErrorRate", "KVWireP95LatencyHigh"} <= alerts
    scrape = yaml.safe_load((deploy / "prometheus/prometheus.yml").read_text())
    assert {j["job_name"] for j in scrape["scrape_configs"]} == {"kvwire-edge", "kvwire-cloud"}
    dashboard = json.loads((deploy / "grafana/kvwire-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + [
        r["expr"] for g in rules["groups"] for r in g["rules"]
    ]
    used = {m for e in exprs for m in re.findall(r"\bkvwire_[a-z_]+", e)}
    assert used and used <= _exposed_metric_names(), used - _exposed_metric_names()
    for unit in ("kvwire-edge.service", "kvwire-cloud.service"):
        assert f"/bin/{unit.split('.')[0].replace('kvwire-', '')}-agent" in (deploy / "systemd" / unit).read_text()
    for env, cls in (("edge.env.example", EdgeSettings), ("cloud.env.example", CloudSettings)):
        keys = re.findall(r"^#? ?(KVWIRE_\w+)=", (deploy / "env" / env).read_text(), re.M)
        prefix = cls.model_config["env_prefix"]
        assert {k.removeprefix(prefix).lower() for k in keys} == set(cls.model_fields)


# Prometheus naming (prometheus.io/docs/practices/naming): base units, the unit as the last word of the
# name (before `_total` on a counter), ratios as `_ratio`, `_total` on counters only.
_UNITS = ("seconds", "bytes", "ratio")
_NON_BASE_UNITS = ("milliseconds", "ms", "kilobytes", "kb", "mb", "percent", "minutes", "hours")


@pytest.mark.parametrize("side", ["edge", "cloud"])
def test_every_metric_name_follows_the_prometheus_conventions(side):
    import re

    families = list(Metrics(side).registry.collect())
    assert families
    for family in families:
        name, words = family.name, family.name.split("_")
        assert re.fullmatch(r"kvwire_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert not set(words) & set(_NON_BASE_UNITS), f"{name}: use base units (seconds, bytes, ratio)"
        assert "total" not in words, f"{name}: only a counter's sample ends in _total"
        for unit in _UNITS:
            if unit in words[1:]:
                assert words[-1] == unit, f"{name}: the unit {unit!r} goes last (before a counter's _total)"
        if family.type == "counter":
            assert {sample.name for sample in family.samples} <= {f"{name}_total", f"{name}_created"}, name
        if " / " in family.documentation:  # a quotient of like quantities is a ratio
            assert name.endswith("_ratio"), f"{name}: a ratio ends in _ratio"


def test_renamed_metrics_are_gone_from_code_deploy_and_docs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    old = ("kvwire_bytes_sent", "kvwire_bytes_received")
    files = [*root.glob("deploy/**/*.yml"), *root.glob("deploy/**/*.json"), root / "README.md"]
    files += [f for f in (*root.glob("*_agent/*.py"), *root.glob("agent_common/*.py"))]
    files += [f for f in root.glob("docs/*.md") if f.name != "daemons.md"]  # daemons.md has the rename table
    for f in files:
        text = f.read_text()
        for name in old:
            assert name not in text, f"{f.relative_to(root)} still names {name}"
        assert not re.search(r"kvwire_retention_achieved(?!_ratio)", text), f"{f.relative_to(root)}"
    table = (root / "docs/daemons.md").read_text()
    for before, after in (
        ("kvwire_bytes_sent_total", "kvwire_sent_bytes_total"),
        ("kvwire_bytes_received_total", "kvwire_received_bytes_total"),
        ("kvwire_retention_achieved", "kvwire_retention_achieved_ratio"),
    ):
        assert f"| `{before}` | `{after}` |" in table, before


def test_stage_buckets_resolve_a_p50_from_sub_millisecond_to_minutes():
    from kvwire.agent_common.metrics import STAGE_BUCKETS

    assert STAGE_BUCKETS[0] <= 0.0005 and STAGE_BUCKETS[-1] >= 300
    steps = [(lo, hi / lo) for lo, hi in zip(STAGE_BUCKETS, STAGE_BUCKETS[1:])]
    assert all(step <= 2.5 for _, step in steps), steps
    # answers on these hosts take 1-30 s: there a quantile is read to within a ×1.7 step, not 5-10 s
    assert all(step <= 5 / 3 + 1e-9 for lo, step in steps if 1 <= lo < 30), steps


def test_request_counters_have_a_zero_series_for_known_labels_before_any_request():
    from kvwire.cloud_agent.errors import outcome_labels
    from kvwire.kvcodec.modes import mode_names, streamed_mode_names

    cloud, edge = Metrics("cloud", outcomes=outcome_labels()), Metrics("edge")
    for mode in [*mode_names(), "unknown"]:
        for outcome in outcome_labels():
            assert _requests(cloud, mode, outcome) == 0, (mode, outcome)
    for mode in [*streamed_mode_names(), "invalid", "unknown", "document"]:
        for outcome in ("ok", "cancelled", "error", "overloaded", "unauthenticated", "not_found"):
            assert _requests(edge, mode, outcome) == 0, (mode, outcome)
    sample = cloud.registry.get_sample_value
    assert sample("kvwire_received_bytes_total", {"mode": "kv", "kind": "chunk"}) == 0
    assert sample("kvwire_partial_answers_total", {"mode": "scout"}) == 0
    assert sample("kvwire_fallbacks_total", {"mode": "kv", "reason": "edge_unavailable"}) == 0
    assert sample("kvwire_fallbacks_total", {"mode": "kv", "reason": "ok"}) is None  # an answer, not a fallback
    assert edge.registry.get_sample_value("kvwire_sent_bytes_total", {"mode": "kv", "kind": "header"}) == 0
    assert _requests(cloud, "nonsense", "ok") is None  # only the bounded label values
    cloud.requests.labels("kv", "deadline").inc()
    assert _requests(cloud, "kv", "deadline") == 1 and _requests(cloud, "kv", "ok") == 0
    assert b'kvwire_requests_total{mode="text",outcome="ok"} 0.0' in cloud.render()


# Outcomes the caller causes (or that are the answer itself): no alert on the server's error rate counts them.
_CLIENT_OUTCOMES = {"ok", "cancelled", "invalid", "too_long", "deadline", "unauthenticated", "mismatch", "not_found"}
_CLIENT_OUTCOMES |= {"overloaded"}  # the cloud's own concurrency limit has its own alert (KVWireOverloaded)


def test_error_rate_alert_counts_every_server_side_outcome_and_no_client_one():
    import re
    from pathlib import Path

    import yaml

    from kvwire.cloud_agent.errors import outcome_labels

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    rules = yaml.safe_load((deploy / "prometheus/kvwire-alerts.yml").read_text())
    rules = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    dashboard = json.loads((deploy / "grafana/kvwire-dashboard.json").read_text())
    panel = next(p for p in dashboard["panels"] if p["title"] == "Server-side error ratio")
    assert _CLIENT_OUTCOMES <= set(outcome_labels())
    server_side = set(outcome_labels()) - _CLIENT_OUTCOMES
    for expr in (rules["KVWireHighErrorRate"]["expr"], panel["targets"][0]["expr"]):
        (counted,) = re.findall(r'outcome=~\\?"([a-z_|]+)\\?"', expr)
        assert set(counted.split("|")) == server_side, expr
    auth = rules["KVWireAuthRejected"]["expr"]
    assert 'outcome=~"unauthenticated|edge_unauthenticated"' in auth and "job=" not in auth  # both daemons


def test_operator_docs_list_every_option():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/daemons.md").read_text()
    for cls in (EdgeSettings, CloudSettings):
        prefix = cls.model_config["env_prefix"]
        for name in cls.model_fields:
            assert f"`--{name.replace('_', '-')}` | `{prefix}{name.upper()}`" in text, name


class _FakeRpcError(Exception):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    "code, details, expected",
    [
        ("UNKNOWN", "Stream removed", "EdgeUnavailableError"),
        ("INTERNAL", "Failed parsing HTTP/2", "EdgeUnavailableError"),
        ("INTERNAL", "edge-agent internal error: ValueError: boom", "EdgeFailedError"),
        ("UNAVAILABLE", "Connection refused", "EdgeUnavailableError"),
    ],
)
def test_link_failures_below_the_codec_are_503_not_an_edge_error(code, details, expected):
    import grpc

    from kvwire.agent_common.edge_client import EdgeClient
    from kvwire.cloud_agent.errors import classify

    client = EdgeClient("127.0.0.1:9")  # never connects: the channel is lazy
    try:
        err = client._translate(_FakeRpcError(getattr(grpc.StatusCode, code), details), 1.0)
    finally:
        client.close()
    assert type(err).__name__ == expected
    assert classify(err)[0] == (503 if expected == "EdgeUnavailableError" else 502)
    if code in ("UNKNOWN", "INTERNAL") and expected == "EdgeUnavailableError":
        assert "the link cut or corrupted the gRPC framing" in str(err)


@pytest.mark.parametrize("active, outcome", [(True, "ok"), (False, "cancelled")])
def test_a_stream_that_ends_because_the_caller_left_is_counted_cancelled(active, outcome):
    from types import SimpleNamespace

    import grpc

    from kvwire.agent_common.metrics import Metrics
    from kvwire.edge_agent.interceptor import RequestInterceptor
    from kvwire.proto import kvwire_pb2

    def prefill(request, context):  # like EdgeServicer._stream when the caller gave up waiting for the model
        if context.is_active():
            yield kvwire_pb2.PrefillReply()

    metrics = Metrics("edge")
    handler = RequestInterceptor(metrics).intercept_service(
        lambda details: grpc.unary_stream_rpc_method_handler(prefill),
        SimpleNamespace(method="/kvwire.v1.EdgeService/Prefill"),
    )
    context = SimpleNamespace(is_active=lambda: active)
    list(handler.unary_stream(kvwire_pb2.PrefillRequest(mode="kv"), context))
    assert _requests(metrics, "kv", outcome) == 1
    assert metrics.registry.get_sample_value("kvwire_inflight_requests") == 0


# --- one validation: the cloud forwards the names the edge owns -----------------------------------


def test_a_profile_the_edge_was_configured_with_works_when_a_request_names_it(tiny_loaded, tiny_model_dir, tmp_path):
    """The edge owns profiles: a diagnosed profile file it loaded is usable by name through the cloud,
    and a name it does not know comes back as the edge's own ConfigError (422) listing what it allows."""
    import asyncio

    from edges import running_edge

    from kvwire.cloud_agent.api import AnswerRequest
    from kvwire.cloud_agent.service import AnswerService

    path = tmp_path / "diag.json"
    path.write_text(json.dumps({"name": "tiny-diagnosed", "default": {"k": {"kind": "int8"}, "v": {"kind": "int8"}}}))
    with running_edge(tiny_loaded, EdgeSettings(profile=str(path))) as edge:
        service = AnswerService(tiny_loaded, CloudSettings(model=tiny_model_dir), edge.client, Metrics("cloud"))

        def ask(profile):
            req = AnswerRequest(question="Who?", context=CONTEXT, mode="kv", profile=profile, max_new_tokens=2)
            return asyncio.run(service.answer(req, "unit"))

        try:
            named, default = ask("tiny-diagnosed"), ask(None)
            assert named.answer == default.answer and named.bytes_on_wire == default.bytes_on_wire > 0
            with pytest.raises(ConfigError, match="unknown profile 'nope'; allowed: .*tiny-diagnosed"):
                ask("nope")
        finally:
            service.close()
