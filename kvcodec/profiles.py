"""Precision profiles: which Quantizer each layer's K and V get; named profiles and JSON files.

JSON format (every key but "default" optional; layer overrides are by absolute layer index):
  {"name": "qwen2.5-7b-diagnosed",
   "default": {"k": {"kind": "int4"}, "v": {"kind": "int4"}},
   "layers": {"0": {"k": {"kind": "fp16"}, "v": {"kind": "fp16"}}}}
A tensor spec is {"kind": a registered encoding (kvcodec/encodings/: fp32|fp16|bf16 passthrough,
int8|int4|int3|int2 symmetric, asym4|asym3|asym2 asymmetric, a `_rot` suffix for the
Hadamard-rotated forms), "axis": token|channel, "group": N}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvwire.kvcodec.encodings import encodings
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.quant import Quantizer

LayerSpec = tuple[Quantizer, Quantizer]  # (K, V)


@dataclass(frozen=True)
class PrecisionProfile:
    """A default (K, V) encoding plus per-layer overrides."""

    name: str
    default: LayerSpec
    layers: dict[int, LayerSpec] = field(default_factory=dict)

    def __post_init__(self):
        for idx in self.layers:
            if not isinstance(idx, int) or idx < 0:
                raise ConfigError(f"profile {self.name!r}: layer index {idx!r} is not a non-negative integer")

    def resolve(self, num_layers: int, head_dim: int | None = None) -> list[LayerSpec]:
        """The (K, V) quantizers of every layer; ConfigError if an override names a missing layer."""
        bad = sorted(i for i in self.layers if i >= num_layers)
        if bad:
            raise ConfigError(
                f"profile {self.name!r} names layer(s) {bad}, but the model has {num_layers} layers (0..{num_layers - 1})"
            )
        specs = [self.layers.get(i, self.default) for i in range(num_layers)]
        if head_dim is not None:
            for k, v in specs:
                k.check_head_dim(head_dim)
                v.check_head_dim(head_dim)
        return specs

    def to_dict(self) -> dict:
        def spec(q: Quantizer) -> dict:
            return {"kind": q.kind, "axis": q.axis, "group": q.group}

        return {
            "name": self.name,
            "default": {"k": spec(self.default[0]), "v": spec(self.default[1])},
            "layers": {str(i): {"k": spec(k), "v": spec(v)} for i, (k, v) in sorted(self.layers.items())},
        }

    @classmethod
    def from_dict(cls, data: dict, name: str | None = None) -> PrecisionProfile:
        if not isinstance(data, dict) or "default" not in data:
            raise ConfigError('a profile is a JSON object with at least a "default" entry')

        def layer(entry, where: str) -> LayerSpec:
            if not isinstance(entry, dict) or set(entry) - {"k", "v"} or not entry:
                raise ConfigError(f'{where}: expected {{"k": spec, "v": spec}}, got {entry!r}')
            fallback = entry.get("k") or entry.get("v")
            return (_spec(entry.get("k", fallback), where + ".k"), _spec(entry.get("v", fallback), where + ".v"))

        layers = {}
        for key, entry in (data.get("layers") or {}).items():
            try:
                idx = int(key)
            except ValueError:
                raise ConfigError(f"profile layer key {key!r} is not an integer") from None
            layers[idx] = layer(entry, f"layers[{key}]")
        return cls(name=name or data.get("name") or "custom", default=layer(data["default"], "default"), layers=layers)


def _spec(entry, where: str) -> Quantizer:
    if not isinstance(entry, dict) or "kind" not in entry or set(entry) - {"kind", "axis", "group"}:
        raise ConfigError(f'{where}: expected {{"kind": ..., "axis": ..., "group": ...}}, got {entry!r}')
    group = entry.get("group", 0)
    if type(group) is not int:  # not bool, float or a numeric string
        raise ConfigError(f"{where}: group must be a whole number (0: one scale per row), got {group!r}")
    try:
        return Quantizer(entry["kind"], entry.get("axis", "token"), group)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _uniform(name: str, kind: str) -> PrecisionProfile:
    q = Quantizer(kind)
    return PrecisionProfile(name, (q, q))


def _kivi(bits: int) -> PrecisionProfile:
    # KIVI's split: keys per channel over groups of KIVI_GROUP positions of a chunk (their outlier
    # channels get their own range), values per token (whole head_dim rows), both asymmetric.
    return PrecisionProfile(
        f"kivi-{bits}", (Quantizer(f"asym{bits}", "channel", KIVI_GROUP), Quantizer(f"asym{bits}", "token"))
    )


# KIVI's group of 32 positions. Measured on SmolLM2 (docs/codec.md, "Encodings"): the encoder's
# chunks of a channel-axis profile hold ~32 positions there, so 32 is one group per chunk; groups
# of 16 cut the KL of kivi-2 from 0.53 to 0.38 for +14% bytes, kivi-4's from 0.019 to 0.015 for +10%.
KIVI_GROUP = 32

# Every registered encoding is also the uniform profile of its name (K and V of every layer, token
# axis, one scale per row). mixed-int4: the research found one sensitive layer (layer 0 on
# Qwen2.5-7B) whose INT4 error costs 23% F1; keeping it at FP16 costs +2.7% bytes and recovers full
# quality. `kvwire diagnose` finds the sensitive layer of other models and writes a profile file.
NAMED_PROFILES: dict[str, PrecisionProfile] = {
    p.name: p
    for p in (
        *(_uniform(name, name) for name in ("fp32", "fp16", "bf16", "int8", "int4")),  # the first names listed
        PrecisionProfile(
            "mixed-int4", (Quantizer("int4"), Quantizer("int4")), {0: (Quantizer("fp16"), Quantizer("fp16"))}
        ),
        *(_uniform(e.name, e.name) for e in encodings()),
        *(_kivi(bits) for bits in (4, 3, 2)),
    )
}


def profile_names() -> list[str]:
    return list(NAMED_PROFILES)


def get_profile(name_or_file: str | PrecisionProfile) -> PrecisionProfile:
    """A named profile, or one loaded from a JSON file path; ConfigError listing the names otherwise."""
    if isinstance(name_or_file, PrecisionProfile):
        return name_or_file
    if name_or_file in NAMED_PROFILES:
        return NAMED_PROFILES[name_or_file]
    path = Path(name_or_file)
    if name_or_file.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"profile file {name_or_file!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"profile file {name_or_file!r} is not valid JSON: {exc}") from None
        return PrecisionProfile.from_dict(data, name=data.get("name") or path.stem)
    raise ConfigError(f"unknown profile {name_or_file!r}; known: {', '.join(NAMED_PROFILES)} or a path to a .json file")
