"""`kvwire bench link`: argument parsing, the context builder, and one real run of the benchmark on
the tiny model across a shaped link (skips where the network lab cannot run, as tests/test_link.py)."""

from __future__ import annotations

import json

import pytest

from kvwire.bench import link
from kvwire.bench.main import main
from kvwire.bench.netlab import NetlabUnavailable
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


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (link.parse_bandwidths, "10mbps/s", "tc syntax"),
        (link.parse_bandwidths, "", "at least one"),
        (link.parse_delay, "20 parsecs", "20ms"),
        (link.parse_tokens, "512,lots", "comma list"),
        (link.parse_tokens, "0", "positive"),
        (link.parse_modes, "kv,text", "known: text, kv-fp16"),
    ],
)
def test_bad_arguments_say_what_is_accepted(parse, text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)


def test_bad_repeats_exit_2_with_a_message(capsys):
    assert main(["bench", "link", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


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


def test_text_mode_is_the_unit_of_every_ratio():
    rows = [
        {
            "bandwidth": "1gbit",
            "tokens": 8,
            "mode": m,
            "ttft_s": t,
            "total_s": 2 * t,
            "ttft_minus_edge_prefill_s": t - e,
        }
        for m, t, e in (("text", 2.0, 0.0), ("kv-fp16", 3.0, 1.5))
    ]
    link.add_ratios(rows)
    assert [(r["ttft_vs_text"], r["total_vs_text"], r["ttft_minus_edge_prefill_vs_text"]) for r in rows] == [
        (1.0, 1.0, 1.0),
        (1.5, 1.5, 0.75),
    ]
    assert link.verdicts(rows) == [
        "1gbit, 8 tokens: beats text on first token: none; beats text on total: none; "
        "beats text on first token with the edge's prefill done ahead: kv-fp16 (0.75)"
    ]


def test_run_across_the_shaped_link_on_the_tiny_model(tiny_model_dir, capsys):
    try:
        check_available()
    except NetlabUnavailable as e:
        pytest.skip(f"netlab: {e}")
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
        "text,kv-mixed-int4",
        "--max-new-tokens",
        "4",
        "--timeout",
        "60",
        "--json",
    ]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["bandwidth"], r["tokens"], r["mode"]) for r in rows] == [
        ("50mbit", 96, "text"),
        ("50mbit", 96, "kv-mixed-int4"),
    ]
    text, kv = rows
    assert "error" not in text and "error" not in kv, rows
    assert text["ttft_vs_text"] == text["total_vs_text"] == text["ttft_minus_edge_prefill_vs_text"] == 1.0
    assert 0 < text["bytes"] < kv["bytes"]  # text mode counts its UTF-8 bytes; the KV of 96 tokens is far larger
    assert text["complete"] and kv["complete"]
    assert text["context_tokens"] == kv["context_tokens"] == 96
    assert kv["kept_positions"] == kv["prompt_tokens"] - 1  # retention 1.0: every streamed position
    for r in rows:
        assert 0 < r["ttft_minus_edge_prefill_s"] <= r["ttft_s"] <= r["total_s"]
        assert r["ttft_vs_text"] == pytest.approx(r["ttft_s"] / text["ttft_s"], abs=1e-3)
    # one relayed gRPC stream crosses the 2 x 5 ms delay at least once
    assert kv["total_s"] >= 0.01
