"""`kvwire diagnose --budget`: the sensitivity sweep on the tiny model, the knapsack, the written profile."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from kvwire.bench.main import main
from kvwire.kvcodec.encodings.registry import encoding_names
from tests import test_eval
from tests.test_eval import eval_one_profile

qa_file = test_eval.qa_file  # the same six passages as the eval tests (a module-scoped fixture)


def _diagnose(tiny_model_dir, qa_file, out, budget: str, *extra) -> int:
    # one torch thread: on a loaded 2-core host more threads are many times slower on these tiny matrices
    argv = ["diagnose", "--model", tiny_model_dir, "--data", qa_file, "--limit", "2", "--max-new-tokens", "3"]
    return main(argv + ["--budget", budget, "--threads", "1", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def budget_run(tiny_model_dir, qa_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget")
    assert _diagnose(tiny_model_dir, qa_file, out, "0.3") == 0
    return out


def _fraction(profile, kept: float) -> float:
    """Scale and payload bytes per kept position over FP16 bytes per prompt position, from the quantizers."""
    heads, head_dim, layers = 2, 16, 4  # the tiny model's geometry
    per_position = sum(sum(q.sizes(heads, 1, head_dim)) for pair in profile.resolve(layers, head_dim) for q in pair)
    return kept * per_position / (layers * 2 * heads * head_dim * 2)


def test_the_written_profile_fits_the_budget_and_loads(budget_run, tiny_model_dir, qa_file, tmp_path):
    from kvwire.kvcodec.profiles import get_profile

    result = json.loads((budget_run / "budget.json").read_text())
    profile = get_profile(str(budget_run / "profile.json"))
    assert _fraction(profile, result["kept_fraction"]) <= 0.3
    assert result["profile_fraction"] == pytest.approx(_fraction(profile, result["kept_fraction"]), abs=1e-5)
    kinds = {q.kind for pair in profile.resolve(4, 16) for q in pair}
    assert len(kinds) > 1  # 0.3 lies between int3 (0.25) and int4 (0.31) everywhere: a real mix
    assert result["measured"]["kl"] > 0 and 0 <= result["measured"]["top1"] <= 1
    assert "| layer | K | V |" in (budget_run / "budget.md").read_text()
    rows = eval_one_profile(tiny_model_dir, qa_file, budget_run / "profile.json", tmp_path / "eval")
    assert profile.name in {r["profile"] for r in rows}


def test_a_larger_budget_never_gives_a_larger_sensitivity_sum(budget_run):
    from kvwire.bench.budget import Candidate, allocate

    result = json.loads((budget_run / "budget.json").read_text())
    cands = [Candidate(c["kind"], c["bytes_per_position"]) for c in result["candidates"]]
    sens = {
        (int(k.split(":")[0]), k.split(":")[1]): [v[c.kind] for c in cands] for k, v in result["sensitivity"].items()
    }
    fp16_position = 4 * 2 * 2 * 16 * 2
    sums = []
    for budget in (0.25, 0.27, 0.3, 0.35, 0.4, 0.5, 0.7, 1.0):
        capacity = int(budget / result["kept_fraction"] * fp16_position)
        chosen = allocate(sens, cands, capacity)
        assert sum(c.bytes_per_position for c in chosen.values()) <= capacity
        sums.append(sum(sens[slot][cands.index(c)] for slot, c in chosen.items()))
    assert all(b <= a for a, b in zip(sums, sums[1:])), sums
    assert sums[-1] < sums[0]


def test_allocate_is_the_exact_optimum():
    """The knapsack against brute force over every choice, on random sensitivities."""
    from kvwire.bench.budget import Candidate, allocate

    rng = random.Random(0)
    cands = [Candidate("a", 26), Candidate("b", 34), Candidate("c", 66), Candidate("d", 128)]
    slots = [(i, t) for i in range(3) for t in "kv"]
    for _ in range(20):
        sens = {s: sorted((rng.random() for _ in cands), reverse=True) for s in slots}
        capacity = rng.randint(6 * 26, 6 * 128)
        best = min(
            sum(sens[s][i] for s, i in zip(slots, pick))
            for pick in itertools.product(range(len(cands)), repeat=len(slots))
            if sum(cands[i].bytes_per_position for i in pick) <= capacity
        )
        chosen = allocate(sens, cands, capacity)
        assert sum(sens[s][cands.index(c)] for s, c in chosen.items()) == pytest.approx(best)
    with pytest.raises(ValueError, match="156 bytes per position at least"):
        allocate(sens, cands, 100)


def test_a_budget_below_the_cheapest_profile_is_a_clear_error(budget_run, tiny_model_dir, qa_file, capsys):
    sweep = (budget_run / "budget-sweep.jsonl").read_text()
    assert _diagnose(tiny_model_dir, qa_file, budget_run, "0.1") == 2
    err = capsys.readouterr().err
    assert "--budget 0.1 is below the cheapest profile" in err
    named = re.search(r"at retention [\d.]+: (\S+) everywhere is ([\d.]+) of the FP16 bytes", err)
    assert named and named.group(1) in encoding_names() and float(named.group(2)) > 0.1
    assert (budget_run / "budget-sweep.jsonl").read_text() == sweep  # the sweep was reused, not redone
    assert _diagnose(tiny_model_dir, qa_file, budget_run, "0.3", "--encodings", "int4,nope") == 2
    assert "--encodings nope: not usable here" in capsys.readouterr().err


def test_kept_fraction_counts_only_what_is_streamed():
    from kvwire.bench.budget import kept_fraction

    # a prompt of 100 tokens: a 10-token template prefix, 60 context tokens, 29 question and suffix tokens
    sweep = [{"prompt_len": 100, "stream_len": 99, "context_tokens": 60, "context_start": 10}]
    assert kept_fraction(sweep, 0.5) == pytest.approx((10 + 30 + 29) / 100)
    assert kept_fraction(sweep, 0.5, "stream/stream") == pytest.approx(0.69)
    assert kept_fraction(sweep, 0.5, "cloud/stream") == pytest.approx(0.59)
    assert kept_fraction(sweep, 0.5, "stream/cloud") == pytest.approx(0.40)
    assert kept_fraction(sweep, 0.5, "cloud/cloud") == pytest.approx(0.30)
    old = [{k: v for k, v in sweep[0].items() if k != "context_start"}]  # a sweep written before the field
    assert kept_fraction(old, 0.5, "cloud/cloud") == pytest.approx(0.30)
    with pytest.raises(Exception, match="predates the prefix length"):
        kept_fraction(old, 0.5, "cloud/stream")


def test_a_budget_for_cloud_computed_fixed_positions_reuses_the_sweep(budget_run, tiny_model_dir, qa_file, capsys):
    streamed = json.loads((budget_run / "budget.json").read_text())
    sweep = (budget_run / "budget-sweep.jsonl").read_text()
    out = budget_run.parent / (budget_run.name + "-cloud")
    out.mkdir()
    (out / "budget-sweep.jsonl").write_text(sweep)
    assert _diagnose(tiny_model_dir, qa_file, out, "0.3", "--fixed", "cloud/cloud") == 0
    result = json.loads((out / "budget.json").read_text())
    assert result["fixed"] == "cloud/cloud" and result["kept_fraction"] < streamed["kept_fraction"]
    assert result["profile_fraction"] <= 0.3
    assert (out / "budget-sweep.jsonl").read_text() == sweep  # nothing swept again
    assert "context only" in (out / "budget.md").read_text()
    assert _diagnose(tiny_model_dir, qa_file, out, "0.3", "--fixed", "cloud") == 2
    assert "expected TEMPLATE/QUESTION" in capsys.readouterr().err
