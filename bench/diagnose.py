"""`kvwire diagnose`: the layer-by-layer INT4 sweep that finds a model's quantization-sensitive layers
and writes the precision profile that protects them.

Two sweeps over the layers, every answer through the daemons' pipeline at retention 1.0:
  only_int4[i]  layer i at INT4, every other layer FP16   -> the damage layer i does on its own
  only_fp16[i]  layer i at FP16, every other layer INT4   -> the recovery layer i brings on its own
Damage and recovery are measured as agreement with the full-KV answer (token F1 against it), which
is far less noisy than F1 against the gold answers on a few dozen questions. The research found one
layer doing all the damage on Qwen2.5-7B (layer 0) and damage spread over all layers on Phi-3.5;
the verdict says which pattern this model shows, and the profile follows it:
  none          INT4 everywhere costs less than the tolerance: default INT4, no overrides
  concentrated  the sensitive layers at FP16, INT4 elsewhere
  distributed   no small set of layers explains the damage: INT8 everywhere (lossless in the research)

With --budget B it allocates bits per layer and per K/V under a byte budget instead, from a
teacher-forced sensitivity sweep (bench/budget.py), and writes that profile.

The options are defined in bench/eval_args.py (light, for `kvwire diagnose --help`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kvwire.bench.budget import run_budget
from kvwire.bench.eval import load_questions, set_threads, start_run
from kvwire.bench.evaluator import FULL, NONE, Evaluator, RecordStore, Setting, summarize
from kvwire.kvcodec.profiles import PrecisionProfile
from kvwire.kvcodec.quant import Quantizer


def layer_profiles(num_layers: int, low: str) -> tuple[list[PrecisionProfile], list[PrecisionProfile]]:
    lo, hi = Quantizer(low), Quantizer("fp16")
    only_low = [PrecisionProfile(f"only-L{i}-{low}", (hi, hi), {i: (lo, lo)}) for i in range(num_layers)]
    only_hi = [PrecisionProfile(f"only-L{i}-fp16", (lo, lo), {i: (hi, hi)}) for i in range(num_layers)]
    return only_low, only_hi


def choose(
    all_low: dict, only_low: list[dict], only_hi: list[dict], tolerance: float, max_protected: int
) -> tuple[str, list[int]]:
    """(pattern, sensitive layers) from the sweep rows (each with agreement_f1)."""
    loss = 1.0 - all_low["agreement_f1"]
    damage = [1.0 - r["agreement_f1"] for r in only_low]
    recovery = [r["agreement_f1"] - all_low["agreement_f1"] for r in only_hi]
    # a layer counts if on its own it does damage or, kept at FP16, brings recovery
    score = [d + r for d, r in zip(damage, recovery)]
    sensitive = sorted(
        (i for i in range(len(score)) if max(damage[i], recovery[i]) >= tolerance), key=lambda i: -score[i]
    )
    if loss < tolerance and not sensitive:
        return "none", []
    if sensitive and len(sensitive) <= max_protected:
        return "concentrated", sorted(sensitive)
    return "distributed", sorted(sensitive)


def profile_for(pattern: str, sensitive: list[int], low: str, name: str) -> PrecisionProfile:
    lo, hi = Quantizer(low), Quantizer("fp16")
    if pattern == "distributed":
        return PrecisionProfile(name, (Quantizer("int8"), Quantizer("int8")))
    return PrecisionProfile(name, (lo, lo), {i: (hi, hi) for i in sensitive})


def run(args) -> int:
    from tqdm import tqdm

    from kvwire.kvcodec.models import load_model

    Quantizer(args.low)  # fail early on an unknown kind
    out = Path(args.out)
    set_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    args.needle = ""
    questions = load_questions(args, loaded.tokenizer)
    store = RecordStore(out / "records.jsonl")
    ev = Evaluator(loaded, args.max_new_tokens, store)
    if args.budget:
        start_run(out, args, loaded, ev, low="budget")
        return run_budget(args, loaded, ev, questions, out)
    num_layers = ev.geometry["num_layers"]
    only_low, only_hi = layer_profiles(num_layers, args.low)
    all_low = Setting(NONE, 1.0, PrecisionProfile(f"all-{args.low}", (Quantizer(args.low),) * 2))
    sweep = [Setting(FULL, 1.0), all_low] + [Setting(NONE, 1.0, p) for p in only_low + only_hi]
    start_run(out, args, loaded, ev, low=args.low)

    started = time.perf_counter()
    try:
        for q in tqdm(
            [q for q in questions if ev.pending(q, sweep)], desc="kvwire diagnose", unit="question", mininterval=5
        ):
            ev.run_example(q, sweep)
        rows = {r["setting"]: r for r in summarize(store, questions, sweep)}
        low_row = rows[all_low.key]
        low_rows = [rows[Setting(NONE, 1.0, p).key] for p in only_low]
        hi_rows = [rows[Setting(NONE, 1.0, p).key] for p in only_hi]
        pattern, sensitive = choose(low_row, low_rows, hi_rows, args.tolerance, args.max_protected)
        name = args.name or f"{Path(loaded.source).name}-diagnosed"
        profile = profile_for(pattern, sensitive, args.low, name)
        check = Setting(NONE, 1.0, profile)  # the written profile, measured on the same questions
        for q in tqdm(
            [q for q in questions if ev.pending(q, [check])],
            desc="checking the profile",
            unit="question",
            mininterval=5,
        ):
            ev.run_example(q, [check])
    finally:
        store.close()
    rows = {r["setting"]: r for r in summarize(store, questions, sweep + [check])}
    result = {
        "model": loaded.source,
        "questions": len(questions),
        "low": args.low,
        "tolerance": args.tolerance,
        "pattern": pattern,
        "sensitive_layers": sensitive,
        "profile": profile.to_dict(),
        "full": rows[Setting(FULL, 1.0).key],
        "all_low": rows[all_low.key],
        "profile_check": rows[check.key],
        "layers": [
            {
                "layer": i,
                "only_int4": _brief(rows[Setting(NONE, 1.0, only_low[i]).key]),
                "only_fp16": _brief(rows[Setting(NONE, 1.0, only_hi[i]).key]),
            }
            for i in range(num_layers)
        ],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "profile.json").write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    (out / "diagnose.json").write_text(json.dumps(result, indent=1))
    report = render(result)
    (out / "diagnose.md").write_text(report)
    print(report)
    print(f"wrote {out}/profile.json (use it with `kvwire eval --profiles` or `edge-agent --profile`)")
    return 0


def _brief(row: dict) -> dict:
    return {k: row[k] for k in ("n", "f1", "em", "agreement_f1", "identical", "pct_of_full_f1", "wire_ratio")}


def render(result: dict) -> str:
    low = result["low"].upper()
    full, all_low, check = result["full"], result["all_low"], result["profile_check"]
    lines = [
        f"# kvwire diagnose: {Path(result['model']).name}",
        "",
        f"{result['questions']} questions; answers compared with the full-KV answer (agreement F1) and the gold answers (F1).",
        "",
        f"- full KV: F1 {full['f1']:.3f}",
        f"- all layers {low}: F1 {all_low['f1']:.3f} ({_pct(all_low)} of full), agreement {all_low['agreement_f1']:.3f}, "
        f"identical {100 * all_low['identical']:.0f}%",
        f"- pattern: **{result['pattern']}**; sensitive layers: {result['sensitive_layers'] or 'none'} "
        f"(tolerance {result['tolerance']} agreement F1)",
        f"- written profile `{result['profile']['name']}`: F1 {check['f1']:.3f} ({_pct(check)} of full), agreement "
        f"{check['agreement_f1']:.3f}, identical {100 * check['identical']:.0f}%, wire ratio {check['wire_ratio']:.4f}",
        "",
        f"| layer | only this layer {low}: agreement | identical | F1 | only this layer FP16 (rest {low}): agreement | identical | F1 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["layers"]:
        a, b = r["only_int4"], r["only_fp16"]
        layer = f"**{r['layer']}**" if r["layer"] in result["sensitive_layers"] else str(r["layer"])
        lines.append(
            f"| {layer} | {a['agreement_f1']:.3f} | {100 * a['identical']:.0f}% | "
            f"{a['f1']:.3f} | {b['agreement_f1']:.3f} | {100 * b['identical']:.0f}% | {b['f1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _pct(row: dict) -> str:
    return "–" if row["pct_of_full_f1"] is None else f"{row['pct_of_full_f1']:.1f}%"
