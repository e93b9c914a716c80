"""Compile the Triton kernels for a CUDA GPU on a machine without one, and report their registers.

triton's wheel carries ptxas and cuobjdump, so every launch configuration the launchers pick can
be compiled to a cubin here: that catches GPU-only compile errors (the interpreter accepts more)
and register spills. Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
`python -m kvwire.kernels.compile_check [--arch 90] [--quick] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_kernels as tk
from .layout import SUPPORTED_BITS

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Shapes the configurations are picked for: a Qwen2.5-7B layer's rows, and a long channel-axis row.
_ROWS, _HEAD_DIM, _LONG_ROW = 4096, 128, 4096


def _quantize(dtype, bits, group, head_dim, index, asym=False, rotate=0):
    block_k, block_c = tk.row_blocks(_ROWS, head_dim, interpret=False)
    sig = {
        "x_ptr": _PTR[dtype],
        "idx_ptr": "*i64",
        "p_ptr": "*u8",
        "s_ptr": "*fp16",
        **dict.fromkeys(("K", "D", "G", "RB", "sxh", "sxs", "sxd"), "i32"),
    }
    consts = dict(
        HAS_INDEX=index,
        BITS=bits,
        GS=0 if group == head_dim else group,
        ROW_GROUP=group == head_dim,
        ONE_CHUNK=head_dim <= block_c,
        ASYM=asym,
        **tk._rotation_consts(rotate),
        BLOCK_K=block_k,
        BLOCK_C=block_c,
    )
    return tk._quantize_pack_kernel, sig, consts, {}


def _unpack(dtype, bits, group, head_dim, asym=False, rotate=0):
    block_k, block_c = tk.row_blocks(_ROWS, head_dim, interpret=False)
    sig = {
        "p_ptr": "*u8",
        "s_ptr": "*fp16",
        "o_ptr": _PTR[dtype],
        **dict.fromkeys(("K", "D", "G", "RB", "soh", "sok", "sod"), "i32"),
    }
    consts = dict(
        BITS=bits,
        GS=0 if group == head_dim else group,
        ROW_GROUP=group == head_dim,
        OUT_BF16=dtype == torch.bfloat16,
        ASYM=asym,
        **tk._rotation_consts(rotate),
        BLOCK_K=block_k,
        BLOCK_C=block_c,
    )
    return tk._unpack_dequantize_kernel, sig, consts, {}


def _q2c(kernel, dtype, head_dim):
    cfg = tk.q2c_config(dtype, dtype, head_dim, 224, _ROWS, interpret=False)
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    sig = {"q_ptr": _PTR[dtype], "k_ptr": _PTR[dtype], "pos_ptr": "*i32", "m_ptr": "*fp32", "l_ptr": "*fp32"}
    if kernel == "colsum":
        sig["out_ptr"] = "*fp32"
    sig.update(dict.fromkeys(("Lq", "S", "D", "R", "G"), "i32"))
    if kernel == "colsum":
        sig.update(ctx_start="i32", ctx_end="i32")
    sig.update(scale="fp32", **dict.fromkeys(("sqh", "sql", "sqd", "skh", "sks", "skd"), "i32"))
    fn = tk._q2c_colsum_kernel if kernel == "colsum" else tk._q2c_stats_kernel
    return fn, sig, cfg, options


def variants(quick: bool) -> dict[str, tuple]:
    """label -> (kernel, signature, constexprs, options), the launchers' own configurations."""
    out = {}
    dtypes = (torch.bfloat16,) if quick else (torch.float32, torch.float16, torch.bfloat16)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for bits in SUPPORTED_BITS:
            if quick and bits == 8:  # one byte per code, the simplest packing: left out of the quick subset
                continue
            for group in (_HEAD_DIM, 32):
                out[f"quantize {name} int{bits} g{group}"] = _quantize(dtype, bits, group, _HEAD_DIM, index=True)
                out[f"unpack {name} int{bits} g{group}"] = _unpack(dtype, bits, group, _HEAD_DIM)
            out[f"quantize {name} int{bits} long row"] = _quantize(dtype, bits, _LONG_ROW, _LONG_ROW, index=False)
            # asymmetric codes, and both kinds rotated (a whole 128-channel Hadamard block, and the
            # 32-channel blocks of a head_dim of 96)
            if quick and bits not in (4, 2):  # the quick subset: the common width and the new one
                continue
            for asym in (True, False):
                kind = "asym" if asym else "int"
                if asym:
                    for group in (_HEAD_DIM, 32):
                        out[f"quantize {name} {kind}{bits} g{group}"] = _quantize(
                            dtype, bits, group, _HEAD_DIM, index=True, asym=True
                        )
                        out[f"unpack {name} {kind}{bits} g{group}"] = _unpack(dtype, bits, group, _HEAD_DIM, asym=True)
                    out[f"quantize {name} {kind}{bits} long row"] = _quantize(
                        dtype, bits, _LONG_ROW, _LONG_ROW, index=False, asym=True
                    )
                for head_dim in (_HEAD_DIM, 96):
                    rot = head_dim & -head_dim
                    out[f"quantize {name} {kind}{bits} rot{rot} d{head_dim}"] = _quantize(
                        dtype, bits, head_dim, head_dim, index=True, asym=asym, rotate=rot
                    )
                    out[f"unpack {name} {kind}{bits} rot{rot} d{head_dim}"] = _unpack(
                        dtype, bits, head_dim, head_dim, asym=asym, rotate=rot
                    )
    for dtype in (torch.bfloat16, torch.float32) if quick else (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in (128,) if quick else (64, 128, 256):
            for kernel in ("stats", "colsum"):
                out[f"q2c {kernel} {str(dtype).removeprefix('torch.')} d{head_dim}"] = _q2c(kernel, dtype, head_dim)
    return out


def _resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    # e.g. "REG:48 STACK:0 SHARED:1024 LOCAL:0 ..." on the line after the function name
    line = next(line for line in text.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}


def check(arch: int = 90, quick: bool = False) -> list[dict]:
    """Compile every variant for sm_<arch>; one row per variant with its registers and spill stack."""
    if tk.interpreted():
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for label, (fn, sig, consts, options) in variants(quick).items():
        sig = {**sig, **dict.fromkeys(consts, "constexpr")}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=target, options=options or None)
        rows.append({"variant": label, **_resource_usage(kernel.asm["cubin"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--quick", action="store_true", help="a representative subset")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = check(args.arch, args.quick)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['variant']:<34} {r['registers']:4d} registers  {r['stack_bytes']:5d} B spill stack")


if __name__ == "__main__":
    main()
