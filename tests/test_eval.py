"""`kvwire eval` and `kvwire diagnose` end to end on the tiny model: schema, self-agreement, reports, resume."""

from __future__ import annotations

import json

import pytest

from kvwire.bench.main import main

# Short passages in the tiny tokenizer's vocabulary (SQuAD text runs to ~1000 of its tokens per paragraph).
PASSAGES = [
    (
        "Normans",
        "The Normans gave their name to Normandy, a region in France. Their leader was Rollo.",
        "Who was the leader of the Normans?",
        ["Rollo"],
    ),
    (
        "Paris",
        "The Eiffel Tower is in Paris. It was built in 1889. The river Seine flows through the city.",
        "When was the Eiffel Tower built?",
        ["1889"],
    ),
    (
        "Seine",
        "The river Seine flows through Paris. The city is in France.",
        "Which river flows through Paris?",
        ["Seine", "The river Seine"],
    ),
    (
        "Raiders",
        "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.",
        "Where were the raiders from?",
        ["Denmark, Iceland and Norway"],
    ),
    (
        "King",
        "Rollo agreed to swear fealty to King Charles III of West Francia.",
        "To whom did Rollo swear fealty?",
        ["King Charles III"],
    ),
    (
        "Centuries",
        "In the 10th and 11th centuries the Normans gave their name to a region.",
        "In which centuries did they name the region?",
        ["10th and 11th"],
    ),
]


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "title": t, "context": c, "question": q, "answers": a}) + "\n"
            for i, (t, c, q, a) in enumerate(PASSAGES)
        )
    )
    return str(path)


ROW_KEYS = {
    "selector",
    "retention",
    "profile",
    "n",
    "f1",
    "em",
    "agreement_f1",
    "identical",
    "pct_of_full_f1",
    "bytes",
    "wire_ratio",
}


def _eval(tiny_model_dir, qa_file, out, *extra) -> int:
    fp32 = out / "fp32.json"  # a profile file: every layer passes through at fp32, i.e. the exact cache
    fp32.write_text(json.dumps({"name": "fp32", "default": {"k": {"kind": "fp32"}, "v": {"kind": "fp32"}}}))
    return main(
        [
            "eval",
            "--model",
            tiny_model_dir,
            "--data",
            qa_file,
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
            "--selectors",
            "q2c,random",
            "--retentions",
            "0.5,1.0",
            "--profiles",
            "int8",
            "--setting",
            f"none:1.0:{fp32},q2c:0.5:mixed-int4",
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, qa_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert _eval(tiny_model_dir, qa_file, out, "--quality-table", str(out / "quality.json")) == 0
    return out


def test_a_complete_run_writes_the_quality_table_auto_loads(eval_run):
    from kvwire.cloud_agent.auto import QualityTable

    table = QualityTable.load(eval_run / "quality.json")
    rows = {(c.setting.selector, c.setting.retention, c.setting.profile): c for c in table.candidates}
    results = {
        (r["selector"], r["retention"], r["profile"]): r
        for r in json.loads((eval_run / "results.json").read_text())["rows"]
    }
    assert set(rows) == {("q2c", 0.5, "int8"), ("random", 0.5, "int8"), ("q2c", 1.0, "int8"), ("q2c", 1.0, "fp32"),
                         ("q2c", 0.5, "mixed-int4")}  # fmt: skip  # "none" is q2c at retention 1: no selection
    assert all(c.setting.mode == "kv" for c in table.candidates)
    assert rows[("q2c", 1.0, "fp32")].quality == 1.0  # the exact cache: teacher-forced top-1 agreement 1
    got = rows[("q2c", 0.5, "int8")]
    assert got.quality == results[("q2c", 0.5, "int8")]["tf_top1"]
    assert got.wire_ratio == results[("q2c", 0.5, "int8")]["wire_ratio"]
    assert "teacher-forced top-1 agreement" in table.measure


def test_results_schema_and_baselines(eval_run):
    rows = json.loads((eval_run / "results.json").read_text())["rows"]
    assert isinstance(rows, list)
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["n"] == 3
    by = {(r["selector"], r["retention"], r["profile"]): r for r in rows}
    assert set(by) == {
        ("full", 1.0, "-"),
        ("text", 1.0, "-"),
        ("q2c", 0.5, "int8"),
        ("random", 0.5, "int8"),
        ("none", 1.0, "int8"),
        ("none", 1.0, "fp32"),
        ("q2c", 0.5, "mixed-int4"),
    }
    full = by[("full", 1.0, "-")]
    assert full["agreement_f1"] == 1.0 and full["identical"] == 1.0 and full["wire_ratio"] == 1.0
    assert full["pct_of_full_f1"] in (100.0, None)  # None when the random model scores F1 0
    # fp32 passthrough of every position is the full cache: the answers must be the same tokens
    assert by[("none", 1.0, "fp32")]["identical"] == 1.0
    text = by[("text", 1.0, "-")]
    assert text["identical"] == 1.0 and 0 < text["bytes"] < full["bytes"]
    # selection at 0.5 sends fewer bytes than all positions at the same precision
    assert by[("q2c", 0.5, "int8")]["bytes"] < by[("none", 1.0, "int8")]["bytes"] < by[("none", 1.0, "fp32")]["bytes"]
    # teacher-forced: the exact cache follows the full answer at every position; int8 is measurably off
    exact = by[("none", 1.0, "fp32")]
    assert exact["tf_top1"] == 1.0 and exact["tf_kl"] < 1e-6 and exact["tf_n"] == 3
    assert full["tf_top1"] == 1.0 and full["tf_kl"] == 0.0
    assert by[("none", 1.0, "int8")]["tf_kl"] > 0 and by[("q2c", 0.5, "int8")]["tf_kl"] > 0
    for row in rows:
        assert set(row["se"]) == {"f1", "em", "agreement_f1", "identical", "tf_top1", "tf_kl"}
    assert by[("none", 1.0, "fp32")]["se"]["tf_top1"] == 0.0  # no per-question spread: SE 0


def test_records_carry_the_examples_metadata(eval_run, qa_file):
    recs = [json.loads(line) for line in (eval_run / "records.jsonl").read_text().splitlines()]
    titles = {t for t, *_ in PASSAGES}
    assert all(r["source"] == qa_file and r["title"] in titles and r["meta"] == {} for r in recs)


def test_reports_written(eval_run):
    md = (eval_run / "results.md").read_text()
    assert "| selector | retention | profile | n | F1 |" in md and "| q2c | 0.5 | mixed-int4 | 3 |" in md
    assert "top-1 agreement | KL (nats/token)" in md and "PARTIAL" not in md
    assert "Teacher-forced Pareto front, cheapest first:" in md and "top-1 >= 0.95" in md
    assert json.loads((eval_run / "results.json").read_text())["partial"] is False
    assert (eval_run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((eval_run / "run.json").read_text())
    assert run["runtime"]["questions"] == 3 and run["runtime"]["seconds_per_question"] > 0


def test_resume_skips_finished_work(eval_run, tiny_model_dir, qa_file, capsys):
    records = (eval_run / "records.jsonl").read_text().splitlines()
    assert len(records) == 3 * 7
    # a run killed mid-write: drop the last record, leave a torn line; the rerun redoes exactly that one
    (eval_run / "records.jsonl").write_text("\n".join(records[:-1]) + "\n" + records[-1][:25])
    assert _eval(tiny_model_dir, qa_file, eval_run) == 0
    after = [json.loads(line) for line in (eval_run / "records.jsonl").read_text().splitlines() if line.endswith("}")]
    assert len(after) == 3 * 7
    run = json.loads((eval_run / "run.json").read_text())
    assert run["runtime"]["this_invocation"]["questions_computed"] == 1
    assert _eval(tiny_model_dir, qa_file, eval_run) == 0  # nothing left to do
    assert len((eval_run / "records.jsonl").read_text().splitlines()) == len(after) + 1  # + the torn line
    assert json.loads((eval_run / "run.json").read_text())["runtime"]["this_invocation"]["questions_computed"] == 0


def test_measure_tf_scores_without_generating_then_answers_fill_in(eval_run, tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "tf"
    out.mkdir()
    assert _eval(tiny_model_dir, qa_file, out, "--measure", "tf") == 0
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    kv = [r for r in recs if r["selector"] not in ("full", "text")]
    assert kv and all(r["prediction"] is None and "f1" not in r and "tf_top1" in r for r in kv)
    assert all("generate" not in r["timings_ms"] for r in kv)  # no generation for them
    # the teacher-forced scores and bytes are those of the run that generated every answer
    lines = [line for line in (eval_run / "records.jsonl").read_text().splitlines() if line.endswith("}")]
    want = {(r["example"], r["setting"]): r for r in map(json.loads, lines)}
    for r in kv:
        full_run = want[(r["example"], r["setting"])]
        assert (r["tf_top1"], r["bytes"], r["kept"]) == (full_run["tf_top1"], full_run["bytes"], full_run["kept"])
        assert r["tf_kl"] == pytest.approx(full_run["tf_kl"], abs=1e-6)
    rows = {r["setting"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert json.loads((out / "results.json").read_text())["partial"] is False
    q2c = next(r for k, r in rows.items() if k.startswith("q2c:0.5:int8"))
    assert q2c["f1"] is None and q2c["pct_of_full_f1"] is None and q2c["answered_n"] == 0 and q2c["tf_n"] == 3
    assert "--measure tf" in (out / "results.md").read_text()
    # the default measure on the same folder generates what is missing, and only that
    assert _eval(tiny_model_dir, qa_file, out) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["runtime"]["this_invocation"]["questions_computed"] == 3
    rows = {r["setting"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert all(r["answered_n"] == r["n"] == 3 for r in rows.values())


def test_resume_refuses_a_different_run(eval_run, tiny_model_dir, qa_file, capsys):
    assert (
        main(
            [
                "eval",
                "--model",
                tiny_model_dir,
                "--data",
                qa_file,
                "--limit",
                "3",
                "--max-new-tokens",
                "5",
                "--out",
                str(eval_run),
            ]
        )
        == 2
    )
    assert "max_new_tokens" in capsys.readouterr().err


def test_bad_setting_is_a_clear_error(tiny_model_dir, qa_file, tmp_path, capsys):
    assert (
        main(["eval", "--model", tiny_model_dir, "--data", qa_file, "--setting", "q2c:0.5", "--out", str(tmp_path)])
        == 2
    )
    assert "SELECTOR:RETENTION:PROFILE" in capsys.readouterr().err
    assert (
        main(["eval", "--model", tiny_model_dir, "--data", qa_file, "--selectors", "nope", "--out", str(tmp_path)]) == 2
    )
    assert "unknown selector 'nope'" in capsys.readouterr().err


def test_needle_eval_groups_by_length(tiny_model_dir, qa_file, tmp_path):
    assert (
        main(
            [
                "eval",
                "--model",
                tiny_model_dir,
                "--data",
                qa_file,
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "--selectors",
                "q2c",
                "--retentions",
                "0.5",
                "--profiles",
                "int4",
                "--needle",
                "96,128",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["length"] for r in rows} == {96, 128}
    assert all(r["n"] == 2 for r in rows)
    assert "### Context 128 tokens" in (tmp_path / "results.md").read_text()


def eval_one_profile(tiny_model_dir, qa_file, profile_path, out) -> list[dict]:
    """`kvwire eval` of one question at one profile file (retention 1.0): the rows it wrote."""
    argv = ["eval", "--model", tiny_model_dir, "--data", qa_file, "--limit", "1", "--max-new-tokens", "2"]
    argv += ["--threads", "1", "--selectors", "q2c", "--retentions", "1.0", "--profiles", str(profile_path)]
    assert main(argv + ["--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())["rows"]


def test_diagnose_writes_a_profile_eval_accepts(tiny_model_dir, qa_file, tmp_path, capsys):
    out = tmp_path / "diag"
    assert (
        main(
            [
                "diagnose",
                "--model",
                tiny_model_dir,
                "--data",
                qa_file,
                "--limit",
                "2",
                "--max-new-tokens",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "diagnose.json").read_text())
    assert [r["layer"] for r in result["layers"]] == [0, 1, 2, 3]
    for r in result["layers"]:
        assert {"only_int4", "only_fp16"} <= set(r)
    from kvwire.kvcodec.profiles import get_profile

    profile = get_profile(str(out / "profile.json"))
    assert profile.resolve(4, 16)
    assert "| layer |" in (out / "diagnose.md").read_text()
    rows = eval_one_profile(tiny_model_dir, qa_file, out / "profile.json", tmp_path / "eval")
    assert profile.name in {r["profile"] for r in rows}


def test_prefill_memo_gives_the_same_streams(tiny_loaded):
    """Eval shares one prefill per question across settings; the streams must not change."""
    import torch

    from kvwire.bench.prefill_memo import PrefillMemo
    from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest, Timings

    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    memo = PrefillMemo(edge)
    context, question = PASSAGES[0][1] + " " + PASSAGES[1][1], PASSAGES[0][2]
    settings = [("q2c", 0.5), ("snapkv", 0.5), ("random", 0.5), ("q2c", 1.0), (None, 1.0), ("q2c", 0.5)]
    for selector, retention in settings:
        req = EdgeRequest(context, question, "kv", selector, retention, "int8")
        timings = Timings()
        shared = cloud.receive(list(memo.stream(req, timings)))
        alone = cloud.receive(list(edge.stream(req)))
        assert torch.equal(shared.positions, alone.positions)
        assert all(torch.equal(a, b) for a, b in zip(shared.keys + shared.values, alone.keys + alone.values))
        assert timings.values["prefill"] > 0  # a reused prefill still reports what it cost
    assert memo.runs == 2  # q2c and snapkv capture different rows; random, retention 1.0 and none reuse one


def test_none_is_no_selection(tiny_loaded, monkeypatch):
    """Eval's `none` (EdgeRequest selector None): every position, the context in prompt order, no scoring."""
    from kvwire import kernels
    from kvwire.kvcodec.errors import ConfigError
    from kvwire.kvcodec.pipeline import Edge, EdgeRequest
    from kvwire.kvcodec.stream import StreamDecoder
    from kvwire.kvcodec.wire import CHUNK, parse_frame

    def no_capture(*args, **kwargs):
        raise AssertionError("no selection must not capture attention")

    monkeypatch.setattr(kernels, "q2c_scores", no_capture)
    edge = Edge(tiny_loaded)
    req = EdgeRequest(PASSAGES[0][1], PASSAGES[0][2], "kv", None, 1.0, "int8", chunk_bytes=600)
    prompt, dec, order = edge.prompt(req), StreamDecoder(), []
    frames = list(edge.stream(req))
    for frame in frames[:-1]:  # without the trailer: partial() shows what each chunk added
        dec.feed(frame)
        if parse_frame(frame).kind == CHUNK:
            order += sorted(set(dec.partial().positions.tolist()) - set(order))
    dec.feed(frames[-1])
    h = dec.result().header
    assert len(frames) > 4
    assert h.kept == list(range(prompt.stream_len)) and h.selector == ""
    context = [p for p in order if prompt.context_start <= p < prompt.context_end]
    assert context == list(range(prompt.context_start, prompt.context_end))
    with pytest.raises(ConfigError, match="retention 0.5 needs a selector"):
        edge.validate(EdgeRequest(PASSAGES[0][1], PASSAGES[0][2], "kv", None, 0.5, "int8"))


def _shard_args(tiny_model_dir, qa_file, out, limit: int = 4) -> list[str]:
    return [
        "eval",
        "--model",
        tiny_model_dir,
        "--data",
        qa_file,
        "--limit",
        str(limit),
        "--threads",
        "1",
        "--max-new-tokens",
        "2",
        "--selectors",
        "q2c",
        "--retentions",
        "0.5",
        "--profiles",
        "int8",
        "--out",
        str(out),
    ]


def test_shards_split_the_questions(tiny_model_dir, qa_file, tmp_path, capsys):
    args = _shard_args(tiny_model_dir, qa_file, tmp_path, limit=3)

    def computed():
        return json.loads((tmp_path / "run.json").read_text())["runtime"]["this_invocation"]["questions_computed"]

    assert main(args + ["--shard", "1/2"]) == 0 and computed() == 1  # question 1 of 0, 1, 2
    assert main(args + ["--shard", "0/2"]) == 0 and computed() == 2
    assert main(args) == 0 and computed() == 0
    assert all(r["n"] == 3 for r in json.loads((tmp_path / "results.json").read_text())["rows"])
    assert main(args + ["--shard", "2/2"]) == 2
    assert "K must be in 0..N-1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "all_low, only_low, only_hi, expected",
    [
        (0.99, [1.0, 1.0, 0.98], [0.99, 0.99, 0.99], ("none", [])),  # INT4 is harmless
        (0.70, [0.72, 1.0, 0.99], [1.0, 0.70, 0.71], ("concentrated", [0])),  # the Qwen2.5-7B pattern: layer 0
        (0.60, [0.97, 0.98, 0.97], [0.62, 0.61, 0.63], ("distributed", [])),  # the Phi-3.5 pattern: no culprit
        (
            0.60,
            [0.90, 0.90, 0.90],
            [0.70, 0.70, 0.70],
            ("distributed", [0, 1, 2]),
        ),  # too many culprits for --max-protected 2
    ],
)
def test_diagnose_verdicts(all_low, only_low, only_hi, expected):
    from kvwire.bench.diagnose import choose, profile_for

    def rows(values):
        return [{"agreement_f1": v} for v in values]

    pattern, layers = choose({"agreement_f1": all_low}, rows(only_low), rows(only_hi), tolerance=0.05, max_protected=2)
    assert (pattern, layers) == expected
    profile = profile_for(pattern, layers, "int4", "p")
    kinds = {i: (k.kind, v.kind) for i, (k, v) in enumerate(profile.resolve(3))}
    if pattern == "distributed":
        assert set(kinds.values()) == {("int8", "int8")}
    else:
        assert kinds == {i: ("fp16", "fp16") if i in layers else ("int4", "int4") for i in range(3)}


def test_teacher_forcing_follows_the_generation(tiny_loaded):
    """One forced pass along an answer over a pruned, quantized cache gives the distributions greedy
    decoding met on that cache: its argmax is the answer's tokens and its first row the first logits."""
    import torch

    from kvwire.bench.teacher_forcing import compare, forced_logprobs
    from kvwire.kvcodec.modes import get_mode
    from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest

    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    req = EdgeRequest(PASSAGES[0][1] + " " + PASSAGES[1][1], PASSAGES[0][2], "kv", "q2c", 0.5, "int4")
    received = cloud.receive(list(edge.stream(req)))
    assert len(received.positions) < received.header.prompt_len - 1  # pruned: absolute positions matter
    ans = cloud.answer(received, 6, None)
    cache = get_mode("kv").cache(cloud, received)
    lp = forced_logprobs(tiny_loaded.model, cache, edge.prompt(req).ids, ans.tokens)
    assert lp.shape[0] == len(ans.tokens) + 1
    assert lp[: len(ans.tokens)].argmax(-1).tolist() == ans.tokens
    torch.testing.assert_close(lp[0], ans.generation.first_logits.log_softmax(-1), atol=1e-4, rtol=1e-4)
    same = compare(lp, lp)
    assert same.top1 == 1.0 and same.kl == 0.0 and same.positions == len(ans.tokens) + 1
    flat = torch.full_like(lp, -torch.log(torch.tensor(float(lp.shape[1]))).item())  # the uniform distribution
    assert compare(lp, flat).kl > 0


def test_paired_se_and_bootstrap():
    from kvwire.bench.eval_stats import bootstrap_pct, paired_se

    full = [0.2, 0.4, 0.0, 0.6, 0.8, 0.1]
    same = list(full)
    assert paired_se(same, full) == 0.0  # every question moved together: no paired error
    shifted = [x + d for x, d in zip(full, [0.1, -0.1, 0.1, -0.1, 0.1, -0.1])]
    assert paired_se(shifted, full) == pytest.approx(0.1 * (6 / 5) ** 0.5 / 6**0.5)
    assert paired_se([1.0], [0.0]) is None
    ci = bootstrap_pct(shifted, full)
    assert ci == bootstrap_pct(shifted, full)  # seeded: the same interval every time
    assert ci[0] < 100 * sum(shifted) / sum(full) < ci[1]
    assert bootstrap_pct(same, full)[0] == bootstrap_pct(same, full)[1] == 100.0


def test_a_partial_report_says_so(tiny_model_dir, qa_file, tmp_path):
    args = _shard_args(tiny_model_dir, qa_file, tmp_path)
    assert main(args + ["--shard", "0/2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["partial"] is True and results["answers"] == 2 * 3 and results["expected"] == 4 * 3
    assert all(r["n"] == 2 for r in results["rows"])
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# ") and "(PARTIAL)" in md.splitlines()[0] and "6 of 12 answers" in md
    assert json.loads((tmp_path / "run.json").read_text())["partial"] is True
    assert main(args + ["--shard", "1/2"]) == 0  # the last shard: the complete report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["partial"] is False and all(r["n"] == 4 for r in results["rows"])
    assert "PARTIAL" not in (tmp_path / "results.md").read_text()


def _shard_process(barrier, argv: list[str]) -> None:
    import sys

    from kvwire.bench.main import main as kvwire_main

    barrier.wait(timeout=300)  # both processes have imported everything: start the runs together
    sys.exit(kvwire_main(argv))


def test_two_shards_started_together_both_finish(tiny_model_dir, qa_file, tmp_path):
    """Two shard processes on one --out, released by one barrier: neither crashes (run.json and the
    records are shared), and the report written last is complete."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    args = _shard_args(tiny_model_dir, qa_file, tmp_path)
    procs = [ctx.Process(target=_shard_process, args=(barrier, args + ["--shard", f"{k}/2"])) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["partial"] is False and all(r["n"] == 4 for r in results["rows"])
    recs = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 4 * 3 and len({(r["example"], r["setting"]) for r in recs}) == 4 * 3  # whole lines, no repeats
    assert json.loads((tmp_path / "run.json").read_text())["config"]["limit"] == 4
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary file left behind


def test_a_setting_may_name_its_fixed_positions():
    from kvwire.bench.eval import split_fixed

    assert split_fixed("none:1:int8:cloud/cloud") == ("none:1:int8", "cloud/cloud")
    assert split_fixed("q2c:0.5:out/profile.json") == ("q2c:0.5:out/profile.json", "stream/stream")
    assert split_fixed("q2c:0.5:c:/x/profile.json:stream/cloud") == ("q2c:0.5:c:/x/profile.json", "stream/cloud")
    assert split_fixed("q2c:0.5:int4") == ("q2c:0.5:int4", "stream/stream")


def test_setting_with_fixed_positions_runs(tiny_model_dir, qa_file, tmp_path):
    argv = ["eval", "--model", tiny_model_dir, "--data", qa_file, "--limit", "2", "--max-new-tokens", "3"]
    argv += ["--selectors", "q2c", "--retentions", "1.0", "--profiles", "int8", "--measure", "tf"]
    assert main(argv + ["--setting", "none:1:int8:cloud/cloud", "--out", str(tmp_path)]) == 0
    rows = {r["profile"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["int8 fixed=cloud/cloud"]["bytes"] < rows["int8"]["bytes"]  # the fixed positions stay home
    assert rows["int8 fixed=cloud/cloud"]["tf_n"] == 2


def test_frontier_text_names_the_cheapest_setting_above_the_floor():
    from kvwire.bench.eval_report import frontier_text

    def row(selector, retention, profile, ratio, top1):
        return {"selector": selector, "retention": retention, "profile": profile, "length": None,
                "wire_ratio": ratio, "tf_top1": top1, "tf_kl": 0.1, "se": {}}  # fmt: skip

    rows = [
        row("full", 1.0, "-", 1.0, 1.0),  # baselines are never candidates
        row("none", 1.0, "int8", 0.5, 0.99),
        row("none", 1.0, "int4", 0.26, 0.85),
        row("none", 1.0, "kivi-4", 0.3, 0.96),
        row("q2c", 0.5, "int8", 0.3, 0.80),  # dominated by kivi-4: not on the front
        row("none", 1.0, "int2", 0.1, None),  # no teacher-forced score: not a point
    ]
    text = frontier_text(rows)
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("- ")] == [
        "- none 1 int4",
        "- none 1 kivi-4",
        "- none 1 int8",
    ]
    assert "Cheapest with top-1 >= 0.95: none 1 kivi-4 at wire ratio 0.3000" in text
    assert "No setting reaches top-1 0.999." in frontier_text(rows, floor=0.999)
    assert frontier_text([row("none", 1.0, "x", 0.1, None)]) == ""
