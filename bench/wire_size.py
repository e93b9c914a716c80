"""Wire-size benchmark: bytes on the wire per precision profile and retention, framing included.

Every figure comes from running the real StreamEncoder (header, chunk and trailer frames summed),
so positions, per-tensor encoding headers, scales, prompt ids and CRCs are all counted. The ratio
divides by the FP16 KV of the full prompt (kvcodec.pipeline.fp16_kv_bytes), as the daemons do.

- synthetic rows: random-normal KV of a named model geometry. Without the entropy stage the byte
  count depends only on shapes, so random values are as good as real ones there.
- entropy rows: whether the optional zstd stage pays can only be judged on real KV, so those rows
  prefill the embedded model on real passages and encode the same selection with and without zstd.
"""

from __future__ import annotations

import sys
import time

import torch

from kvwire.bench.geometries import Geometry, get_geometry
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.pipeline import fp16_kv_bytes
from kvwire.kvcodec.profiles import get_profile, profile_names
from kvwire.kvcodec.prompt import Prompt
from kvwire.kvcodec.selectors import ScoreInputs, full_selection, get_selector
from kvwire.kvcodec.stream import StreamEncoder, StreamHeader

RETENTIONS = (1.0, 0.75, 0.5, 0.25)
# A QA prompt's fixed parts on a chat model: system/instruction template before the context, and
# question + template suffix after it (both always kept by selection).
TEMPLATE_TOKENS, QUESTION_TOKENS = 40, 30
# zstd "pays" when it removes at least this share of the bytes. Level 3 runs at a few hundred MB/s
# per core, so below ~5% its CPU time on both ends outweighs the transfer time it saves on fast
# links; `kvwire bench codec --zstd` gives its time cost on this machine.
ZSTD_PAYS_SAVING = 0.05


# (geometry, profile, retention, the ratio it must not exceed), from the targets.
TARGETS = (
    ("qwen2.5-7b", "int8", 1.0, 0.51),
    ("qwen2.5-7b", "mixed-int4", 1.0, 0.29),
    ("qwen2.5-7b", "mixed-int4", 0.5, 0.15),
)


def synthetic_prompt(geo: Geometry, tokens: int, seed: int = 0) -> Prompt:
    """A prompt of `tokens` random ids: TEMPLATE_TOKENS, then the context, then QUESTION_TOKENS."""
    if tokens < TEMPLATE_TOKENS + QUESTION_TOKENS + 1:
        raise ConfigError(
            f"--tokens must be at least {TEMPLATE_TOKENS + QUESTION_TOKENS + 1} "
            f"({TEMPLATE_TOKENS} template + {QUESTION_TOKENS} question tokens + context), got {tokens}"
        )
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, geo.vocab, (tokens,), generator=gen).tolist()
    return Prompt(ids=tuple(ids), context_start=TEMPLATE_TOKENS, context_end=tokens - QUESTION_TOKENS)


def synthetic_kv(
    geo: Geometry, positions: int, seed: int = 0, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random-normal keys and values, per layer [kv_heads, positions, head_dim]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (geo.kv_heads, positions, geo.head_dim)
    keys = [torch.randn(shape, generator=gen).to(dtype=dtype, device=device) for _ in range(geo.num_layers)]
    values = [torch.randn(shape, generator=gen).to(dtype=dtype, device=device) for _ in range(geo.num_layers)]
    return keys, values


def make_header(
    prompt: Prompt,
    kept: torch.Tensor,
    geometry: dict,
    profile: str,
    retention: float,
    selector: str,
    model: str = "0" * 16,
    tokenizer: str = "0" * 16,
    dtype: str = "float16",
) -> StreamHeader:
    """The StreamHeader the edge would send (fingerprints default to placeholders of the real width)."""
    return StreamHeader(
        mode="kv",
        prompt_ids=list(prompt.ids),
        context_span=(prompt.context_start, prompt.context_end),
        kept=kept.tolist(),
        geometry=geometry,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        profile=get_profile(profile),
        selector=selector,
        retention=retention,
    )


def encode_stream(header: StreamHeader, keys, values, order: torch.Tensor, compress: bool = False) -> tuple[int, int]:
    """Run the StreamEncoder over one selection; (bytes on the wire, frames), trailer included."""
    enc = StreamEncoder(header, compress=compress)
    sizes = [len(enc.header_frame())]
    sizes += [len(f) for f in enc.chunk_frames(keys, values, order)]
    sizes.append(len(enc.trailer_frame()))
    return sum(sizes), len(sizes)


def _row(
    geometry: str,
    source: str,
    prompt: Prompt,
    profile: str,
    retention: float,
    entropy: str,
    selector: str,
    kept: int,
    nbytes: int,
    frames: int,
    fp16: int,
) -> dict:
    return {
        "geometry": geometry,
        "kv_source": source,
        "tokens": len(prompt),
        "context_tokens": prompt.context_len,
        "profile": profile,
        "retention": retention,
        "entropy": entropy,
        "selector": selector,
        "kept_positions": kept,
        "frames": frames,
        "bytes": nbytes,
        "fp16_bytes": fp16,
        "ratio": round(nbytes / fp16, 6),
    }


def measure_synthetic(
    geometry: str, tokens: int, profiles: list[str] | None = None, retentions=RETENTIONS, seed: int = 0
) -> list[dict]:
    """Rows for every profile x retention on random-normal KV of `geometry` (no entropy stage).

    Selection uses the shared `random` selector: without entropy coding only the number of kept
    positions matters, not which ones.
    """
    geo = get_geometry(geometry)
    prompt = synthetic_prompt(geo, tokens, seed)
    keys, values = synthetic_kv(geo, prompt.stream_len, seed)
    fp16 = fp16_kv_bytes(geo.as_header(), len(prompt))
    selector = get_selector("random")
    rows = []
    for retention in retentions:
        inputs = ScoreInputs(prompt, None, keys, values)
        sel = full_selection(prompt) if retention >= 1.0 else selector.select(inputs, retention)
        for profile in profiles or profile_names():
            header = make_header(prompt, sel.kept, geo.as_header(), profile, retention, "random")
            nbytes, frames = encode_stream(header, keys, values, sel.order)
            rows.append(
                _row(
                    geometry,
                    "synthetic",
                    prompt,
                    profile,
                    retention,
                    "none",
                    "random",
                    len(sel.kept),
                    nbytes,
                    frames,
                    fp16,
                )
            )
    return rows


def _real_text(tokenizer, context_tokens: int) -> tuple[str, str, str]:
    """(context, question, what the text is): distinct real passages until ~context_tokens tokens.

    Distinct passages matter: a repeated passage repeats layer 0's values exactly (V of layer 0
    depends on the token alone), which zstd would find and so overstate compressibility.
    """
    from kvwire.bench.data import SQUAD_SAMPLE, load_examples

    examples = []
    try:
        examples = load_examples(SQUAD_SAMPLE)
    except ConfigError as exc:
        print(
            f"wire-size: SQuAD sample passages unavailable ({exc}); using the demo passage, repeated", file=sys.stderr
        )
    if examples:
        passages, seen = [], set()
        for ex in examples:
            if ex.context not in seen:
                seen.add(ex.context)
                passages.append(ex.context)
        question, source = examples[0].question, "SQuAD v1.1 dev sample passages (distinct, in file order)"
    else:
        import json
        from importlib import resources

        demo = json.loads(resources.files("kvwire.kvcodec").joinpath("data/demo.json").read_text())
        passages, question = [demo["context"]] * 64, demo["questions"][0]
        source = "demo passage repeated (zstd figures are optimistic)"
    chosen, total = [], 0
    for p in passages:
        if total >= context_tokens:
            break
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if total + len(ids) > context_tokens:  # cut the last passage to fit (only its end is lost)
            p = tokenizer.decode(ids[: context_tokens - total])
        chosen.append(p)
        total += len(ids)
    return "\n\n".join(chosen), question, source


def measure_real(
    context_tokens: int,
    profiles: list[str] | None = None,
    retentions=RETENTIONS,
    model: str | None = None,
    selector_name: str = "q2c",
) -> tuple[list[dict], str]:
    """Rows with and without the zstd stage on real KV of the embedded (or given) model.

    One prefill of real passages (~context_tokens tokens of context) with the q2c attention
    capture; each retention's selection is encoded by every profile twice (entropy none / zstd).
    Returns (rows, a line saying what text was used).
    """
    from kvwire.kvcodec.models import load_model
    from kvwire.kvcodec.pipeline import Edge
    from kvwire.kvcodec.prompt import build_prompt, model_window

    loaded = load_model(model)
    edge = Edge(loaded)
    context, question, source = _real_text(loaded.tokenizer, context_tokens)
    prompt = build_prompt(loaded.tokenizer, context, question, max_len=model_window(loaded.model))
    selector = get_selector(selector_name)
    t = time.perf_counter()
    pre = edge.prefill(prompt, selector)
    prefill_s = time.perf_counter() - t
    keys, values = pre.keys, pre.values
    fp16 = fp16_kv_bytes(edge.geometry, len(prompt))
    name = f"{loaded.source.rstrip('/').split('/')[-1]}"
    rows = []
    for retention in retentions:
        sel = full_selection(prompt) if retention >= 1.0 else edge.select(prompt, selector, pre, retention)
        for profile in profiles or profile_names():
            header = make_header(
                prompt,
                sel.kept,
                edge.geometry,
                profile,
                retention,
                selector_name,
                edge.model_fp,
                edge.tokenizer_fp,
                str(loaded.dtype).removeprefix("torch."),
            )
            for entropy, compress in (("none", False), ("zstd", True)):
                nbytes, frames = encode_stream(header, keys, values, sel.order, compress)
                rows.append(
                    _row(
                        name,
                        "real",
                        prompt,
                        profile,
                        retention,
                        entropy,
                        selector_name,
                        len(sel.kept),
                        nbytes,
                        frames,
                        fp16,
                    )
                )
    note = (
        f"real KV: {name}, prompt {len(prompt)} tokens ({prompt.context_len} of context) from {source}; "
        f"prefill {prefill_s:.1f} s"
    )
    return rows, note


def check_targets(rows: list[dict], geometry: str) -> list[dict]:
    """The issue's ratio targets that apply to `geometry`, each with the measured ratio and verdict."""
    out = []
    for geo, profile, retention, limit in TARGETS:
        if geo != geometry:
            continue
        hit = [
            r
            for r in rows
            if r["kv_source"] == "synthetic"
            and r["profile"] == profile
            and r["retention"] == retention
            and r["entropy"] == "none"
        ]
        if hit:
            ratio = hit[0]["ratio"]
            out.append(
                {"profile": profile, "retention": retention, "limit": limit, "ratio": ratio, "met": ratio <= limit}
            )
    return out


def zstd_verdicts(rows: list[dict]) -> list[dict]:
    """Per profile: ratio without and with zstd on real KV at each retention, and whether it pays."""
    real = {(r["profile"], r["retention"], r["entropy"]): r for r in rows if r["kv_source"] == "real"}
    out = []
    for profile in dict.fromkeys(p for p, _, _ in real):
        per_r = []
        for retention in dict.fromkeys(r for p, r, _ in real if p == profile):
            plain, packed = real.get((profile, retention, "none")), real.get((profile, retention, "zstd"))
            if plain and packed:
                per_r.append(
                    {
                        "retention": retention,
                        "ratio_none": plain["ratio"],
                        "ratio_zstd": packed["ratio"],
                        "saving": round(1 - packed["bytes"] / plain["bytes"], 4),
                    }
                )
        if per_r:
            least = min(x["saving"] for x in per_r)
            out.append(
                {"profile": profile, "by_retention": per_r, "min_saving": least, "pays": least >= ZSTD_PAYS_SAVING}
            )
    return out


def format_rows(rows: list[dict]) -> str:
    head = f"{'kv':<9} {'profile':<11} {'retention':>9} {'entropy':<7} {'kept':>6} {'frames':>6} {'bytes':>13} {'fp16 bytes':>13} {'ratio':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['kv_source']:<9} {r['profile']:<11} {r['retention']:>9.2f} {r['entropy']:<7} {r['kept_positions']:>6} "
            f"{r['frames']:>6} {r['bytes']:>13,} {r['fp16_bytes']:>13,} {r['ratio']:>7.4f}"
        )
    return "\n".join(lines)


def format_targets(targets: list[dict], geometry: str) -> str:
    if not targets:
        return f"targets: none defined for {geometry} (they are set for {', '.join(sorted({t[0] for t in TARGETS}))})"
    return "\n".join(
        f"target {t['profile']} at retention {t['retention']:.2f}: ratio {t['ratio']:.4f} <= {t['limit']:.2f}"
        f"  {'MET' if t['met'] else 'NOT MET'}"
        for t in targets
    )


def format_verdicts(verdicts: list[dict]) -> str:
    lines = [f"zstd stage on real KV (pays = saves >= {ZSTD_PAYS_SAVING:.0%} of the bytes at every retention):"]
    for v in verdicts:
        first = v["by_retention"][0]
        lines.append(
            f"  {v['profile']:<11} ratio {first['ratio_none']:.4f} -> {first['ratio_zstd']:.4f} at retention "
            f"{first['retention']:.2f} (saves {first['saving']:.1%}; least saving over retentions "
            f"{v['min_saving']:.1%}): "
            f"{'pays' if v['pays'] else 'does not pay'}"
        )
    return "\n".join(lines)
