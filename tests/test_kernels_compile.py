"""The Triton kernels compile for a CUDA GPU (sm_90) with no register spills, checked without one.

The interpreter accepts code the GPU compiler rejects, and spills only show up in the cubin, so
this compiles the launchers' own configurations with the ptxas that ships in triton's wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "kvwire.kernels.compile_check", "--quick", "--json"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    assert {r["variant"].split()[0] for r in rows} == {"quantize", "unpack", "q2c"}
    spilled = [r for r in rows if r["stack_bytes"]]
    assert not spilled, f"register spills: {spilled}"
