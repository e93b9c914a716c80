"""End to end on the embedded SmolLM2-135M-Instruct: `make run` (bench/loopback_demo.py) for real —
both daemons as subprocesses, a real passage, kv, scout and text modes, a clean stop."""

from __future__ import annotations

import json
from importlib import resources

from kvwire.bench.loopback_demo import print_report, run_demo
from kvwire.edge_agent.settings import DEFAULT_PROFILE

DEMO = json.loads(resources.files("kvwire.kvcodec").joinpath("data/demo.json").read_text())


def test_demo_answers_the_passage_in_every_mode_and_stops_cleanly(capsys):
    results = run_demo("embedded", question_index=0, retention=0.5, max_new_tokens=24, threads=1, log=lambda *_: None)
    assert results[-1]["exit_codes"] == {"cloud-agent": 0, "edge-agent": 0}
    kv, scout, text, doc_first, doc_second = results[:5]
    assert [r["request"].get("doc_id") for r in (doc_first, doc_second)] == ["normans", "normans"]
    assert "Rollo" in doc_first["answer"] and doc_first["answer"] == kv["answer"]  # the same question and passage
    first, second = doc_first["timings_ms"], doc_second["timings_ms"]
    assert first["edge_prefill"] > first["edge_question_prefill"]  # the document was prefilled for the first
    assert second["edge_prefill"] == second["edge_question_prefill"] > 0  # the second: its own question only
    assert [r["mode"] for r in (kv, scout, text)] == ["kv", "scout", "text"]
    for r in (kv, scout, text):
        assert "Rollo" in r["answer"], r  # "Who was the leader of the Norse raiders?"
    prompt = text["prompt_tokens"]
    assert kv["prompt_tokens"] == scout["prompt_tokens"] == prompt and text["kept_positions"] == prompt - 1
    # kv at the defaults: every context position at the edge's default profile
    assert kv["request"]["profile"] == DEFAULT_PROFILE and kv["kept_positions"] == prompt - 1
    assert scout["kept_positions"] < kv["kept_positions"]  # half the context dropped
    assert 0.25 < kv["wire_ratio"] < 0.35  # kivi-4: 4 bits per value with its scales and zero points
    assert scout["wire_ratio"] < 0.001 and scout["bytes_on_wire"] < 8 * prompt  # ids and positions only
    assert text["bytes_on_wire"] == len(DEMO["context"].encode()) + len(DEMO["questions"][0].encode())
    assert (
        kv["timings_ms"]["edge_prefill"] > 0 and kv["timings_ms"]["inject"] > 0 and scout["timings_ms"]["prefill"] > 0
    )
    print_report("Who was the leader of the Norse raiders?", results)
    assert "bytes on the wire" in capsys.readouterr().out
