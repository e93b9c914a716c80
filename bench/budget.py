"""`kvwire diagnose --budget B`: a precision profile that spends at most B of the FP16 bytes, with the
bits placed where the model is sensitive to them.

1. Sensitivity sweep (resumable, budget-independent: OUT/budget-sweep.jsonl). For every question,
   the full cache's teacher-forced pass along the full-KV answer is the reference
   (bench/teacher_forcing.py); then, for every layer, for K and for V, for every candidate encoding,
   that one tensor alone is quantized and dequantized (every other tensor exact) and one forced pass
   measures the mean KL(full || that cache) per answer token. Candidates: every encoding of the
   registry (kvcodec/encodings/registry.py) that takes the token axis for this head_dim and costs no
   more than FP16; one whose round trip is exact (fp32 on an fp32 model) costs 0 without a pass.
2. Allocation. Each (layer, K|V) slot picks one candidate; the profile's bytes are the slots' bytes
   per position times the positions a request at --retention keeps (template and question included,
   the most of any sweep question), against the FP16 bytes of the whole prompt. An exact
   multiple-choice knapsack over whole bytes minimises the sum of the slots' sensitivities under the
   budget, so a larger budget never gives a larger sum. A budget below the cheapest profile is a
   ConfigError that names the cheapest.
3. Check. The written profile, all slots at once, measured by the same forced pass on every question
   (top-1 agreement and KL against the full cache), beside the sum the allocation predicted.

Writes OUT/profile.json (a profile file for `kvwire eval --profiles` and `edge-agent --profile`),
OUT/budget.json and OUT/budget.md.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvwire.bench.evaluator import check_fixed
from kvwire.bench.run_dir import complete_records, write_atomic
from kvwire.bench.teacher_forcing import compare, forced_logprobs, fresh_cache
from kvwire.kvcodec.encodings import encodings
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.generate import generate
from kvwire.kvcodec.pipeline import EdgeRequest, fp16_kv_bytes
from kvwire.kvcodec.profiles import PrecisionProfile
from kvwire.kvcodec.quant import Quantizer
from kvwire.kvcodec.selectors.base import context_budget

TENSORS = ("k", "v")
SWEEP_FILE = "budget-sweep.jsonl"


@dataclass(frozen=True)
class Candidate:
    """One encoding a slot may take, and what one position of one layer's K or V costs in it."""

    kind: str
    bytes_per_position: int  # scales + payload, all kv heads


def candidates(geometry: dict, only: list[str] | None = None) -> list[Candidate]:
    """The registry's encodings usable at this geometry on the token axis, no dearer than FP16 (only:
    restrict to these names; ConfigError for a name that is not usable)."""
    heads, head_dim = geometry["kv_heads"], geometry["head_dim"]
    fp16 = sum(Quantizer("fp16").sizes(heads, 1, head_dim))
    usable = {}
    for enc in encodings():
        try:
            q = Quantizer(enc.name)
            q.check_head_dim(head_dim)
        except ConfigError:
            continue
        cost = sum(q.sizes(heads, 1, head_dim))
        if cost <= fp16:
            usable[enc.name] = Candidate(enc.name, cost)
    if only:
        bad = [k for k in only if k not in usable]
        if bad:
            raise ConfigError(
                f"--encodings {', '.join(bad)}: not usable here (token axis, head_dim {head_dim}, no dearer "
                f"than fp16); usable: {', '.join(usable)}"
            )
        return [usable[k] for k in only]
    return list(usable.values())


def roundtrip(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """x [heads, n, head_dim] after encode and decode, as the cloud receives it."""
    return q.decode(*q.encode(x), torch.empty_like(x))


def slot_key(layer: int, tensor: str, kind: str) -> str:
    return f"{layer}:{tensor}:{kind}"


def sweep_question(loaded, edge, ex, cands: list[Candidate], max_new_tokens: int, stop: set[int]) -> dict:
    """The sensitivity of every (layer, K|V, candidate) on one question (see the module's step 1)."""
    model = loaded.model
    prompt = edge.prompt(EdgeRequest(ex.context, ex.question, selector=None))
    pre = edge.prefill(prompt, None)
    keys, values = pre.keys, pre.values  # each [kv_heads, stream_len, head_dim]
    gen = generate(model, fresh_cache(keys, values), prompt.ids[-1], len(prompt.ids) - 1, max_new_tokens, stop)
    reference = forced_logprobs(model, fresh_cache(keys, values), prompt.ids, gen.tokens)
    kl = {}
    for layer in range(len(keys)):
        for tensor, tensors in zip(TENSORS, (keys, values)):
            for c in cands:
                x = tensors[layer]
                y = roundtrip(Quantizer(c.kind), x)
                if torch.equal(x, y):
                    kl[slot_key(layer, tensor, c.kind)] = 0.0
                    continue
                ks, vs = list(keys), list(values)
                (ks if tensor == "k" else vs)[layer] = y
                forced = forced_logprobs(model, fresh_cache(ks, vs), prompt.ids, gen.tokens)
                kl[slot_key(layer, tensor, c.kind)] = compare(reference, forced).kl
    return {
        "example": ex.id,
        "prompt_len": len(prompt.ids),
        "stream_len": prompt.stream_len,
        "context_tokens": prompt.context_end - prompt.context_start,
        "context_start": prompt.context_start,
        "answer": gen.tokens,
        "kl": kl,
    }


def kept_fraction(sweep: list[dict], retention: float, fixed: str = "stream/stream") -> float:
    """The most, over the questions, of (positions a request at `retention` streams) / (prompt tokens).

    fixed (TEMPLATE/QUESTION, eval's --fixed): a segment the cloud computes ("cloud") is not streamed."""
    template, question = fixed.split("/")
    fractions = []
    for r in sweep:
        outside = r["stream_len"] - r["context_tokens"]  # template prefix + question and template suffix
        if template == question:
            streamed = outside if template == "stream" else 0
        elif "context_start" not in r:
            raise ConfigError(
                f"--fixed {fixed}: the sweep in this --out predates the prefix length it needs; use a new --out"
            )
        else:
            prefix = r["context_start"]
            streamed = prefix if template == "stream" else outside - prefix
        kept = streamed + (context_budget(retention, r["context_tokens"]) if r["context_tokens"] else 0)
        fractions.append(kept / r["prompt_len"])
    return max(fractions)


def sensitivities(sweep: list[dict], num_layers: int, cands: list[Candidate]) -> dict[tuple[int, str], list[float]]:
    """Mean KL over the questions for every slot and candidate (in candidate order)."""
    return {
        (layer, t): [float(np.mean([r["kl"][slot_key(layer, t, c.kind)] for r in sweep])) for c in cands]
        for layer in range(num_layers)
        for t in TENSORS
    }


def allocate(sens: dict[tuple[int, str], list[float]], cands: list[Candidate], capacity: int) -> dict:
    """The candidate of every slot minimising the sum of sensitivities with the slots' bytes per position
    summing to at most `capacity` (exact knapsack by dynamic programming over whole bytes; equal sums go
    to fewer bytes). ValueError when even the cheapest choice everywhere exceeds the capacity."""
    unit = math.gcd(*(c.bytes_per_position for c in cands))
    costs = [c.bytes_per_position // unit for c in cands]
    cap = capacity // unit
    slots = list(sens)
    cheapest = len(slots) * min(costs)
    if cheapest > cap:
        raise ValueError(f"needs {cheapest * unit} bytes per position at least, the budget allows {capacity}")
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choices = []
    for slot in slots:
        new, pick = np.full(cap + 1, np.inf), np.full(cap + 1, -1, dtype=np.int64)
        for i, (cost, s) in enumerate(zip(costs, sens[slot])):
            if cost > cap:
                continue
            trial = np.full(cap + 1, np.inf)
            trial[cost:] = best[: cap + 1 - cost] + s
            better = trial < new
            new[better], pick[better] = trial[better], i
        best = new
        choices.append(pick)
    used = int(np.argmin(best))  # the first minimum: the fewest bytes among equal sums
    chosen = {}
    for slot, pick in zip(reversed(slots), reversed(choices)):
        i = int(pick[used])
        chosen[slot] = cands[i]
        used -= costs[i]
    return {slot: chosen[slot] for slot in slots}


def to_profile(name: str, chosen: dict, num_layers: int) -> PrecisionProfile:
    """The allocation as a profile: the most common (K, V) pair as the default, other layers as overrides."""
    pairs = {layer: (chosen[(layer, "k")].kind, chosen[(layer, "v")].kind) for layer in range(num_layers)}
    default = Counter(pairs.values()).most_common(1)[0][0]

    def spec(pair):
        return (Quantizer(pair[0]), Quantizer(pair[1]))

    return PrecisionProfile(name, spec(default), {i: spec(p) for i, p in pairs.items() if p != default})


def profile_fraction(profile: PrecisionProfile, geometry: dict, kept: float) -> float:
    """Bytes of the profile's scales and payloads for `kept` of the prompt's positions / FP16 bytes of all."""
    heads, head_dim = geometry["kv_heads"], geometry["head_dim"]
    per_position = sum(
        sum(q.sizes(heads, 1, head_dim)) for pair in profile.resolve(geometry["num_layers"]) for q in pair
    )
    return kept * per_position / fp16_kv_bytes(geometry, 1)


def check_question(loaded, edge, ex, record: dict, profile: PrecisionProfile) -> dict:
    """The written profile on every layer at once: forced top-1 and KL against the full cache."""
    model = loaded.model
    prompt = edge.prompt(EdgeRequest(ex.context, ex.question, selector=None))
    pre = edge.prefill(prompt, None)
    keys, values = pre.keys, pre.values
    reference = forced_logprobs(model, fresh_cache(keys, values), prompt.ids, record["answer"])
    specs = profile.resolve(len(keys))
    ks = [roundtrip(k, x) for (k, _), x in zip(specs, keys)]
    vs = [roundtrip(v, x) for (_, v), x in zip(specs, values)]
    scores = compare(reference, forced_logprobs(model, fresh_cache(ks, vs), prompt.ids, record["answer"]))
    return {"top1": scores.top1, "kl": scores.kl}


def _load_sweep(path: Path, cands: list[Candidate]) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for rec in complete_records(path.read_text(encoding="utf-8")):
            if all(slot_key(0, "k", c.kind) in rec["kl"] for c in cands):
                done[rec["example"]] = rec
    return done


def run_budget(args, loaded, ev, questions, out: Path) -> int:
    """The --budget mode of `kvwire diagnose` (the module docstring says what it does)."""
    from tqdm import tqdm

    if not 0.0 < args.budget <= 1.0:
        raise ConfigError(f"--budget {args.budget}: a fraction of the FP16 bytes in (0, 1]")
    check_fixed(args.fixed)
    geometry, num_layers = ev.geometry, ev.geometry["num_layers"]
    only = [x.strip() for x in args.encodings.split(",") if x.strip()] if args.encodings else None
    cands = candidates(geometry, only)
    started = time.perf_counter()
    path = out / SWEEP_FILE
    done = _load_sweep(path, cands)
    todo = [q for q in questions if q.id not in done]
    with open(path, "a", encoding="utf-8") as fh:
        for q in tqdm(todo, desc="sensitivity sweep", unit="question", mininterval=5, disable=not todo):
            rec = sweep_question(loaded, ev.edge, q, cands, args.max_new_tokens, ev.cloud.stop)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[q.id] = rec
    sweep = [done[q.id] for q in questions]
    kept = kept_fraction(sweep, args.retention, args.fixed)
    fp16_position = fp16_kv_bytes(geometry, 1)
    capacity = math.floor(args.budget / kept * fp16_position)
    sens = sensitivities(sweep, num_layers, cands)
    try:
        chosen = allocate(sens, cands, capacity)
    except ValueError:
        cheapest = min(cands, key=lambda c: c.bytes_per_position)
        floor = kept * 2 * num_layers * cheapest.bytes_per_position / fp16_position
        raise ConfigError(
            f"--budget {args.budget:g} is below the cheapest profile at retention {args.retention:g}: "
            f"{cheapest.kind} everywhere is {floor:.4f} of the FP16 bytes ({100 * kept:.0f}% of the positions "
            f"kept, {FIXED_WORDS[args.fixed]}); raise --budget, lower --retention, leave the fixed positions to "
            f"the cloud (--fixed cloud/cloud), or register a cheaper encoding"
        ) from None
    name = args.name or f"{Path(loaded.source).name}-budget-{args.budget:g}"
    profile = to_profile(name, chosen, num_layers)
    predicted = sum(sens[slot][cands.index(c)] for slot, c in chosen.items())
    checks = [
        check_question(loaded, ev.edge, q, done[q.id], profile)
        for q in tqdm(questions, desc="checking the profile", unit="question", mininterval=5)
    ]
    result = {
        "model": loaded.source,
        "questions": len(questions),
        "budget": args.budget,
        "retention": args.retention,
        "fixed": args.fixed,
        "kept_fraction": kept,
        "candidates": [{"kind": c.kind, "bytes_per_position": c.bytes_per_position} for c in cands],
        "profile_fraction": round(profile_fraction(profile, geometry, kept), 6),
        "predicted_kl_sum": round(predicted, 6),
        "measured": {
            "top1": round(float(np.mean([c["top1"] for c in checks])), 4),
            "top1_se": _se([c["top1"] for c in checks]),
            "kl": round(float(np.mean([c["kl"] for c in checks])), 6),
            "kl_se": _se([c["kl"] for c in checks]),
        },
        "allocation": {f"{layer}:{t}": chosen[(layer, t)].kind for layer, t in chosen},
        "sensitivity": {f"{layer}:{t}": dict(zip((c.kind for c in cands), v)) for (layer, t), v in sens.items()},
        "profile": profile.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_atomic(out / "profile.json", json.dumps(profile.to_dict(), indent=1) + "\n")
    write_atomic(out / "budget.json", json.dumps(result, indent=1))
    report = render_budget(result, num_layers)
    write_atomic(out / "budget.md", report)
    print(report)
    print(f"wrote {out}/profile.json (use it with `kvwire eval --profiles` or `edge-agent --profile`)")
    return 0


# what the streamed positions include, per --fixed
FIXED_WORDS = {
    "stream/stream": "template and question included",
    "cloud/stream": "the question included, the template the cloud's",
    "stream/cloud": "the template included, the question the cloud's",
    "cloud/cloud": "context only: template and question are the cloud's",
}


def _se(values: list[float]) -> float | None:
    return round(float(np.std(values, ddof=1) / math.sqrt(len(values))), 6) if len(values) > 1 else None


def render_budget(result: dict, num_layers: int) -> str:
    m = result["measured"]
    lines = [
        f"# kvwire diagnose --budget {result['budget']:g}: {Path(result['model']).name}",
        "",
        f"{result['questions']} questions; retention {result['retention']:g} keeps at most "
        f"{100 * result['kept_fraction']:.1f}% of a prompt's positions ({FIXED_WORDS[result.get('fixed', 'stream/stream')]}).",
        "",
        f"- profile `{result['profile']['name']}`: {result['profile_fraction']:.4f} of the FP16 bytes (scales and "
        f"payload, framing not included)",
        f"- predicted KL sum (the slots' own sensitivities): {result['predicted_kl_sum']:.4f} nats/token",
        f"- measured with every slot at once: top-1 agreement {m['top1']:.3f} ± {m['top1_se'] or 0:.3f}, "
        f"KL {m['kl']:.4f} ± {m['kl_se'] or 0:.4f} nats/token (teacher-forced against the full cache)",
        "",
        "| layer | K | V | K sensitivity of each encoding (KL) | V sensitivity |",
        "|---:|---|---|---|---|",
    ]
    for layer in range(num_layers):
        k, v = result["allocation"][f"{layer}:k"], result["allocation"][f"{layer}:v"]
        sk, sv = result["sensitivity"][f"{layer}:k"], result["sensitivity"][f"{layer}:v"]
        lines.append(
            f"| {layer} | {k} | {v} | {', '.join(f'{n} {x:.3g}' for n, x in sk.items())} | "
            f"{', '.join(f'{n} {x:.3g}' for n, x in sv.items())} |"
        )
    return "\n".join(lines) + "\n"
