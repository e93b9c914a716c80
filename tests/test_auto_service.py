"""mode auto through the real cloud service and a real edge on loopback: what it chooses is what answers."""

from __future__ import annotations

import asyncio

import pytest
from edges import running_edge
from pydantic import ValidationError

from kvwire.agent_common.metrics import Metrics
from kvwire.cloud_agent.api import AnswerRequest
from kvwire.cloud_agent.auto import Candidate, QualityTable, Setting, shipped_quality_table
from kvwire.cloud_agent.service import AnswerService, context_key
from kvwire.cloud_agent.settings import CloudSettings
from kvwire.edge_agent.documents import DocumentStore
from kvwire.edge_agent.settings import EdgeSettings

DOC = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)
INLINE = "Rollo led the Norse raiders who settled on the lower Seine; his descendants became dukes of Normandy."
QUESTION = "Who was the leader of the Norse raiders?"
KV = Candidate(Setting("kv", "q2c", 1.0, "fp16"), quality=1.0, wire_ratio=1.0)
SCOUT = Candidate(Setting("scout", "q2c", 0.5, None, "sparse"), quality=0.97, wire_ratio=0.001)
TABLE = QualityTable("tiny", "test", [KV, SCOUT])


@pytest.fixture
def hosts(tiny_loaded, tiny_model_dir, tmp_path):
    # prefill_documents off: a background prefill racing the first request would make its costs vary per run
    settings = EdgeSettings(profile="fp16", data_dir=str(tmp_path / "edge-data"), prefill_documents=False)
    store = DocumentStore(settings.data_dir, count_tokens=lambda text: len(tiny_loaded.tokenizer(text)["input_ids"]))
    with running_edge(tiny_loaded, settings, documents=store) as edge:
        service = AnswerService(
            tiny_loaded,
            CloudSettings(model=tiny_model_dir),
            edge.client,
            Metrics("cloud"),
            clock=lambda: 0.0,  # time stands still: deadlines never run out, measurements never go stale
            quality_table=TABLE,
        )
        store.put("normans", DOC)
        yield service
        service.close()
    store.close()


def ask(service: AnswerService, **body):
    return asyncio.run(service.answer(AnswerRequest(question=QUESTION, max_new_tokens=6, **body), "t"))


def link(service: AnswerService, bytes_per_s: float, latency_s: float = 0.001) -> None:
    """What the cloud would have measured of a link of this speed."""
    for _ in range(10):
        service.costs.link.observe_transfer(1000, latency_s)
        service.costs.link.observe_transfer(10_000_000, latency_s + 10_000_000 / bytes_per_s)


def speeds(service: AnswerService, edge_s_per_token: float, cloud_s_per_token: float) -> None:
    """What the cloud would have measured of the edge's prefill and of its own."""
    for n in (50, 200):
        service.costs.observe_edge("kv", {"prefill": 1000 * edge_s_per_token * n}, n, 12, n - 20)
        service.reserve.observe("text", n, cloud_s_per_token * n, 4, 0.004)


def test_what_auto_chooses_is_what_answers(hosts):
    service = hosts
    link(service, 1e9)  # a fast link and a fast edge: the edge's KV beats the cloud's own prefill
    speeds(service, edge_s_per_token=1e-5, cloud_s_per_token=1e-2)
    chosen = ask(service, doc_id="normans", mode="auto", min_quality=0.99)
    assert chosen.auto is not None and chosen.auto.chose.mode == chosen.mode == "kv"
    assert chosen.auto.candidates == 3 and chosen.auto.quality == 1.0
    assert chosen.auto.predicted_ms.time_to_first_token > 0
    direct = ask(service, doc_id="normans", mode="kv", profile="fp16", retention=1.0)
    assert chosen.answer == direct.answer and chosen.bytes_on_wire == direct.bytes_on_wire
    reg = service.metrics.registry
    assert reg.get_sample_value("kvwire_auto_choices_total", {"mode": "kv"}) == 1
    assert reg.get_sample_value("kvwire_auto_prediction_ratio_count", {"mode": "kv"}) == 1
    assert reg.get_sample_value("kvwire_requests_total", {"mode": "auto", "outcome": "ok"}) == 1


def test_a_slow_link_moves_auto_to_text(hosts):
    service = hosts
    link(service, 1e9)
    speeds(service, edge_s_per_token=1e-5, cloud_s_per_token=1e-2)
    assert ask(service, doc_id="normans", mode="auto", min_quality=0.99).mode == "kv"
    link(service, 1e3)  # a kilobyte per second
    slow = ask(service, doc_id="normans", mode="auto", min_quality=0.99)
    assert slow.mode == "text" and slow.auto.chose.mode == "text"
    assert slow.answer == ask(service, doc_id="normans", mode="text").answer
    # a lower floor lets scout, which ships token ids only, in
    assert ask(service, doc_id="normans", mode="auto", min_quality=0.9).auto.chose.mode in ("scout", "text")


def test_a_failed_stream_that_auto_chose_falls_back_to_text(hosts, monkeypatch):
    from kvwire.agent_common.errors import EdgeUnavailableError

    service = hosts
    link(service, 1e9)
    speeds(service, edge_s_per_token=1e-5, cloud_s_per_token=1e-2)

    def unreachable(*args, **kwargs):
        raise EdgeUnavailableError("edge-agent is unreachable (Stream removed (ping timeout))")

    monkeypatch.setattr(service.edge, "prefill", unreachable)
    ans = ask(service, doc_id="normans", mode="auto", min_quality=0.99)
    assert ans.auto.chose.mode == "kv"  # what it chose; text is what answered, as a fallback
    assert ans.mode == "text" and ans.fallback == "text" and "unreachable" in ans.fallback_reason
    with pytest.raises(EdgeUnavailableError):  # a request that asks for no fallback gets the error
        ask(service, doc_id="normans", mode="auto", min_quality=0.99, fallback="none")


def test_streams_feed_the_cost_model(hosts):
    service = hosts
    assert not service.costs.known()["edge_prefill"]
    # not DOC: the edge prefills the stored document in the background, and a prefix it already holds would
    # measure the question's prefill only (CI once saw exactly that)
    ask(service, context=INLINE, mode="kv")
    known = service.costs.known()
    assert known["edge_prefill"], known
    assert known["decode"] and known["edge_select"], known
    assert known["link_latency"] or known["link_throughput"]  # a small stream measures the latency only
    # the edge now holds this context's prefix, but until it has served one stream from its prefix cache the cloud
    # does not count on it (an edge without a prefix cache would never): the second stream is that hit
    assert not service.costs.holds_context(context_key(INLINE)) and not service.costs.edge_keeps_prefixes
    again = ask(service, context=INLINE, mode="kv")
    assert again.timings_ms.edge_prefill == again.timings_ms.edge_question_prefill > 0  # only the question
    assert service.costs.edge_keeps_prefixes and service.costs.holds_context(context_key(INLINE))


def test_with_nothing_measured_auto_probes_the_link(hosts):
    service = hosts
    assert service.costs.link.age_s() is None
    ask(service, doc_id="normans", mode="auto")
    service.probe_thread.join(timeout=120)
    assert not service.probe_thread.is_alive()
    assert service.costs.link.latency.n >= 1  # the health check's round trip, at least
    assert service.costs.known()["edge_prefill"]  # the probe stream's edge prefill


def test_auto_refuses_what_it_would_choose_itself():
    with pytest.raises(ValidationError, match="mode auto chooses"):
        AnswerRequest(question="q", context="c", mode="auto", retention=0.5)
    with pytest.raises(ValidationError, match="min_quality applies to mode auto only"):
        AnswerRequest(question="q", context="c", mode="kv", min_quality=0.9)
    AnswerRequest(question="q", context="c", mode="auto", min_quality=0.9, deadline_ms=1000)


def test_the_embedded_model_ships_a_table():
    table = shipped_quality_table("embedded")
    assert table is not None and {c.setting.mode for c in table.candidates} >= {"kv", "scout"}
    assert shipped_quality_table("/some/other/model") is None
