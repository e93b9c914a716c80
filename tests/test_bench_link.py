"""`kvwire bench link`: argument parsing, the context and question-set builders, rows, ratios,
verdicts and targets on synthetic measurements, the CPU-time reader, and one real run of the
benchmark on the tiny model across a shaped link, cold and cached, with the many-questions workload
(skips where the network lab cannot run, as tests/test_link.py)."""

from __future__ import annotations

import json
import os

import pytest

from kvwire.bench import link, link_report
from kvwire.bench.data import Example
from kvwire.bench.link_questions import pick_question_set
from kvwire.bench.main import main
from kvwire.bench.netlab import NetlabUnavailable
from kvwire.bench.netlab.daemons import parse_stat_cpu, process_cpu_seconds
from kvwire.bench.netlab.namespaces import check_available
from kvwire.kvcodec.errors import ConfigError


def test_parses_bandwidths_delay_tokens_and_modes():
    assert link.parse_bandwidths("10mbit,100mbit") == ["10mbit", "100mbit"]
    assert link.parse_bandwidths(" 1gbit ") == ["1gbit"]
    assert link.parse_delay("20ms") == 20.0
    assert link.parse_delay("0") == 0.0 and link.parse_delay("0.1s") == 100.0 and link.parse_delay("500us") == 0.5
    assert link.parse_tokens("512,2048") == [512, 2048]
    # text is always measured, first: every ratio divides by it
    assert link.parse_modes("kv-fp16,text,kv-fp16") == ["text", "kv-fp16"]
    assert link.parse_cases("cached, cold,cached") == ["cached", "cold"]


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (link.parse_bandwidths, "10mbps/s", "tc syntax"),
        (link.parse_bandwidths, "", "at least one"),
        (link.parse_delay, "20 parsecs", "20ms"),
        (link.parse_tokens, "512,lots", "comma list"),
        (link.parse_tokens, "0", "positive"),
        (link.parse_modes, "kv,text", "known: text, kv-fp16"),
        (link.parse_cases, "warm", "known: cold, cached"),
        (link.parse_cases, "", "none given"),
    ],
)
def test_bad_arguments_say_what_is_accepted(parse, text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--questions", "-1"], "--questions must be >= 0"),
        (["--qa-tokens", "0"], "--qa-tokens must be >= 1"),
        (["--qa-bandwidth", "fast"], "tc syntax"),
        (["--cases", "lukewarm"], "known: cold, cached"),
    ],
)
def test_bad_options_exit_2_with_a_message(flags, message, capsys):
    assert main(["bench", "link", *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_run_is_bounded_by_its_request_count():
    cfg = link.LinkConfig(bandwidths=["10mbit", "1gbit"], tokens=[512, 2048], repeats=3, questions=20)
    # warm-ups 7 modes x 2 pairs, 2 documents prefilled + the workload's, with auto a settling stream per pair
    # and rate (2 x 2), grid 7 x 2 cases x 2 x 2 x 3, 20 x 7
    assert cfg.pairs == ["cold", "cached"]
    assert len(cfg.modes) == 7
    assert cfg.requests == 14 + 2 + 1 + 4 + 168 + 140
    only_cold = link.LinkConfig(bandwidths=["1gbit"], cases=["cold"], questions=5, modes=["kv-fp16"])
    assert only_cold.pairs == ["cold", "cached"]  # the workload needs the cached pair
    assert only_cold.requests == 2 * 2 + 0 + 1 + 2 * 2 + 2 * 5


def test_no_lab_exits_2_with_the_reason(monkeypatch, capsys):
    from kvwire.bench.netlab import namespaces

    def refuse():
        raise NetlabUnavailable("network namespaces need root (CI runs as root; run `sudo make test`)")

    monkeypatch.setattr(namespaces, "check_available", refuse)
    assert main(["bench", "link", "--bandwidth", "10mbit", "--tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "the network lab cannot run here: network namespaces need root" in err


def test_context_has_exactly_the_asked_tokens_and_asks_about_the_first_passage(tiny_loaded):
    from kvwire.bench.data import SQUAD_SAMPLE, load_examples

    tok = tiny_loaded.tokenizer
    first = load_examples(SQUAD_SAMPLE)[0]
    for n in (40, 333):
        context, question, meta = link.build_context(tok, n)
        assert len(tok(context, add_special_tokens=False)["input_ids"]) == meta["context_tokens"] == n
        assert first.context.strip().startswith(context[:50]) and question == first.question
    assert link.build_context(tok, 333)[0] == link.build_context(tok, 333)[0]  # deterministic
    with pytest.raises(ConfigError, match="ask for at most"):
        link.build_context(tok, 10**7)


def _row(mode, ttft, case="cold", bandwidth="1gbit", tokens=8, edge=0.0, **extra):
    return {
        "table": "link",
        "bandwidth": bandwidth,
        "tokens": tokens,
        "case": case,
        "mode": mode,
        "ttft_s": ttft,
        "total_s": 2 * ttft,
        "ttft_minus_edge_prefill_s": ttft - edge,
        "bytes": 1000,
        "complete": True,
        **extra,
    }


def test_text_mode_of_the_same_cell_and_case_is_the_unit_of_every_ratio():
    rows = [
        _row("text", 2.0),
        _row("kv-fp16", 3.0, edge=1.5),
        _row("text", 4.0, case="cached"),
        _row("kv-fp16", 1.0, case="cached", edge=0.1, cache_hits=1, cache_misses=0),
    ]
    link_report.add_ratios(rows)
    assert [(r["ttft_vs_text"], r["total_vs_text"], r["ttft_minus_edge_prefill_vs_text"]) for r in rows] == [
        (1.0, 1.0, 1.0),
        (1.5, 1.5, 0.75),
        (1.0, 1.0, 1.0),
        (0.25, 0.25, 0.225),  # over the cached text row, not the cold one
    ]
    assert link_report.verdicts(rows) == [
        "1gbit, 8 tokens, cold: beats text on first token: none; beats text on total: none; "
        "beats text on first token with the edge's prefill done ahead: kv-fp16 (0.75)",
        "1gbit, 8 tokens, cached: beats text on first token: kv-fp16 (0.25); beats text on total: kv-fp16 (0.25)",
    ]
    table = link_report.format_rows(rows)
    assert table.count("| bandwidth | tokens | mode |") == 2  # one table per case
    assert "**cold**" in table and "**cached**" in table
    assert "| 1gbit | 8 | kv-fp16 | " in table and table.rstrip().endswith("| hit 1/1 |")


def test_auto_is_judged_against_the_best_fixed_mode_of_its_cell_and_text():
    rows = [
        _row("text", 2.0),
        _row("kv-fp16", 1.0),
        _row("auto", 1.05, auto_chose="kv q2c@1 fp16 x1", auto_chose_counts={"kv q2c@1 fp16": 1}, answered=1),
        _row("text", 2.0, case="cached"),
        _row("kv-fp16", 1.0, case="cached"),
        _row("auto", 2.0, case="cached", auto_chose="text x1", auto_chose_counts={"text": 1}, answered=1),
        _row("text", 1.0, bandwidth="10mbit"),  # a cell without auto: no line
    ]
    for r in rows:
        r["request"] = link.MODES[r["mode"]]
    link_report.add_quality(rows, [{"mode": "kv", "profile": "fp16", "retention": 1.0, "quality": 0.999}])
    assert link_report.auto_verdicts(rows) == [
        "1gbit, 8 tokens, cold: auto 1.05x the oracle (kv-fp16, quality >= 0.95), 0.53x text, 1.05x the fastest "
        "regardless of quality (kv-fp16); chose kv q2c@1 fp16 x1 (the oracle's setting 1 of 1): met",
        "1gbit, 8 tokens, cached: auto 2.00x the oracle (kv-fp16, quality >= 0.95), 1.00x text, 2.00x the fastest "
        "regardless of quality (kv-fp16); chose text x1 (the oracle's setting 0 of 1): MISSED (targets <= 1.1x oracle, "
        "<= 1.05x text)",
    ]
    request = link._request(link.LinkConfig(bandwidths=["1gbit"]), "auto", "q?", doc_id="d")
    assert request["mode"] == "auto" and "deadline_ms" not in request  # a deadline would change auto's rule
    assert "deadline_ms" in link._request(link.LinkConfig(bandwidths=["1gbit"]), "kv-fp16", "q?", doc_id="d")


def test_the_oracle_is_the_fastest_fixed_mode_at_or_above_the_quality_floor():
    rows = [
        _row("text", 2.0),
        _row("kv-fp16", 1.0),
        _row("kv-q2c0.5-mixed-int4", 0.5),  # fastest, but its quality is below the floor
        _row("scout-sparse-q2c0.5", 0.4),  # faster still, and not in the table: never the oracle
        _row(
            "auto",
            1.05,
            auto_chose="kv q2c@1 fp16 x2",
            auto_chose_counts={"kv q2c@1 fp16": 2},
            answered=2,
            auto_quality=0.999,
            prediction_ratio=0.9,
            prediction_ratios=[0.8, 1.0],
        ),
    ]
    for r in rows:
        r["request"] = link.MODES[r["mode"]]
    table = [
        {"mode": "kv", "selector": "q2c", "retention": 1.0, "profile": "fp16", "quality": 0.999},
        {"mode": "kv", "selector": "q2c", "retention": 0.5, "profile": "mixed-int4", "quality": 0.458},
    ]
    link_report.add_quality(rows, table)
    assert [r["quality"] for r in rows] == [1.0, 0.999, 0.458, None, 0.999]
    (cell,) = link_report.auto_cells(rows)
    assert (cell["oracle"], cell["fastest"], cell["fastest_quality"]) == ("kv-fp16", "scout-sparse-q2c0.5", None)
    assert (cell["auto_vs_oracle"], cell["auto_vs_text"], cell["auto_vs_fastest"]) == (1.05, 0.525, 2.625)
    assert cell["met"] and cell["prediction_ratio"] == 0.9 and cell["chose_oracle"] == 2
    # a floor nothing but text meets: text is the oracle
    (strict,) = link_report.auto_cells(rows, min_quality=0.9995)
    assert strict["oracle"] == "text" and strict["auto_vs_oracle"] == 0.525
    table_md = link_report.format_auto(rows)
    assert "| cold | 1gbit | 8 | 2.00 | kv-fp16 | 1.00 | scout-sparse-q2c0.5 0.40 s | 1.05 |" in table_md
    assert "| kv q2c@1 fp16 x2 | 2/2 | 1.05 | 0.53 | 0.90 [0.80–1.00] | met |" in table_md


def test_prediction_error_is_predicted_over_the_clouds_measured_ttft():
    samples = [
        _sample(1.0, auto_chose="text", auto_predicted_ttft_s=1.2, cloud_ttft_s=1.0, auto_quality=1.0),
        _sample(2.0, auto_chose="text", auto_predicted_ttft_s=1.0, cloud_ttft_s=2.0, auto_quality=1.0),
        _sample(2.0, auto_chose="kv q2c@1 fp16", auto_predicted_ttft_s=0.9, cloud_ttft_s=1.0, auto_quality=0.999),
    ]
    row = link_report.summarize("1gbit", 8, "cold", "auto", {"mode": "auto"}, samples)
    assert row["prediction_ratios"] == [1.2, 0.5, 0.9] and row["prediction_ratio"] == 0.9
    assert row["auto_quality"] == 0.999 and row["auto_chose"] == "text x2, kv q2c@1 fp16 x1"
    assert row["auto_chose_counts"] == {"text": 2, "kv q2c@1 fp16": 1}
    assert row["auto_predictions"] == []  # no auto_choice log line was read for these samples
    logged = [
        {"event": "auto_choice", "chose": "text", "predicted_ttft_ms": {"text": 900}, "edge_holds_prefix": False},
        {"event": "answer", "mode": "text"},
        {"event": "auto_choice", "chose": "kv q2c@1 fp16", "predicted_ttft_ms": {"text": 900, "kv q2c@1 fp16": 500}},
        {"event": "answer", "mode": "kv"},
    ]
    last = link.last_auto_choice(logged)
    assert last["chose"] == "kv q2c@1 fp16" and last["predicted_ttft_ms"]["kv q2c@1 fp16"] == 500
    assert link.last_auto_choice(logged[1:2]) is None


def test_modes_rotate_between_repeats():
    modes = ["text", "kv-fp16", "auto"]
    assert [link.rotated(modes, rep) for rep in range(4)] == [
        ["text", "kv-fp16", "auto"],
        ["kv-fp16", "auto", "text"],
        ["auto", "text", "kv-fp16"],
        ["text", "kv-fp16", "auto"],
    ]


def _change(phase, index, chose, ttft, rate):
    return {"phase": phase, "index": index, "rate": rate, "auto_chose": chose, "ttft_s": ttft, "cloud_ttft_s": ttft}


def test_rate_change_counts_the_requests_until_auto_switches():
    fast, slow, kv = "1gbit", "10mbit", "kv q2c@1 fp16"
    samples = [
        _change("before", 1, kv, 0.8, fast),
        _change("before", 2, kv, 0.7, fast),
        _change("after", 1, kv, 12.0, slow),
        _change("after", 2, "text", 3.1, slow),
        _change("after", 3, "text", 2.9, slow),
        {"phase": "text", "index": 1, "rate": slow, "ttft_s": 3.0, "cloud_ttft_s": 3.0},
    ]
    r = link_report.summarize_rate_change(samples)
    assert (r["before_rate"], r["after_rate"], r["chose_before"], r["chose_after"]) == (fast, slow, kv, "text")
    assert r["switched_at"] == 2 and r["ttft_until_switch_s"] == [12.0, 3.1]
    assert (r["ttft_after_switch_s"], r["text_ttft_s"], r["ttft_before_s"]) == (2.9, 3.0, 0.75)
    text = link_report.format_rate_change(samples)
    assert "switched from kv q2c@1 fp16 to text on request 2 after the change (1 answered the old way first)" in text
    fell = {**samples[2], "fallback": "text"}
    assert "| kv q2c@1 fp16 (the stream failed: text answered) | 12.00 |" in link_report.format_rate_change([fell])
    failed = [samples[0], samples[1], {"phase": "after", "index": 1, "rate": slow, "error": "HTTP 503"}, *samples[3:]]
    assert link_report.summarize_rate_change(failed)["failed_before_switch"] == 1
    assert "(0 answered the old way first, 1 failed)" in link_report.format_rate_change(failed)
    never = link_report.summarize_rate_change(samples[:3])
    assert never["switched_at"] is None and never["ttft_until_switch_s"] == [12.0]
    assert "kept kv q2c@1 fp16 for all 1 requests" in link_report.format_rate_change(samples[:3])


def test_rate_change_options_are_checked_and_bound_the_run():
    assert link.parse_rate_change("1gbit:10mbit") == ("1gbit", "10mbit")
    assert link.parse_counts("3:7") == (3, 7)
    for bad in ("1gbit", "1gbit:", "fast:10mbit"):
        with pytest.raises(ConfigError):
            link.parse_rate_change(bad)
    with pytest.raises(ConfigError, match="BEFORE:AFTER"):
        link.parse_counts("3")
    with pytest.raises(ConfigError, match=r"\[1, 100\]"):
        link.LinkConfig(bandwidths=["1gbit"], rate_change=("1gbit", "10mbit"), rate_change_requests=(0, 5))
    cfg = link.LinkConfig(
        bandwidths=["1gbit"],
        tokens=[512],
        cases=["cold"],
        modes=["kv-fp16"],
        questions=0,
        rate_change=("1gbit", "10mbit"),
    )
    assert cfg.modes == ["text", "kv-fp16", "auto"] and cfg.pairs == ["cold", "cached"] and cfg.documents == [512]
    # warm-ups 3 modes x 2 pairs, one document, a settling stream per pair and rate, grid 3 x 1 case, the change's
    # 5 + 10 and one text
    assert cfg.requests == 6 + 1 + 2 + 3 + 16


def test_a_row_without_its_text_row_has_no_ratio():
    rows = link_report.add_ratios([_row("kv-fp16", 3.0, bandwidth="10mbit"), _row("text", 1.0)])
    assert rows[0]["ttft_vs_text"] is None and rows[1]["ttft_vs_text"] == 1.0
    assert "| – | – | – |" in link_report.format_rows(rows)


def _sample(ttft, hits=None, error=None, **kw):
    if error:
        return {"error": error}
    s = {
        "ttft_s": ttft,
        "total_s": ttft + 1,
        "ttft_minus_edge_prefill_s": ttft,
        "bytes": 100,
        "context_tokens": 8,
        "prompt_tokens": 20,
        "kept_positions": 19,
        "answer": "a",
        "complete": True,
        "timings_ms": {"generate": 10.0},
        **kw,
    }
    if hits is not None:
        s["cache_hits"], s["cache_misses"] = hits
    return s


def test_summarize_takes_medians_and_counts_the_edge_cache():
    row = link_report.summarize(
        "100mbit",
        8,
        "cached",
        "kv-fp16",
        {"mode": "kv"},
        [_sample(3.0, (1, 0)), _sample(1.0, (0, 1)), _sample(2.0, (1, 0))],
    )
    assert (row["ttft_s"], row["total_s"], row["answered"], row["repeats"]) == (2.0, 3.0, 3, 3)
    assert (row["cache_hits"], row["cache_misses"]) == (2, 1)
    assert link_report.cache_note({**row, "case": "cached"}) == "MISSED 1/3"
    failed = link_report.summarize("100mbit", 8, "cold", "text", {}, [_sample(0, error="HTTP 500: boom")])
    assert failed["error"] == "HTTP 500: boom" and failed["answered"] == 0
    assert "error: HTTP 500: boom" in link_report.format_rows([failed])


def test_targets_are_met_missed_or_not_measured():
    def cached(mode, ratio, bandwidth="100mbit", tokens=2048, misses=0):
        return {**_row(mode, 1.0, "cached", bandwidth, tokens), "ttft_vs_text": ratio, "cache_misses": misses}

    rows = [
        cached("kv-q2c0.5-mixed-int4", 0.2),
        cached("kv-q2c0.5-mixed-int4", 0.9, bandwidth="10mbit"),  # not a cell of the first target
        cached("scout-sparse-q2c0.5", 0.6),
        cached("scout-sparse-q2c0.5", 0.71, bandwidth="10mbit", tokens=512),
        {**_row("scout-sparse-q2c0.5", 1.0, "cold"), "ttft_vs_text": 2.0},  # cold rows are not targets
    ]
    assert link_report.target_verdicts(rows) == [
        "target kv-q2c0.5-mixed-int4 on a cached 2048-token document at 100mbit: TTFT <= 0.25x text's: "
        "met (100mbit 2048 0.20)",
        "target scout-sparse-q2c0.5 on a cached document on every link: TTFT <= 0.7x text's: "
        "MISSED (100mbit 2048 0.60, 10mbit 512 0.71)",
    ]
    # a ratio under the target from a request that missed the edge's cache is not a cached measurement
    missed = link_report.target_verdicts([cached("kv-q2c0.5-mixed-int4", 0.1, misses=1)])[0]
    assert "MISSED (100mbit 2048 0.10 (edge cache missed))" in missed
    assert link_report.target_verdicts([])[1].endswith("not measured (no such row in this run)")
    no_answer = {**cached("scout-sparse-q2c0.5", None)}
    assert "MISSED (100mbit 2048 no answer)" in link_report.target_verdicts([no_answer])[1]


def test_questions_summary_pairs_each_question_with_text():
    samples = []
    for q, (t_text, t_kv) in enumerate([(2.0, 0.5), (4.0, 2.0)]):
        samples.append({"mode": "text", "question": q, **_sample(t_text, edge_cpu_s=0.0, cloud_cpu_s=2.0, f1=1.0)})
        samples.append(
            {"mode": "kv-fp16", "question": q, **_sample(t_kv, (1, 0), edge_cpu_s=0.5, cloud_cpu_s=0.25, f1=0.5)}
        )
    samples.append({"mode": "scout-full-q2c0.5", "question": 0, "error": "HTTP 504: late"})
    text, kv, scout = link_report.summarize_questions(samples)
    assert (text["ttft_s"], text["ttft_vs_text"], text["ttft_vs_text_se"]) == (3.0, 1.0, 0.0)
    # per-question ratios 0.25 and 0.5: mean 0.375, SE = stdev / sqrt(2) = 0.125
    assert (kv["ttft_vs_text"], kv["ttft_vs_text_se"]) == (0.375, 0.125)
    assert (kv["edge_cpu_s"], kv["cloud_cpu_s"], kv["cpu_s"], kv["f1"]) == (0.5, 0.25, 0.75, 0.5)
    assert (kv["cache_hits"], kv["cache_misses"]) == (2, 0) and "cache_hits" not in text
    assert scout == {
        "table": "questions",
        "mode": "scout-full-q2c0.5",
        "questions": 1,
        "answered": 0,
        "error": "HTTP 504: late",
    }
    meta = {"context_tokens": 900, "title": "T", "paragraphs": 3, "questions": 2, "bandwidth": "100mbit"}
    table = link_report.format_questions([text, kv, scout], {**meta, "prefix_prefill_s": 4.0, "prefix_edge_cpu_s": 4.1})
    assert "| kv-fp16 | 2/2 | 1.25 ± 0.75 | 0.38 ± 0.12 | 0.500 ± 0.000 | 0.250 ± 0.000 |" in table
    assert "| scout-full-q2c0.5 | 0/1 | error: HTTP 504: late |" in table


def _examples(paragraphs):
    """SQuAD-like examples: article title -> list of (paragraph text, number of questions)."""
    out = []
    for title, paras in paragraphs.items():
        for p, (text, n) in enumerate(paras):
            out += [Example(f"{title}-{p}-{q}", text, f"{title} p{p} q{q}?", ("x",), title) for q in range(n)]
    return out


def test_question_set_is_whole_paragraphs_within_the_budget_and_spreads_its_questions():
    words = len  # one "token" a character keeps the budget arithmetic visible
    exs = _examples({"Short": [("a" * 50, 1)], "Long": [("b" * 40, 3), ("c" * 40, 2), ("d" * 40, 9)]})
    qs = pick_question_set(exs, max_tokens=90, count=4, count_tokens=words)
    # Short holds 1 question only; Long's first two paragraphs fit in 40 + 2 + 40 = 82 <= 90, the third does not
    assert (qs.title, qs.paragraphs, qs.context_tokens) == ("Long", 2, 82)
    assert qs.text == "b" * 40 + "\n\n" + "c" * 40
    assert [ex.question for ex in qs.questions] == ["Long p0 q0?", "Long p1 q0?", "Long p0 q1?", "Long p1 q1?"]
    with pytest.raises(ConfigError, match="hold 6 questions \\(at most 5\\)"):
        pick_question_set(exs, max_tokens=90, count=6, count_tokens=words)
    with pytest.raises(ConfigError, match="--questions must be >= 1"):
        pick_question_set(exs, max_tokens=90, count=0, count_tokens=words)


def test_cpu_seconds_come_from_the_process_stat_line():
    # the command name may hold spaces and parentheses: fields are counted after the last ')'
    line = "4242 (python (kv) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 731 52 0 0 20 0 9 0 12345 0 0"
    assert parse_stat_cpu(line) == 731 + 52
    before = process_cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))  # some CPU work of this process
    assert process_cpu_seconds(os.getpid()) >= before > 0


def _squad_file(path, passages):
    """A SQuAD-format file: one article of these passages, two questions each."""
    paragraphs = [
        {
            "context": p,
            "qas": [
                {
                    "id": f"p{i}q{j}",
                    "question": f"What is passage {i} about ({j})?",
                    "answers": [{"text": p.split()[0], "answer_start": 0}],
                }
                for j in range(2)
            ],
        }
        for i, p in enumerate(passages)
    ]
    path.write_text(json.dumps({"data": [{"title": "Lab", "paragraphs": paragraphs}]}))
    return str(path)


def test_run_across_the_shaped_link_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    try:
        check_available()
    except NetlabUnavailable as e:
        pytest.skip(f"netlab: {e}")
    from kvwire.bench.data import SQUAD_SAMPLE, load_examples

    # two short passages: both fit in --qa-tokens and the tiny model's 1024-token window
    passages = [p[:250] for p in dict.fromkeys(ex.context.strip() for ex in load_examples(SQUAD_SAMPLE))][:2]
    argv = [
        "bench",
        "link",
        "--model",
        tiny_model_dir,
        "--bandwidth",
        "50mbit",
        "--delay",
        "5ms",
        "--tokens",
        "96",
        "--modes",
        "text,kv-mixed-int4,scout-sparse-q2c0.5",
        "--max-new-tokens",
        "4",
        "--timeout",
        "60",
        "--questions",
        "3",
        "--qa-tokens",
        "600",
        "--qa-bandwidth",
        "1gbit",
        "--qa-data",
        _squad_file(tmp_path / "squad.json", passages),
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = [r for r in out if r["table"] == "link"]
    modes = ["text", "kv-mixed-int4", "scout-sparse-q2c0.5"]
    assert [(r["bandwidth"], r["tokens"], r["case"], r["mode"]) for r in rows] == [
        ("50mbit", 96, case, mode) for case in ("cold", "cached") for mode in modes
    ]
    assert not [r for r in rows if "error" in r], rows
    cold, cached = {r["mode"]: r for r in rows[:3]}, {r["mode"]: r for r in rows[3:]}
    for case in (cold, cached):
        text, kv = case["text"], case["kv-mixed-int4"]
        assert text["ttft_vs_text"] == text["total_vs_text"] == 1.0
        assert 0 < text["bytes"] < kv["bytes"]  # text counts its UTF-8 bytes; the KV of 96 tokens is far larger
        assert text["context_tokens"] == kv["context_tokens"] == 96
        assert kv["kept_positions"] == kv["prompt_tokens"] - 1  # retention 1.0: every streamed position
        for r in case.values():
            assert r["complete"]
            assert 0 < r["ttft_minus_edge_prefill_s"] <= r["ttft_s"] <= r["total_s"]
            assert r["ttft_vs_text"] == pytest.approx(r["ttft_s"] / text["ttft_s"], abs=1e-3)
    # the same text crosses the link in both cases: inline in the request, or fetched from the edge
    assert cold["text"]["bytes"] == cached["text"]["bytes"]
    # the cached rows were served from the edge's prefix cache: one hit per streamed request, no miss,
    # and the edge prefilled only the question
    for mode in ("kv-mixed-int4", "scout-sparse-q2c0.5"):
        assert (cached[mode]["cache_hits"], cached[mode]["cache_misses"]) == (1, 0)
        t = cached[mode]["timings_ms"]
        assert t["edge_prefill"] == t["edge_question_prefill"] > 0
        assert "cache_hits" not in cold[mode]  # the cold edge has no cache to count
    assert cold["kv-mixed-int4"]["timings_ms"]["edge_question_prefill"] == 0  # the cold edge prefills it all
    assert "cache_hits" not in cached["text"]

    questions = [r for r in out if r["table"] == "questions"]
    assert [r["mode"] for r in questions] == modes
    doc = questions[0]["document"]
    assert (doc["title"], doc["paragraphs"], doc["questions"], doc["bandwidth"]) == ("Lab", 2, 3, "1gbit")
    assert doc["prefix_prefill_s"] > 0
    for r in questions:
        assert r["answered"] == r["questions"] == 3, r
        assert r["edge_cpu_s"] >= 0 and r["cloud_cpu_s"] > 0 and 0 <= r["f1"] <= 1
    by_mode = {r["mode"]: r for r in questions}
    assert by_mode["text"]["ttft_vs_text"] == 1.0
    assert (by_mode["kv-mixed-int4"]["cache_hits"], by_mode["kv-mixed-int4"]["cache_misses"]) == (3, 0)
