"""Codec speed benchmark: encode and decode time per MB of FP16 KV for every named profile.

Encode is the whole StreamEncoder (header, quantize/pack, chunk framing, CRC32C, trailer digest);
decode is the whole StreamDecoder (verify every frame, dequantize into preallocated tensors,
check the trailer, hand back the result). Each is set against a plain torch.clone of the same
KV tensors measured in the same run, the floor for anything that touches every byte once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from kvwire.bench.geometries import get_geometry
from kvwire.bench.wire_size import make_header, synthetic_kv, synthetic_prompt
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.models import DTYPES
from kvwire.kvcodec.pipeline import fp16_kv_bytes
from kvwire.kvcodec.profiles import profile_names
from kvwire.kvcodec.selectors import full_selection
from kvwire.kvcodec.stream import StreamDecoder, StreamEncoder

MB = 1e6  # figures are per 10^6 bytes of FP16 KV
# A clone of a few MB takes about a scheduler time slice: timing several in a row per sample keeps
# one preemption from doubling the floor every ratio divides by.
CLONES_PER_SAMPLE = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def measure(
    geometry: str = "qwen2.5-7b",
    layers: int = 4,
    tokens: int = 1024,
    repeats: int = 5,
    dtype: str = "fp32",
    device: str = "cpu",
    profiles: list[str] | None = None,
    entropies: tuple[str, ...] = ("none",),
    threads: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """One row per profile (x entropy stage): median encode/decode/clone seconds over `repeats`.

    KV: random normal, `layers` layers of `geometry`'s heads and head_dim, `tokens` streamed
    positions, in `dtype` on `device` (the model dtype the edge encodes from and the cloud decodes
    into). Every profile's repeats interleave clone, encode and decode, so drift hits all three.
    threads: torch intra-op threads for the run (None: leave torch's default).
    """
    if layers < 1 or repeats < 1:
        raise ConfigError(f"layers and repeats must be >= 1, got {layers} and {repeats}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    base = get_geometry(geometry)
    geo = replace(base, name=f"{base.name}[:{layers}]", num_layers=layers)
    dev = torch.device(device)
    prompt = synthetic_prompt(geo, tokens + 1, seed)  # its last token is never streamed
    keys, values = synthetic_kv(geo, tokens, seed, DTYPES[dtype], dev)
    sel = full_selection(prompt)
    fp16_mb = fp16_kv_bytes(geo.as_header(), tokens) / MB
    rows = []
    for profile in profiles or profile_names():
        for entropy in entropies:
            header = make_header(
                prompt, sel.kept, geo.as_header(), profile, 1.0, "full", dtype=str(DTYPES[dtype]).removeprefix("torch.")
            )

            def clone():
                for _ in range(CLONES_PER_SAMPLE):
                    out = [k.clone() for k in keys] + [v.clone() for v in values]
                return out

            def encode():
                enc = StreamEncoder(header, compress=entropy == "zstd")
                return [enc.header_frame(), *enc.chunk_frames(keys, values, sel.order), enc.trailer_frame()]

            def decode():
                dec = StreamDecoder(dtype=DTYPES[dtype], device=dev)
                for f in frames:
                    dec.feed(f)
                return dec.result()

            frames = encode()  # warm-up, and the frames every decode repeat reads
            decode()
            times = {"clone": [], "encode": [], "decode": []}
            for _ in range(repeats):
                times["clone"].append(_timed(clone, dev)[0] / CLONES_PER_SAMPLE)
                times["encode"].append(_timed(encode, dev)[0])
                times["decode"].append(_timed(decode, dev)[0])
            med = {k: statistics.median(v) for k, v in times.items()}
            wire = sum(len(f) for f in frames)
            rows.append(
                {
                    "profile": profile,
                    "entropy": entropy,
                    "geometry": geo.name,
                    "layers": layers,
                    "tokens": tokens,
                    "dtype": dtype,
                    "device": str(dev),
                    "threads": torch.get_num_threads(),
                    "repeats": repeats,
                    "fp16_mb": round(fp16_mb, 4),
                    "bytes": wire,
                    "ratio": round(wire / (fp16_mb * MB), 6),
                    "clone_ms_per_mb": round(med["clone"] * 1e3 / fp16_mb, 4),
                    "encode_ms_per_mb": round(med["encode"] * 1e3 / fp16_mb, 4),
                    "decode_ms_per_mb": round(med["decode"] * 1e3 / fp16_mb, 4),
                    "encode_vs_clone": round(med["encode"] / med["clone"], 2),
                    "decode_vs_clone": round(med["decode"] / med["clone"], 2),
                    "encode_mb_per_s": round(fp16_mb / med["encode"], 1),
                    "decode_mb_per_s": round(fp16_mb / med["decode"], 1),
                }
            )
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (
        f"{'profile':<11} {'entropy':<7} {'ratio':>7} {'clone ms/MB':>11} {'encode ms/MB':>12} {'decode ms/MB':>12} "
        f"{'enc/clone':>9} {'dec/clone':>9} {'enc MB/s':>9} {'dec MB/s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['profile']:<11} {r['entropy']:<7} {r['ratio']:>7.4f} {r['clone_ms_per_mb']:>11.3f} "
            f"{r['encode_ms_per_mb']:>12.3f} {r['decode_ms_per_mb']:>12.3f} {r['encode_vs_clone']:>9.1f} "
            f"{r['decode_vs_clone']:>9.1f} {r['encode_mb_per_s']:>9.1f} {r['decode_mb_per_s']:>9.1f}"
        )
    return "\n".join(lines)
