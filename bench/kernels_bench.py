"""Kernel timings for one Qwen2.5-7B-shaped layer: quantize/pack, unpack/dequantize, q2c scores.

Each op is timed on the torch reference and (on CUDA) on the Triton kernels, and set against a
device-to-device copy (torch.clone) of the same K tensor, the floor any byte-moving kernel sits
on. q2c is also set against eager attention (a materialized softmax). Run:
`python -m kvwire.bench.kernels_bench --json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from kvwire.kernels import layout, reference

# Qwen2.5-7B-Instruct attention geometry; one layer's K (or V) for a 4096-token prompt.
KV_HEADS, HEAD_DIM, Q_HEADS, TOKENS = 4, 128, 28, 4096
QUESTION_ROWS = 32  # a short question at the end of the prompt
GROUP = 32  # a common sub-row group size; per-row scales are timed too (group = HEAD_DIM)


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], tuple[float, float]]:
    """(median, best) milliseconds of `reps` calls of fn after two warm-up calls."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn, reps):
        fn(), fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times)

    return measure


def quantize_cases(head_dim: int = HEAD_DIM) -> list[tuple[str, dict]]:
    """(label, keyword arguments of quantize_pack/unpack_dequantize) of every timed encoding kernel:
    symmetric int8/int4 with per-row and GROUP scales, and every width symmetric and asymmetric,
    unrotated and with the per-head Hadamard rotation (whose cost the rot_vs_plain figures give)."""
    rot = layout.rotation_block(head_dim)

    def case(bits, group=head_dim, asymmetric=False, rotate=0):
        return dict(bits=bits, group_size=group, asymmetric=asymmetric, rotate=rotate)

    cases = [(f"int{bits} g{group}", case(bits, group)) for bits in (8, 4) for group in (head_dim, GROUP)]
    for bits in (4, 3, 2):
        for asym in (False, True):
            kind = f"{'asym' if asym else 'int'}{bits}"
            if asym or bits != 4:  # int4 per row is above
                cases.append((f"{kind} g{head_dim}", case(bits, asymmetric=asym)))
            cases.append((f"{kind} rot{rot}", case(bits, asymmetric=asym, rotate=rot)))
    return cases


def run_case(impl, x: torch.Tensor, case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(payload, scales, decoded) of one quantize_cases case on a kernel module (reference or triton)."""
    payload, scales = impl.quantize_pack(x, None, **case)
    return payload, scales, impl.unpack_dequantize(payload, scales, out=torch.empty_like(x), **case)


def _eager_attention_scores(q, k, q_pos, ctx_start, ctx_end):
    """The materialized way: full [Hq, Lq, S] scores, softmax, column sums (what HF eager gives)."""
    group = q.shape[0] // k.shape[0]
    kk = k.float().repeat_interleave(group, dim=0)
    scores = torch.matmul(q.float(), kk.transpose(1, 2)) / HEAD_DIM**0.5
    keys = torch.arange(k.shape[1], device=k.device)
    scores.masked_fill_(keys > q_pos[:, None], float("-inf"))
    return scores.softmax(dim=-1)[..., ctx_start:ctx_end].sum(dim=(0, 1))


def run(json_out: bool) -> dict:
    """Time every kernel on this machine and return (and print) the figures.

    On CPU only the torch reference runs (it is the CPU runtime path); Triton figures need a GPU.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16  # the model's dtype
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(KV_HEADS, TOKENS, HEAD_DIM, generator=gen, device=device).to(dtype)
    q = torch.randn(Q_HEADS, QUESTION_ROWS, HEAD_DIM, generator=gen, device=device).to(dtype)
    q_pos = torch.arange(TOKENS - QUESTION_ROWS, TOKENS, device=device)
    ctx = (64, TOKENS - QUESTION_ROWS - 16)  # context span between a system prefix and the question
    measure = _timer(device)
    reps = 20 if cuda else 7
    x_bytes = x.numel() * x.element_size()

    backends = {"torch": reference}
    if cuda:
        from kvwire.kernels import triton_kernels

        backends["triton"] = triton_kernels

    clone_ms, clone_best = measure(lambda: torch.clone(x), reps)
    rows = []

    def record(op, backend, times, moved_bytes):
        ms, best = times
        rows.append(
            {
                "op": op,
                "backend": backend,
                "ms": round(ms, 4),
                "best_ms": round(best, 4),
                "gb_per_s": round(moved_bytes / best / 1e6, 2) if moved_bytes else None,
                "x_clone": round(best / clone_best, 2),
            }
        )

    for name, impl in backends.items():
        plain_ms: dict[tuple[str, str], float] = {}  # (op, codes) -> fastest unrotated per-row time
        for label, case in quantize_cases():
            payload, scales, out = run_case(impl, x, case)
            packed = payload.numel() + scales.numel() * 2
            codes = label.split(" ")[0]
            for op, fn in (
                ("quantize_pack", lambda: impl.quantize_pack(x, None, **case)),
                ("unpack_dequantize", lambda: impl.unpack_dequantize(payload, scales, out=out, **case)),
            ):
                times = measure(fn, reps)
                record(f"{op} {label}", name, times, x_bytes + packed)
                if case["rotate"]:  # the rotation's cost: this time / the same codes unrotated
                    rows[-1]["rot_vs_plain"] = round(times[1] / plain_ms[(op, codes)], 2)
                elif case["group_size"] == HEAD_DIM:
                    plain_ms[(op, codes)] = times[1]
        ms = measure(lambda: impl.q2c_scores(q, x, q_pos, *ctx), reps)
        record(f"q2c_scores {QUESTION_ROWS} rows", name, ms, 0)
    ms = measure(lambda: _eager_attention_scores(q, x, q_pos, *ctx), reps)
    record(f"q2c_scores {QUESTION_ROWS} rows", "eager attention", ms, 0)

    want = _eager_attention_scores(q, x, q_pos, *ctx)
    agreement = {
        name: float((impl.q2c_scores(q, x, q_pos, *ctx) - want).abs().max()) for name, impl in backends.items()
    }
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "geometry": {
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "q_heads": Q_HEADS,
            "tokens": TOKENS,
            "question_rows": QUESTION_ROWS,
        },
        "clone_ms": round(clone_ms, 4),
        "clone_best_ms": round(clone_best, 4),
        "clone_gb_per_s": round(2 * x_bytes / clone_best / 1e6, 2),
        "ops": rows,
        "q2c_max_abs_diff_vs_eager": agreement,
        "note": (
            "ms is the median, best_ms the fastest of the repetitions; gb_per_s (bytes read + written) and"
            " x_clone (time / torch.clone time of the same K tensor) use the fastest, which is steadier"
            " on a shared machine; rot_vs_plain: a rotated kernel's fastest time / the same codes unrotated"
            + (
                ""
                if cuda
                else "; no GPU here: only the torch reference path (the CPU runtime) is timed,"
                " Triton figures need a GPU"
            )
        ),
    }
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['device']} ({result['dtype']}): clone {clone_ms:.3f} ms (best {clone_best:.3f}), "
            f"{result['clone_gb_per_s']} GB/s"
        )
        for r in rows:
            bw = f"{r['gb_per_s']:8.2f} GB/s" if r["gb_per_s"] is not None else " " * 13
            rot = f"  {r['rot_vs_plain']:5.2f}x unrotated" if "rot_vs_plain" in r else ""
            print(
                f"  {r['op']:<32} {r['backend']:<16} {r['ms']:9.3f} ms (best {r['best_ms']:8.3f}) {bw}"
                f"  {r['x_clone']:7.2f}x clone{rot}"
            )
        print(f"  q2c max |diff| vs eager: {agreement}")
        print(f"  {result['note']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    run(parser.parse_args().json)


if __name__ == "__main__":
    main()
