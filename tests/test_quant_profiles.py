"""Quantizers: exact rounding and packing order; profiles: names, files, bad input.

Every encoding's round trip, sizes and stream path are in test_encodings.py (a matrix built from the registry).
"""

import json
import re

import pytest
import torch

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.pipeline import Edge, EdgeRequest
from kvwire.kvcodec.profiles import NAMED_PROFILES, PrecisionProfile, get_profile, profile_names
from kvwire.kvcodec.quant import Quantizer


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
    # the documented names (README, docs/codec.md, the CLI's --profile); more may be added
    assert {"fp32", "fp16", "bf16", "int8", "int4", "mixed-int4"} <= set(profile_names())
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
        ({"default": {"k": {"kind": "int5"}, "v": {"kind": "int4"}}}, "unknown tensor encoding 'int5'"),
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
    known = ", ".join(profile_names())
    assert known.startswith("fp32, fp16, bf16, int8, int4, mixed-int4")
    with pytest.raises(
        ConfigError, match=re.escape(f"unknown profile 'int5'; known: {known} or a path to a .json file")
    ):
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


@pytest.mark.parametrize("name", profile_names())
def test_every_named_profile_resolves_and_crosses_the_wire(name):
    """get_profile(name) is the profile of that name; it resolves for a real geometry (SmolLM2: 30
    layers, head_dim 64) and survives the header's JSON unchanged."""
    prof = get_profile(name)
    assert prof is NAMED_PROFILES[name] and prof.name == name
    assert len(prof.resolve(30, 64)) == 30
    assert PrecisionProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
