"""Quantizers: bounded error, deterministic bytes, exact sizes; profiles: names, files, bad input."""

import json

import pytest
import torch

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.pipeline import Edge, EdgeRequest
from kvwire.kvcodec.profiles import NAMED_PROFILES, PrecisionProfile, get_profile, profile_names
from kvwire.kvcodec.quant import Quantizer

# one row per encoding: every quantizer gets every test below
QUANTIZERS = [
    Quantizer("fp32"),
    Quantizer("fp16"),
    Quantizer("bf16"),
    Quantizer("int8"),
    Quantizer("int4"),
    Quantizer("int3"),
    Quantizer("int8", group=32),
    Quantizer("int4", group=16),
    Quantizer("int8", axis="channel"),
    Quantizer("int4", axis="channel"),
    Quantizer("int3", axis="channel"),
]


def kv(heads=3, n=37, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(heads, n, dim, generator=g) * 2
    if n > 3:
        x[:, 3] = 0.0  # an all-zero row
    return x


def step(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """Half the quantization step per element, from the stored fp16 scales."""
    qmax = 2 ** (q.nbits - 1) - 1
    if q.axis == "channel":
        s = (x.abs().amax(dim=1, keepdim=True) / qmax).half().float()
    else:
        g = q.group or x.shape[-1]
        s = (x.reshape(*x.shape[:2], -1, g).abs().amax(-1, keepdim=True) / qmax).half().float()
        s = s.expand(*x.shape[:2], x.shape[-1] // g, g).reshape(x.shape)
    return s / 2


@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: f"{q.kind}-{q.axis}-{q.group}")
@pytest.mark.parametrize("n", [1, 37])
def test_roundtrip_error_and_sizes(q, n):
    x = kv(n=n)
    scales, payload = q.encode(x)
    assert (len(scales), len(payload)) == q.sizes(3, n, 64)
    out = torch.empty_like(x)
    q.decode(scales, payload, out)
    if q.is_float:
        tol = {"fp32": 0.0, "fp16": 1e-3, "bf16": 1e-2}[q.kind]
        assert (out - x).abs().max() <= tol * x.abs().max()
    else:
        err = (out - x).abs()
        assert bool((err <= step(q, x) * (1 + 1e-3) + 1e-6).all()), float((err - step(q, x)).max())
        if n > 3:
            assert bool((out[:, 3] == 0).all())  # zero rows stay exactly zero
    again = q.encode(x.clone())
    assert again == (scales, payload)  # deterministic bytes


def test_round_half_to_even():
    q = Quantizer("int8")
    x = torch.zeros(1, 1, 8)
    x[0, 0] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5, 0])  # scale 1: ties go to even
    scales, payload = q.encode(x)
    vals = torch.frombuffer(bytearray(payload), dtype=torch.int8).tolist()
    assert vals == [127, 0, 2, 2, 0, -2, 4, 0]


def test_int4_nibble_order():
    x = torch.tensor([[[7.0, -8.0 * 7 / 8, 1.0, 2.0]]])  # scale = 1
    _, payload = Quantizer("int4").encode(x)
    assert payload[0] == (0x7 | (0x9 << 4))  # element 0 low nibble, element 1 high nibble (-7 = 0x9)


def test_named_profiles_and_mixed_layer0():
    assert profile_names() == ["fp32", "fp16", "bf16", "int8", "int4", "mixed-int4"]
    specs = get_profile("mixed-int4").resolve(30, 64)
    assert specs[0] == (Quantizer("fp16"), Quantizer("fp16"))
    assert all(k.kind == v.kind == "int4" for k, v in specs[1:])


def test_profile_json_file_roundtrip(tmp_path):
    prof = PrecisionProfile(
        "mine",
        (Quantizer("int4", axis="channel"), Quantizer("int4", group=32)),
        {2: (Quantizer("int8"), Quantizer("fp16"))},
    )
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(prof.to_dict()))
    assert get_profile(str(path)) == prof


@pytest.mark.parametrize(
    "data, message",
    [
        ({"default": {"k": {"kind": "int2"}, "v": {"kind": "int4"}}}, "unknown tensor encoding 'int2'"),
        ({"default": {"k": {"kind": "int4", "axis": "diagonal"}}}, "unknown quantization axis"),
        ({"default": {"k": {"kind": "fp16", "group": 8}}}, "passthrough"),
        ({"layers": {}}, 'at least a "default"'),
        ({"default": {"k": {"kind": "int4"}}, "layers": {"x": {"k": {"kind": "int8"}}}}, "not an integer"),
        ({"default": {"k": {"kind": "int4", "group": True}}}, "group must be a whole number"),
        ({"default": {"k": {"kind": "int4", "group": "16"}}}, "group must be a whole number"),
        ({"default": {"k": {"kind": "int4", "group": 16.0}}}, "group must be a whole number"),
    ],
)
def test_bad_profile_files_name_the_problem(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        get_profile(str(path))


def test_unknown_profile_lists_names():
    with pytest.raises(ConfigError, match="unknown profile 'int5'; known: fp32, fp16, bf16, int8, int4, mixed-int4"):
        get_profile("int5")


def test_profile_naming_missing_layers_is_refused(tiny_loaded, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(json.dumps({"default": {"k": {"kind": "int4"}}, "layers": {"12": {"k": {"kind": "fp16"}}}}))
    with pytest.raises(ConfigError, match=r"names layer\(s\) \[12\], but the model has 4 layers"):
        Edge(tiny_loaded).validate(EdgeRequest("ctx", "q", profile=str(path)))


@pytest.mark.parametrize("retention", [0, -0.1, 1.5, float("nan")])
def test_retention_outside_range_is_refused(tiny_loaded, retention):
    with pytest.raises(ConfigError, match=r"retention must be in \(0, 1\]"):
        Edge(tiny_loaded).validate(EdgeRequest("ctx", "q", retention=retention))


def test_group_must_divide_head_dim():
    with pytest.raises(ConfigError, match="group 48 does not divide head_dim 64"):
        PrecisionProfile("g", (Quantizer("int4", group=48),) * 2).resolve(2, 64)


def test_named_profile_list_is_the_registry():
    assert set(NAMED_PROFILES) == set(profile_names())
