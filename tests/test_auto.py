"""mode "auto": the cost model and the choice, on synthetic measurements (no model, no clock)."""

from __future__ import annotations

import json

import pytest

from kvwire.cloud_agent.auto import (
    TEXT,
    Candidate,
    CostModel,
    LineFit,
    QualityTable,
    RequestFacts,
    Setting,
    plan,
)
from kvwire.cloud_agent.service import ReserveEstimator
from kvwire.kvcodec.errors import ConfigError

KV_FULL = Candidate(Setting("kv", "q2c", 1.0, "fp16"), quality=1.0, wire_ratio=1.0)
KV_Q2C = Candidate(Setting("kv", "q2c", 0.5, "mixed-int4"), quality=0.96, wire_ratio=0.10)
KV_CHEAP = Candidate(Setting("kv", "q2c", 0.25, "int4"), quality=0.80, wire_ratio=0.05)
SCOUT = Candidate(Setting("scout", "q2c", 0.5, None, "sparse"), quality=0.97, wire_ratio=0.001)
TABLE = QualityTable("tiny", "teacher-forced top-1 agreement", [KV_FULL, KV_Q2C, KV_CHEAP, SCOUT])


def facts(cached=True, doc=True, tokens=2048, max_new=16) -> RequestFacts:
    return RequestFacts(
        prompt_tokens=tokens + 40,
        context_tokens=tokens,
        question_tokens=20,
        context_bytes=tokens * 5,
        question_bytes=60,
        fp16_kv_bytes=(tokens + 40) * 30 * 2 * 3 * 64 * 2,  # 30 layers, K and V, 3 KV heads of 64, 2 bytes: ~48 MB
        max_new_tokens=max_new,
        doc_id="doc" if doc else None,
        edge_holds_prefix=cached,
    )


def cloud(prefill_s_per_token=1e-3, step_s=0.02) -> ReserveEstimator:
    """The cloud's own estimate, fed as the service feeds it: setup seconds against positions, per mode."""
    r = ReserveEstimator()
    for mode, per in (("text", prefill_s_per_token), ("scout", prefill_s_per_token), ("kv", 1e-5)):
        for n in (100, 2000):
            r.observe(mode, n, 0.01 + per * n, 10, 10 * step_s)
    return r


def cost(link_bps: float, link_s=0.02, edge_q_s=0.02, prefill_s_per_token=1e-3) -> CostModel:
    m = CostModel(cloud(prefill_s_per_token))
    for nbytes in (10_000, 1_000_000):
        m.observe_transfer(nbytes, link_s + nbytes / link_bps)
    m.observe_edge("kv", {"question_prefill": edge_q_s * 1000, "select": 5, "encode": 20}, 2088, 20, 2048)
    m.observe_edge("scout", {"question_prefill": edge_q_s * 1000, "select": 5}, 2088, 20, 2048)
    m.observe_edge("kv", {"prefill": 2000, "select": 5, "encode": 20}, 2088, 20, 2048)
    for nbytes in (10_000, 1_000_000):
        m.observe_decode(nbytes, nbytes * 1e-9)
    return m


def test_line_fit_recovers_a_line_and_follows_change():
    f = LineFit(0.3)
    with pytest.raises(LookupError):
        f.predict(1)
    for x in (1, 10, 100):
        f.add(x, 2 + 0.5 * x)
    assert f.predict(1000) == pytest.approx(502)
    for _ in range(20):  # the line moves: within a few points the new one dominates
        f.add(10, 100)
        f.add(100, 1000)
    assert f.predict(50) == pytest.approx(500, rel=0.02)


def test_one_x_predicts_proportionally():
    f = LineFit(0.3)
    f.add(10, 5)
    assert f.predict(20) == pytest.approx(10)


def test_fast_link_and_a_cached_document_choose_compressed_kv():
    p = plan(cost(link_bps=125e6), TABLE, facts(cached=True))  # 1 Gbit/s
    assert p.chosen.candidate is KV_Q2C  # ~0.15 s: 4.8 MB at 1 Gbit/s against the cloud prefilling 2 k tokens (~2 s)
    text = next(x for x in p.predictions if x.candidate is TEXT)
    assert p.chosen.ttft_s < text.ttft_s
    assert len(p.predictions) == 5


def test_the_quality_floor_excludes_what_loses_too_much():
    p = plan(cost(link_bps=125e6), TABLE, facts(), min_quality=0.99)
    assert p.chosen.candidate.quality >= 0.99
    assert p.chosen.candidate in (TEXT, KV_FULL)
    p = plan(cost(link_bps=125e6), TABLE, facts(), min_quality=0.5)  # the cheap one may now win on time
    assert p.chosen.ttft_s == min(x.ttft_s for x in p.predictions)


def test_a_slow_link_avoids_shipping_kv():
    slow = cost(link_bps=10e6 / 8, link_s=0.03)  # 10 Mbit/s
    p = plan(slow, QualityTable("tiny", "", [KV_FULL, KV_Q2C]), facts(cached=True))
    assert p.chosen.candidate is TEXT  # 2.4 MB of KV at 10 Mbit/s is ~2 s; the cloud prefills 2 k tokens in ~2 s
    p = plan(slow, TABLE, facts(cached=True))
    assert p.chosen.candidate is SCOUT  # scout ships token ids only and prefills half the prompt


def test_an_uncached_document_pays_the_edge_prefill():
    m = cost(link_bps=125e6, prefill_s_per_token=1e-4)  # a fast cloud: text costs ~0.2 s
    cold = plan(m, TABLE, facts(cached=False))
    assert cold.chosen.candidate is TEXT  # the edge's 2 s cold prefill dwarfs everything
    warm = plan(m, TABLE, facts(cached=True))
    assert warm.chosen.parts["edge_prefill"] < cold.predictions[1].parts["edge_prefill"]


def test_a_changed_link_moves_the_choice():
    m = cost(link_bps=125e6)
    table = QualityTable("tiny", "", [KV_Q2C])
    assert plan(m, table, facts()).chosen.candidate is KV_Q2C
    choices = []
    for _ in range(8):  # the link drops to 1 Mbit/s: each stream's transfer is measured
        m.observe_transfer(2_500_000, 0.02 + 2_500_000 / 125e3)
        choices.append(plan(m, table, facts()).chosen.candidate)
    assert choices[-1] is TEXT
    assert choices.index(TEXT) <= 2  # it follows within a few requests


def test_ties_go_to_the_higher_quality_then_the_fewer_bytes():
    m = cost(link_bps=125e6)
    a = Candidate(Setting("kv", "q2c", 0.5, "int8"), quality=0.97, wire_ratio=0.1)
    b = Candidate(Setting("kv", "q2c", 0.5, "int4"), quality=0.99, wire_ratio=0.1)
    p = plan(m, QualityTable("t", "", [a, b]), facts())
    assert p.chosen.candidate is b
    c = Candidate(Setting("kv", "q2c", 0.5, "x"), quality=0.99, wire_ratio=0.1 * 0.999)
    p = plan(m, QualityTable("t", "", [b, c]), facts())
    assert p.chosen.candidate is c


def test_nothing_measured_uses_cautious_priors():
    m = CostModel(ReserveEstimator())
    assert not any(m.known().values())
    p = plan(m, TABLE, facts(cached=False, doc=False))
    assert p.chosen.candidate is TEXT  # a 10 Mbit/s link and a slow edge are assumed until measured
    assert all(x.ttft_s > 0 for x in p.predictions)


def test_no_table_means_text():
    p = plan(cost(link_bps=125e6), None, facts())
    assert p.chosen.candidate is TEXT and len(p.predictions) == 1


def test_a_deadline_takes_the_highest_quality_that_fits():
    m = cost(link_bps=125e6)
    p = plan(m, TABLE, facts(), deadline_s=100.0)
    assert p.fits and p.chosen.candidate.quality == 1.0
    tight = sorted(x.total_s for x in p.predictions)[1] * 1.001  # only the two fastest fit
    p = plan(m, TABLE, facts(), min_quality=0.5, deadline_s=tight)
    fitting = [x for x in p.predictions if x.total_s <= tight]
    assert p.fits and p.chosen.candidate.quality == max(x.candidate.quality for x in fitting)
    p = plan(m, TABLE, facts(), deadline_s=1e-6)
    assert p.fits is False
    assert p.chosen.total_s == min(x.total_s for x in p.predictions if x.candidate.quality >= 0.95)


def test_allowed_filters_settings():
    p = plan(cost(link_bps=125e6), TABLE, facts(), allowed=lambda s: s.mode != "kv")
    assert {x.candidate.setting.mode for x in p.predictions} == {"text", "scout"}


def test_inline_contexts_pay_the_upload_and_are_remembered():
    m = cost(link_bps=1.25e6)
    f = facts(doc=False, cached=False)
    p = plan(m, TABLE, f)
    assert all("upload" in x.parts for x in p.predictions if x.candidate is not TEXT)
    assert not m.holds_context("k")
    m.observe_context("k", hit=True)
    assert m.holds_context("k") and m.edge_keeps_prefixes
    for i in range(CostModel.REMEMBERED_CONTEXTS):
        m.observe_context(str(i), hit=False)  # the edge keeps prefixes: a cold stream leaves it cached
    assert m.holds_context("0")
    assert not m.holds_context("k")  # bounded


def test_a_cold_inline_context_is_not_believed_cached_until_the_edge_shows_a_hit():
    m = cost(link_bps=125e6)
    for _ in range(3):  # an edge without a prefix cache: every stream of the context is cold
        m.observe_context("ctx", hit=False)
        assert not m.holds_context("ctx") and not m.edge_keeps_prefixes
    m.observe_context("other", hit=False)
    m.observe_context(None, hit=True)  # a document served from the edge's prefix cache: it keeps prefixes
    assert m.edge_keeps_prefixes
    assert m.holds_context("ctx") and m.holds_context("other")  # the cold-streamed ones are now believed cached
    m.observe_context("ctx", hit=False)  # believed cached and was not (evicted): forgotten
    assert not m.holds_context("ctx")
    m.observe_context("ctx", hit=False)  # and streamed again cold: the edge keeps it now
    assert m.holds_context("ctx")


def test_the_edge_without_a_prefix_cache_keeps_text_chosen_for_a_repeated_cold_context():
    # a 1 Gbit/s link where the cold kv path is a little slower than text and the cached one far faster: the old
    # memory flipped to kv on the second request (predicting a hit that never came); now it stays on text
    m = cost(link_bps=125e6, prefill_s_per_token=1e-3)
    table = QualityTable("tiny", "", [KV_FULL])
    choices = []
    for _ in range(4):
        f = facts(doc=False, cached=m.holds_context("ctx"))
        choices.append(plan(m, table, f).chosen.candidate)
        m.observe_context("ctx", hit=False)
    assert choices == [TEXT] * 4


def test_a_throughput_3x_off_the_estimate_weighs_more():
    m = CostModel(ReserveEstimator())
    for _ in range(10):
        m.observe_transfer(10_000_000, 0.08)  # 125 MB/s (1 Gbit/s)
    fast = m.link_s(10_000_000)
    m.observe_transfer(10_000_000, 8.0)  # the link dropped to 10 Mbit/s: 100x slower
    one = m.link_s(10_000_000)
    assert one >= 0.75 * 8.0  # followed from the first stream (the ordinary weight would give ~0.3 x 8 s)
    m2 = CostModel(ReserveEstimator())
    for _ in range(10):
        m2.observe_transfer(10_000_000, 0.08)
    m2.observe_transfer(10_000_000, 0.16)  # 2x: jitter within the band averages at the ordinary weight
    latency = CostModel.PRIOR_LINK_S  # unmeasured (every stream here is large): the prior stands in
    assert fast == pytest.approx(latency + 0.08)
    assert m2.link_s(10_000_000) == pytest.approx(latency + 0.7 * 0.08 + 0.3 * 0.16, rel=1e-6)


def test_predictions_within_5_percent_are_a_tie_won_by_quality():
    m = cost(link_bps=125e6)
    p = plan(m, TABLE, facts())
    best = min(x.ttft_s for x in p.predictions if x.candidate.quality >= 0.95)
    near = [x for x in p.predictions if x.candidate.quality >= 0.95 and x.ttft_s <= best * 1.05]
    assert p.chosen.candidate.quality == max(x.candidate.quality for x in near)
    from kvwire.cloud_agent import auto

    assert auto.TIE == 0.05


def test_describe_is_the_response_field():
    d = plan(cost(link_bps=125e6), TABLE, facts()).describe()
    assert set(d) == {"chose", "quality", "predicted_ms", "candidates", "reason", "fits"}
    assert d["candidates"] == 5 and d["chose"]["label"]


def test_quality_table_round_trip_and_errors(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(TABLE.to_dict()))
    loaded = QualityTable.load(path)
    assert loaded.candidates == TABLE.candidates
    with pytest.raises(ConfigError, match="does not exist"):
        QualityTable.load(tmp_path / "none.json")
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QualityTable.load(path)
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ConfigError, match="not a KVWire quality table"):
        QualityTable.load(path)
    bad = TABLE.to_dict()
    bad["rows"][0]["mode"] = "fax"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="row 0: mode 'fax'"):
        QualityTable.load(path)
    bad["rows"][0] = {"mode": "kv"}
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="row 0 is not a candidate"):
        QualityTable.load(path)


def test_a_bad_quality_table_stops_the_cloud_before_the_model_loads(tmp_path):
    from kvwire.agent_common.errors import StartupConfigError
    from kvwire.cloud_agent.main import quality_table
    from kvwire.cloud_agent.settings import CloudSettings

    bad = tmp_path / "q.json"
    bad.write_text("[]")
    with pytest.raises(StartupConfigError, match="quality_table: .*not a KVWire quality table"):
        quality_table(CloudSettings(quality_table=str(bad)))
    assert quality_table(CloudSettings()) is not None  # the embedded model's shipped table
    assert quality_table(CloudSettings(model=str(tmp_path))) is None  # another model: auto answers in text


def test_small_streams_measure_latency_and_large_ones_throughput():
    m = CostModel(ReserveEstimator())
    m.observe_transfer(1000, 0.02)
    assert m.known()["link_latency"] and not m.known()["link_throughput"]
    m.observe_transfer(10_000_000, 0.02 + 0.1)  # 100 MB/s
    assert m.link_s(10_000_000) == pytest.approx(0.12)
    before = m.link_s(10_000_000)
    m.observe_transfer(10_000_000, 0.0201)  # faster than the latency says: a fast link, its payload >= 10%
    assert m.link.s_per_byte.n == 2 and m.link_s(10_000_000) < before
