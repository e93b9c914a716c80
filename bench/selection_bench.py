"""Per-head selection measured in process: agreement F1 with the full-KV answer for one-set and
per-(layer, KV head) selections; with --wire, through real streams (bytes on the wire).

For each question: one prefill with q2c's rows captured (Edge.prefill, KVWire's prompt), the full answer
on all of its KV (what Cloud.answer_text, `kvwire eval`'s reference, computes), q2c's scores and kvzip's reconstruction scores
computed once, then every variant at every retention: a one-set variant answers on a DynamicCache of
its kept positions, a per-head variant on a padded per-head cache (Cloud.answer_heads). The KV is the
prefill's own (no quantization), so the variants differ only in what they keep.

    python -m kvwire.bench.selection_bench --data squad-sample --limit 50 --out runs/selection

With --wire PROFILES (e.g. fp16,mixed-int4) the variants of WIRE_VARIANTS are streamed instead, per
profile: Edge.encode writes the frames of each selection (one set, or the per-head layout of
docs/wire-format.md 5b), Cloud.receive verifies and decodes them and Cloud.answer answers on what arrived,
so the answer is the cloud's and the bytes are the wire's (framing, header, positions and KV):

    python -m kvwire.bench.selection_bench --data squad-sample --limit 50 --wire fp16,mixed-int4 --out runs/wire

--reuse DIR,... copies the streamed answers a run of the same questions, model and arguments already holds
(they are deterministic) and computes only the variants it lacks (kvzip-matched always).

--shard I/N takes every N-th question from the I-th (0-based): shards run side by side, each with its own
--out, and --merge DIR,DIR,... summarizes their records together.

Writes records.jsonl (one line per question; a rerun skips the questions there), results.json and
results.md: mean agreement F1 +/- SE, the paired difference with q2c (the same profile) +/- SE, identical
answers, bytes, and kvzip's reconstruction time relative to the context's prefill.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

VARIANTS = {  # name -> what it keeps
    "q2c": "q2c, one set",
    "kvzip-max": "kvzip, one set (max over layers and heads)",
    "kvzip-mean": "kvzip, one set (mean over layers and heads)",
    "kvzip-layer": "kvzip per head, per-layer budget free across heads",
    "kvzip-global": "kvzip per head, one budget across layers and heads",
    "kvzip+q2c-layer": "kvzip + question_weight x q2c per head, per-layer budget",
}
BASELINE = "q2c"
WIRE_VARIANTS = {  # streamed: name -> what it keeps (the per-head ones in the per-head layout)
    "q2c": "q2c, one set",
    "kvzip-max": "kvzip, one set (max over layers and heads)",
    "kvzip-global": "kvzip per head, one budget across layers and heads",
    "kvzip-matched": "kvzip per head, global budget trimmed to q2c's bytes",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="squad-sample", help="squad-sample (default), squad-dev, or a .json/.jsonl path")
    p.add_argument("--limit", type=int, default=50, help="questions (default 50; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question shuffle (default 0, as kvwire eval)")
    p.add_argument("--retentions", default="0.5,0.25", help="comma list in (0, 1) (default 0.5,0.25)")
    p.add_argument("--question-weight", type=float, default=1.0, help="kvzip+q2c's weight of q2c (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap (default 24, as kvwire eval)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--wire", default="", help="comma list of profiles: stream WIRE_VARIANTS with each (bytes)")
    p.add_argument("--variants", default="", help="with --wire: comma list of WIRE_VARIANTS (default all; q2c always)")
    p.add_argument("--shard", default="0/1", help="I/N: every N-th question from the I-th (default 0/1: all)")
    p.add_argument("--reuse", default="", help="comma list of --out folders whose streamed answers to copy (same run)")
    p.add_argument("--merge", default="", help="comma list of --out folders: summarize their records (no run)")
    p.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")


def _answer_one_set(cloud, prompt, pre, sel, max_new_tokens):
    from transformers import DynamicCache

    kept = sel.kept
    cache = DynamicCache([(k[None][:, :, kept], v[None][:, :, kept]) for k, v in zip(pre.keys, pre.values)])
    return cloud.generate(cache, prompt.ids, (prompt.context_start, prompt.context_end), max_new_tokens, "kv")


def _frames(edge, prompt, pre, sel, retention, profile) -> list[bytes]:
    from kvwire.kvcodec.pipeline import EdgeRequest

    req = EdgeRequest("", "", "kv", "", retention, profile, heads=sel.budget or "")
    return list(edge.encode(prompt, req, pre, sel))


def matched_selection(edge, prompt, pre, scores, retention, profile, limit: int):
    """kvzip's global per-head selection with its lowest-scored entries dropped until its stream is at most
    `limit` bytes (the one-set stream's at the same retention and profile): its position bytes paid for in KV.
    Each step drops enough entries to save the excess at the cheapest row of any layer, so one step suffices
    unless positions shrink less than rows (then another)."""
    from kvwire.kvcodec.profiles import get_profile
    from kvwire.kvcodec.selectors import context_budget, head_selection

    g = edge.geometry
    specs = get_profile(profile).resolve(g["num_layers"], g["head_dim"])
    cheapest = min(sum(sum(q.sizes(1, 1, g["head_dim"])) for q in pair) for pair in specs)  # one row of K and V
    entries = scores.shape[0] * scores.shape[1] * context_budget(retention, prompt.context_len)
    while True:
        sel = head_selection(prompt, scores, retention, "global", entries)
        size = sum(map(len, _frames(edge, prompt, pre, sel, retention, profile)))
        if size <= limit or entries == 1:
            return sel
        entries = max(1, entries - math.ceil((size - limit) / cheapest))


def _wire_answer(edge, cloud, prompt, pre, sel, retention, profile, max_new_tokens) -> dict:
    """Stream a selection with `profile` and answer on what the cloud decoded: the answer and its bytes
    (all of them, and the K and V payload among them: the rest is framing, header and positions)."""
    from kvwire.kvcodec.profiles import get_profile

    frames = _frames(edge, prompt, pre, sel, retention, profile)
    received = cloud.receive(frames)
    ans = cloud.answer(received, max_new_tokens)
    g = received.header.geometry
    specs = get_profile(profile).resolve(g["num_layers"], g["head_dim"])
    if received.head_slots is None:
        rows = [[len(received.positions)] * g["kv_heads"] for _ in specs]
    else:
        rows = [[len(s) for s in layer] for layer in received.head_slots]
    kv = sum(sum(q.sizes(1, n, g["head_dim"])) for (kq, vq), layer in zip(specs, rows) for n in layer for q in (kq, vq))
    return {"answer": ans, "bytes": sum(map(len, frames)), "kv_bytes": kv}


def run_question(
    edge, cloud, ex, retentions, weight, max_new_tokens, wire=(), variants=tuple(WIRE_VARIANTS), reuse=None
) -> dict:
    """Every variant at every retention for one question: a record of predictions, agreement and times."""
    from kvwire.bench.squad_metrics import best_over_golds, f1_score
    from kvwire.kvcodec.pipeline import EdgeRequest
    from kvwire.kvcodec.selectors import full_selection, get_selector, head_selection, top_k_selection

    prompt = edge.prompt(EdgeRequest(ex.context, ex.question))
    q2c = get_selector("q2c")
    t = time.perf_counter()
    pre = edge.prefill(prompt, q2c)
    prefill_s = time.perf_counter() - t
    # the full answer: the whole prefill's KV (a copy: generation appends to its cache), which is what
    # Cloud.answer_text computes (prefill of prompt[:-1], then the last token at its position)
    full = _answer_one_set(cloud, prompt, pre, full_selection(prompt), max_new_tokens)
    q2c_scores = q2c.score(edge.score_inputs(prompt, q2c, pre))
    kvzip = get_selector("kvzip", question_weight=weight)
    inputs = edge.score_inputs(prompt, kvzip, pre)
    t = time.perf_counter()
    recon = kvzip.reconstruction_scores(inputs)
    recon_s = time.perf_counter() - t
    combined = kvzip.with_question(recon, inputs.attention)
    rec = {
        "example": ex.id,
        "context_tokens": prompt.context_len,
        "prompt_tokens": len(prompt),
        "prefill_s": round(prefill_s, 4),
        "reconstruction_s": round(recon_s, 4),
        "full": full.text,
        "full_f1": best_over_golds(f1_score, full.text, list(ex.answers)),
        "answers": {},
    }
    for r in retentions:
        if wire:
            sels = {
                "q2c": top_k_selection(prompt, q2c_scores, r),
                "kvzip-max": top_k_selection(prompt, recon.amax(dim=(0, 1)), r),
                "kvzip-global": head_selection(prompt, recon, r, "global"),
            }
            sels["kvzip-matched"] = None  # per profile, from q2c's bytes
            for name, sel in sels.items():
                if name not in variants:
                    continue
                for profile in wire:
                    key = f"{name}/{profile}@{r:g}"
                    if reuse is not None and key in reuse["answers"] and name != "kvzip-matched":
                        rec["answers"][key] = reuse["answers"][key]  # the same stream and answer: deterministic
                        continue
                    if name == "kvzip-matched":
                        limit = rec["answers"][f"{BASELINE}/{profile}@{r:g}"]["bytes"]
                        sel = matched_selection(edge, prompt, pre, recon, r, profile, limit)
                    got = _wire_answer(edge, cloud, prompt, pre, sel, r, profile, max_new_tokens)
                    ans = got["answer"]
                    rec["answers"][f"{name}/{profile}@{r:g}"] = {
                        "prediction": ans.text,
                        "agreement_f1": f1_score(ans.text, full.text),
                        "identical": ans.tokens == full.tokens,
                        "f1": best_over_golds(f1_score, ans.text, list(ex.answers)),
                        "bytes": got["bytes"],
                        "kv_bytes": got["kv_bytes"],
                    }
            continue
        sels = {
            "q2c": top_k_selection(prompt, q2c_scores, r),
            "kvzip-max": top_k_selection(prompt, recon.amax(dim=(0, 1)), r),
            "kvzip-mean": top_k_selection(prompt, recon.mean(dim=(0, 1)), r),
            "kvzip-layer": head_selection(prompt, recon, r, "layer"),
            "kvzip-global": head_selection(prompt, recon, r, "global"),
            "kvzip+q2c-layer": head_selection(prompt, combined, r, "layer"),
        }
        for name, sel in sels.items():
            if sel.heads is None:
                ans = _answer_one_set(cloud, prompt, pre, sel, max_new_tokens)
            else:
                ans = cloud.answer_heads(prompt, pre, sel, max_new_tokens)
            rec["answers"][f"{name}@{r:g}"] = {
                "prediction": ans.text,
                "agreement_f1": f1_score(ans.text, full.text),
                "identical": ans.tokens == full.tokens,
                "f1": best_over_golds(f1_score, ans.text, list(ex.answers)),
            }
    return rec


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def variant_names(wire: list[str], variants=tuple(WIRE_VARIANTS)) -> list[str]:
    """The record keys' variant names (before "@retention"): VARIANTS, or the streamed variants x profiles."""
    return [f"{v}/{p}" for p in wire for v in WIRE_VARIANTS if v in variants] if wire else list(VARIANTS)


def _describe(name: str) -> str:
    base, _, profile = name.partition("/")
    return f"{WIRE_VARIANTS[base]}, {profile}" if profile else VARIANTS[name]


def summarize(records: list[dict], retentions: list[float], names: list[str] | None = None) -> list[dict]:
    """Per (variant, retention): agreement F1 mean +/- SE, paired difference with q2c (of the same profile)
    +/- SE, identical share, F1; streamed variants add mean bytes and the paired bytes ratio to q2c."""
    rows = []
    for r in retentions:
        for name in names or list(VARIANTS):
            _, _, profile = name.partition("/")
            baseline = f"{BASELINE}/{profile}" if profile else BASELINE
            base_answers = [rec["answers"][f"{baseline}@{r:g}"] for rec in records]
            base = [a["agreement_f1"] for a in base_answers]
            got = [rec["answers"][f"{name}@{r:g}"] for rec in records]
            agree = [a["agreement_f1"] for a in got]
            mean, se = _mean_se(agree)
            diff, diff_se = _mean_se([a - b for a, b in zip(agree, base)])
            rows.append(
                {
                    "variant": name,
                    "retention": r,
                    "n": len(got),
                    "agreement_f1": round(mean, 4),
                    "se": round(se, 4),
                    "vs_q2c": round(diff, 4),
                    "vs_q2c_se": round(diff_se, 4),
                    "identical": round(sum(a["identical"] for a in got) / len(got), 4),
                    "f1": round(sum(a["f1"] for a in got) / len(got), 4),
                }
            )
            if "bytes" in got[0]:
                ratio, ratio_se = _mean_se([a["bytes"] / b["bytes"] for a, b in zip(got, base_answers)])
                overhead = [(a["bytes"] - a["kv_bytes"]) / a["bytes"] for a in got]
                rows[-1].update(
                    bytes=round(sum(a["bytes"] for a in got) / len(got)),
                    bytes_vs_q2c=round(ratio, 4),
                    bytes_vs_q2c_se=round(ratio_se, 4),
                    non_kv_share=round(sum(overhead) / len(overhead), 4),
                )
    return rows


def markdown(rows: list[dict], records: list[dict]) -> str:
    wire = "bytes" in rows[0]
    head = "| variant | retention | agreement F1 ± SE | vs q2c (paired) ± SE | identical | F1 (gold) |"
    lines = [
        head + (" bytes | bytes / q2c's ± SE | not K/V |" if wire else ""),
        "|---|---|---|---|---|---|" + ("---|---|---|" if wire else ""),
    ]
    for row in rows:
        line = (
            f"| {_describe(row['variant'])} | {row['retention']:g} | {row['agreement_f1']:.3f} ± {row['se']:.3f} | "
            f"{row['vs_q2c']:+.3f} ± {row['vs_q2c_se']:.3f} | {100 * row['identical']:.0f}% | {row['f1']:.3f} |"
        )
        if wire:
            line += (
                f" {row['bytes']:,} | {row['bytes_vs_q2c']:.4f} ± {row['bytes_vs_q2c_se']:.4f} | "
                f"{100 * row['non_kv_share']:.1f}% |"
            )
        lines.append(line)
    prefill = sum(r["prefill_s"] for r in records)
    recon = sum(r["reconstruction_s"] for r in records)
    ctx = sum(r["context_tokens"] for r in records) / len(records)
    full_f1 = sum(r["full_f1"] for r in records) / len(records)
    lines += [
        "",
        f"{len(records)} questions, {ctx:.0f} context tokens on average; full-KV F1 {full_f1:.3f}. "
        f"kvzip's reconstruction took {recon / prefill:.2f}x the prompt's prefill time "
        f"({1000 * recon / len(records):.0f} ms vs {1000 * prefill / len(records):.0f} ms per question).",
    ]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import torch

    from kvwire.bench.data import load_examples, pick
    from kvwire.bench.run_dir import complete_records
    from kvwire.kvcodec.models import load_model
    from kvwire.kvcodec.pipeline import Cloud, Edge

    retentions = [float(x) for x in args.retentions.split(",") if x.strip()]
    if not retentions or not all(0.0 < r < 1.0 for r in retentions):
        print(f"--retentions {args.retentions!r}: give retentions in (0, 1)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    wire = [p for p in args.wire.split(",") if p.strip()]
    variants = {BASELINE, *(v.strip() for v in args.variants.split(",") if v.strip())} if args.variants else set()
    if not set(variants) <= set(WIRE_VARIANTS):
        print(f"--variants {args.variants!r}: choose from {', '.join(WIRE_VARIANTS)}", file=sys.stderr)
        return 2
    variants = tuple(variants or WIRE_VARIANTS)
    names = variant_names(wire, variants)
    index, _, count = args.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        print(f"--shard {args.shard!r}: give I/N with 0 <= I < N", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = pick(load_examples(args.data), args.limit or None, shuffle=True, seed=args.seed)
    examples = examples[int(index) :: int(count)]

    def complete(folder: Path) -> dict:
        path = folder / "records.jsonl"
        found = {}
        if path.is_file():
            for rec in complete_records(path.read_text(encoding="utf-8")):
                if all(f"{v}@{r:g}" in rec["answers"] for v in names for r in retentions):
                    found[rec["example"]] = rec
        return found

    if args.merge:
        done = {}
        for folder in args.merge.split(","):
            done.update(complete(Path(folder)))
        records = list(done.values())
        return _write(out, summarize(records, retentions, names), records)
    loaded = load_model(args.model, dtype="fp32")
    edge, cloud = Edge(loaded), Cloud(loaded)
    path = out / "records.jsonl"
    done = complete(out)
    reuse = {}
    for folder in filter(None, args.reuse.split(",")):
        for rec in complete_records((Path(folder) / "records.jsonl").read_text(encoding="utf-8")):
            reuse[rec["example"]] = rec
    with open(path, "a", encoding="utf-8") as fh:
        for i, ex in enumerate(examples):
            if ex.id in done:
                continue
            rec = run_question(
                edge, cloud, ex, retentions, args.question_weight, args.max_new_tokens, wire, variants, reuse.get(ex.id)
            )
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[ex.id] = rec
            print(f"[{i + 1}/{len(examples)}] {ex.id}", file=sys.stderr, flush=True)
    records = [done[ex.id] for ex in examples]
    return _write(out, summarize(records, retentions, names), records)


def _write(out: Path, rows: list[dict], records: list[dict]) -> int:
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    text = markdown(rows, records)
    (out / "results.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvwire.bench.selection_bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
