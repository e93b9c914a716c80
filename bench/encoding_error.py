"""Encoding-error benchmark: what each precision profile does to a real model's KV and next-token logits.

For each of `examples` SQuAD sample questions the embedded model (or the given one) prefills the
prompt once; every profile then encodes the full KV with the real StreamEncoder and decodes it
with the real StreamDecoder, so what is measured is what the wire carries (chunking, channel-axis
groups per chunk, padding). Per profile and question:
- relative MSE of K and of V: sum over layers of |decoded - original|^2 / sum of |original|^2;
- teacher-forced agreement with the full-KV answer: the full KV's greedy answer (up to
  `answer_tokens` tokens) is fed through the decoded cache in one forward pass, and the next-token
  distributions are compared with the full KV's: mean KL(full || decoded) per answer token, and the
  share of tokens whose argmax is the same (top-1 agreement);
- bytes on the wire / FP16 KV bytes of the prompt.
Figures are means over the questions with their standard errors.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from kvwire.bench.wire_size import make_header
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.pipeline import fp16_kv_bytes
from kvwire.kvcodec.profiles import PrecisionProfile, get_profile
from kvwire.kvcodec.quant import Quantizer
from kvwire.kvcodec.selectors import full_selection
from kvwire.kvcodec.stream import StreamDecoder, StreamEncoder

# Passages longer than this are cut (SQuAD's are ~150-250 tokens on SmolLM2; a tiny test tokenizer
# splits them into many more, and its model's window is 1024).
MAX_CONTEXT_TOKENS = 512

# Every integer encoding's uniform profile, the mixed and KIVI profiles (kvcodec/profiles.py).
DEFAULT_PROFILES = (
    "int8",
    "int4",
    "asym4",
    "int4_rot",
    "asym4_rot",
    "mixed-int4",
    "kivi-4",
    "int3",
    "asym3",
    "int3_rot",
    "asym3_rot",
    "kivi-3",
    "int2",
    "asym2",
    "int2_rot",
    "asym2_rot",
    "kivi-2",
)


def kivi_variant(bits: int, k_group: int, v_group: int) -> PrecisionProfile:
    """KIVI's split with explicit groups: keys per channel over k_group positions (0: the chunk),
    values per token over v_group channels (0: the row); for choosing the named kivi profiles."""
    k, v = Quantizer(f"asym{bits}", "channel", k_group), Quantizer(f"asym{bits}", "token", v_group)
    return PrecisionProfile(f"kivi-{bits} k{k_group} v{v_group}", (k, v))


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def _cache(keys, values):
    """A DynamicCache of per-layer [kv_heads, seq, head_dim] tensors (feeding tokens appends new tensors)."""
    from transformers import DynamicCache

    return DynamicCache([(k.unsqueeze(0), v.unsqueeze(0)) for k, v in zip(keys, values)])


def _logits(model, keys, values, tokens: list[int], position: int) -> torch.Tensor:
    """[len(tokens), vocab] fp32 logits of `tokens` fed at `position`.. on a cache of keys/values."""
    cache = _cache(keys, values)
    ids = torch.tensor([tokens])
    pos = torch.arange(position, position + len(tokens)).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True).logits[0].float()


def measure(
    examples: int = 8,
    answer_tokens: int = 16,
    profiles: list[str | PrecisionProfile] | None = None,
    model: str | None = None,
    threads: int | None = None,
) -> tuple[list[dict], str]:
    """One row per profile: mean and standard error over `examples` questions of K/V relative MSE,
    teacher-forced KL and top-1 agreement, and the wire ratio. Returns (rows, a line saying what ran).
    threads: torch intra-op threads for the run (None: leave torch's default)."""
    from kvwire.bench.data import SQUAD_SAMPLE, load_examples
    from kvwire.kvcodec.generate import eos_ids, greedy
    from kvwire.kvcodec.models import load_model
    from kvwire.kvcodec.pipeline import Edge
    from kvwire.kvcodec.prompt import build_prompt, model_window

    if examples < 1 or answer_tokens < 1:
        raise ConfigError(f"examples and answer tokens must be >= 1, got {examples} and {answer_tokens}")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    chosen = [get_profile(p) for p in (profiles or DEFAULT_PROFILES)]
    loaded = load_model(model)
    edge = Edge(loaded)
    stop = eos_ids(loaded.model, loaded.tokenizer)
    dtype = str(loaded.dtype).removeprefix("torch.")
    per: dict[str, dict[str, list[float]]] = {p.name: {} for p in chosen}
    started, tokens_seen = time.perf_counter(), []
    for ex in load_examples(SQUAD_SAMPLE)[:examples]:
        ids = loaded.tokenizer(ex.context, add_special_tokens=False)["input_ids"]
        context = ex.context if len(ids) <= MAX_CONTEXT_TOKENS else loaded.tokenizer.decode(ids[:MAX_CONTEXT_TOKENS])
        prompt = build_prompt(loaded.tokenizer, context, ex.question, max_len=model_window(loaded.model))
        pre = edge.prefill(prompt, None)
        keys, values = pre.keys, pre.values  # per layer [kv_heads, stream_len, head_dim]
        sel = full_selection(prompt)
        last, position = prompt.ids[-1], len(prompt.ids) - 1
        answer = greedy(loaded.model, _cache(keys, values), last, position, answer_tokens, stop).tokens
        fed = [last, *answer][:answer_tokens]  # each fed token predicts the next answer token
        tokens_seen.append(len(fed))
        full_logp = torch.log_softmax(_logits(loaded.model, keys, values, fed, position), dim=-1)
        fp16 = fp16_kv_bytes(edge.geometry, len(prompt))
        k_norm = sum(float(k.float().square().sum()) for k in keys)
        v_norm = sum(float(v.float().square().sum()) for v in values)
        for prof in chosen:
            header = make_header(prompt, sel.kept, edge.geometry, prof, 1.0, "full", dtype=dtype)
            enc = StreamEncoder(header)
            frames = [enc.header_frame(), *enc.chunk_frames(keys, values, sel.order), enc.trailer_frame()]
            dec = StreamDecoder(dtype=loaded.dtype)
            for f in frames:
                dec.feed(f)
            got = dec.result()
            dk = [k[0] for k in got.keys]
            dv = [v[0] for v in got.values]
            logp = torch.log_softmax(_logits(loaded.model, dk, dv, fed, position), dim=-1)
            kl = (full_logp.exp() * (full_logp - logp)).sum(-1)
            row = per[prof.name]
            for name, value in (
                ("k_rel_mse", sum(float((a.float() - b.float()).square().sum()) for a, b in zip(dk, keys)) / k_norm),
                ("v_rel_mse", sum(float((a.float() - b.float()).square().sum()) for a, b in zip(dv, values)) / v_norm),
                ("kl", float(kl.mean())),
                ("top1", float((logp.argmax(-1) == full_logp.argmax(-1)).float().mean())),
                ("ratio", sum(len(f) for f in frames) / fp16),
            ):
                row.setdefault(name, []).append(value)
    rows = []
    for prof in chosen:
        row = {"profile": prof.name, "examples": examples}
        for name, vals in per[prof.name].items():
            row[name], row[name + "_se"] = (round(x, 6) for x in _mean_se(vals))
        rows.append(row)
    name = loaded.source.rstrip("/").split("/")[-1]
    note = (
        f"{name} ({dtype}), {examples} SQuAD sample questions, full KV (retention 1.0), teacher-forced over "
        f"{statistics.fmean(tokens_seen):.1f} answer tokens on average; {time.perf_counter() - started:.0f} s"
    )
    return rows, note


def format_rows(rows: list[dict]) -> str:
    head = f"{'profile':<20} {'ratio':>6} {'K rel MSE':>17} {'V rel MSE':>17} {'KL/token':>17} {'top-1':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['profile']:<20} {r['ratio']:>6.4f} {r['k_rel_mse']:>8.4f} ±{r['k_rel_mse_se']:<7.4f} "
            f"{r['v_rel_mse']:>8.4f} ±{r['v_rel_mse_se']:<7.4f} {r['kl']:>8.4f} ±{r['kl_se']:<7.4f} "
            f"{r['top1']:>5.3f} ±{r['top1_se']:<6.3f}"
        )
    return "\n".join(lines)
