"""`kvwire bench wire-size` and `kvwire bench codec` through the real CLI: JSON schema and byte
invariants (never timings, which belong to the benchmarks' printed figures)."""

import contextlib
import io
import json
import math

import pytest

from kvwire.bench.main import main
from kvwire.kvcodec.profiles import profile_names

ROW_KEYS = {"profile", "retention", "entropy", "bytes", "fp16_bytes", "ratio"}
RETENTIONS = [1.0, 0.75, 0.5, 0.25]


def run_json(capsys, *argv) -> tuple[list[dict], str]:
    """(rows, stderr) of one bench run with --json."""
    assert main(["bench", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)  # stdout holds the JSON alone; notes go to stderr
    assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
    return rows, captured.err


@pytest.fixture(scope="module")
def smollm2_rows():
    """Synthetic rows for the SmolLM2-135M geometry (30 layers, 3 KV heads, head_dim 64), 160 tokens.
    Module-scoped, so stdout is captured by hand (capsys is per test)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert (
            main(
                [
                    "bench",
                    "wire-size",
                    "--geometry",
                    "smollm2-135m",
                    "--tokens",
                    "160",
                    "--entropy-tokens",
                    "0",
                    "--json",
                ]
            )
            == 0
        )
    return json.loads(out.getvalue())


def by(rows, profile, retention, entropy="none", source="synthetic"):
    hit = [
        r
        for r in rows
        if (r["profile"], r["retention"], r["entropy"], r["kv_source"]) == (profile, retention, entropy, source)
    ]
    assert len(hit) == 1, (profile, retention, entropy, source)
    return hit[0]


def test_wire_size_schema_and_coverage(smollm2_rows):
    for r in smollm2_rows:
        assert ROW_KEYS <= set(r)
        assert r["entropy"] == "none" and r["kv_source"] == "synthetic"
        assert r["ratio"] == pytest.approx(r["bytes"] / r["fp16_bytes"], abs=1e-6)
    got = {(r["profile"], r["retention"]) for r in smollm2_rows}
    assert got == {(p, ret) for p in profile_names() for ret in RETENTIONS}


def test_wire_size_byte_invariants(smollm2_rows):
    fp16_full_prompt = 160 * 30 * 2 * 3 * 64 * 2  # tokens x layers x (K, V) x heads x head_dim x 2 bytes
    context = 160 - 40 - 30
    for r in smollm2_rows:
        assert r["fp16_bytes"] == fp16_full_prompt
        # 40 template + 29 question positions (the last prompt token is never streamed) + the kept context
        assert r["kept_positions"] == 69 + math.ceil(r["retention"] * context)
    # fp16 at retention 1.0 streams 159 of 160 positions plus framing: within 1% of the FP16 KV
    assert 0.99 < by(smollm2_rows, "fp16", 1.0)["ratio"] < 1.01
    assert by(smollm2_rows, "bf16", 1.0)["bytes"] == by(smollm2_rows, "fp16", 1.0)["bytes"]
    assert 1.98 < by(smollm2_rows, "fp32", 1.0)["ratio"] < 2.02  # fp32 passthrough: twice the FP16 bytes
    for profile in ("fp16", "int8", "int4", "mixed-int4"):
        ratios = [by(smollm2_rows, profile, ret)["ratio"] for ret in RETENTIONS]
        assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios), (profile, ratios)
    for ret in RETENTIONS:
        fp16, int8 = by(smollm2_rows, "fp16", ret)["bytes"], by(smollm2_rows, "int8", ret)["bytes"]
        int4, mixed = by(smollm2_rows, "int4", ret)["bytes"], by(smollm2_rows, "mixed-int4", ret)["bytes"]
        assert int4 < mixed < int8 < fp16
        # int8 per position and head: head_dim codes + one fp16 scale, against 2 x head_dim bytes
        assert int8 / fp16 == pytest.approx((64 + 2) / 128, rel=0.02)


def test_wire_size_qwen7b_full_retention_targets(capsys):
    """The issue's retention-1.0 targets hold at any prompt length (framing is a fixed share); the
    retention-0.5 target is for 4096 tokens, where the 69 fixed positions weigh less, so the bench
    itself reports it."""
    rows, err = run_json(
        capsys,
        "wire-size",
        "--geometry",
        "qwen2.5-7b",
        "--tokens",
        "128",
        "--entropy-tokens",
        "0",
        "--profile",
        "int8",
        "--profile",
        "mixed-int4",
    )
    assert {r["profile"] for r in rows} == {"int8", "mixed-int4"}
    assert by(rows, "int8", 1.0)["ratio"] <= 0.51
    assert by(rows, "mixed-int4", 1.0)["ratio"] <= 0.29
    assert "target int8 at retention 1.00: ratio" in err and "target mixed-int4 at retention 0.50: ratio" in err


def test_wire_size_zstd_rows_use_real_kv(capsys):
    rows, err = run_json(
        capsys,
        "wire-size",
        "--geometry",
        "smollm2-135m",
        "--tokens",
        "96",
        "--entropy-tokens",
        "32",
        "--profile",
        "int8",
    )
    real = [r for r in rows if r["kv_source"] == "real"]
    assert {(r["retention"], r["entropy"]) for r in real} == {(ret, e) for ret in RETENTIONS for e in ("none", "zstd")}
    for ret in RETENTIONS:
        plain, packed = by(rows, "int8", ret, "none", "real"), by(rows, "int8", ret, "zstd", "real")
        assert packed["fp16_bytes"] == plain["fp16_bytes"] and packed["kept_positions"] == plain["kept_positions"]
        assert packed["bytes"] <= plain["bytes"]  # a frame is compressed only when that makes it smaller
    assert "zstd stage on real KV" in err


def test_codec_bench_schema(capsys):
    rows, _ = run_json(capsys, "codec", "--layers", "2", "--tokens", "96", "--repeats", "1")
    assert [r["profile"] for r in rows] == profile_names()
    fp16_mb = 96 * 2 * 2 * 4 * 128 * 2 / 1e6  # positions x layers x (K, V) x heads x head_dim x 2 bytes
    for r in rows:
        assert r["fp16_mb"] == pytest.approx(fp16_mb, rel=1e-4)
        assert r["ratio"] == pytest.approx(r["bytes"] / (fp16_mb * 1e6), abs=1e-6)
        for key in ("clone_ms_per_mb", "encode_ms_per_mb", "decode_ms_per_mb", "encode_vs_clone", "decode_vs_clone"):
            assert r[key] > 0
    size = {r["profile"]: r["bytes"] for r in rows}
    assert size["int8"] < size["fp16"] < size["fp32"]


def test_bad_arguments_are_clear_errors(capsys):
    assert main(["bench", "wire-size", "--tokens", "10", "--entropy-tokens", "0"]) == 2
    assert "--tokens must be at least 71" in capsys.readouterr().err
    assert main(["bench", "wire-size", "--tokens", "128", "--entropy-tokens", "0", "--profile", "int5"]) == 2
    assert "unknown profile 'int5'" in capsys.readouterr().err


def test_encodings_bench_is_exact_for_a_passthrough_and_sees_int2_damage(capsys, tiny_model_dir):
    """`kvwire bench encodings` measures through the real stream: the fp32 passthrough of an fp32
    model's KV is exact (no error, no KL, every top-1 token the same), 2-bit codes are not."""
    rows, err = run_json(
        capsys,
        "encodings",
        "--model",
        tiny_model_dir,
        "--examples",
        "2",
        "--answer-tokens",
        "3",
        "--profile",
        "fp32",
        "--profile",
        "int2",
    )
    fp32, int2 = rows
    assert (fp32["profile"], int2["profile"]) == ("fp32", "int2") and fp32["examples"] == 2
    assert fp32["k_rel_mse"] == fp32["v_rel_mse"] == fp32["kl"] == 0.0 and fp32["top1"] == 1.0
    assert int2["k_rel_mse"] > 0.01 and int2["v_rel_mse"] > 0.01 and int2["kl"] > 0.0
    assert 1.9 < fp32["ratio"] < 2.1 and int2["ratio"] < 0.25 * fp32["ratio"]
    assert "2 SQuAD sample questions" in err
