"""The KV geometries the synthetic benchmarks model (`kvwire bench wire-size/codec --geometry`).

A module of its own, free of torch, so `kvwire bench --help` can list the choices cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvwire.kvcodec.errors import ConfigError


@dataclass(frozen=True)
class Geometry:
    """The KV-relevant shape of a model (what kvcodec.fingerprint.kv_geometry reports) + vocab size."""

    name: str
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab: int  # prompt ids are drawn below this, so header varints have realistic widths
    rope_theta: float

    def as_header(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rope": {"rope_theta": self.rope_theta, "rope_type": "default"},
        }


GEOMETRIES: dict[str, Geometry] = {
    g.name: g
    for g in (
        Geometry("smollm2-135m", 30, 3, 64, 49152, 100000.0),
        Geometry("qwen2.5-3b", 36, 2, 128, 151936, 1000000.0),
        Geometry("qwen2.5-7b", 28, 4, 128, 152064, 1000000.0),
    )
}


def get_geometry(name: str) -> Geometry:
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise ConfigError(f"unknown geometry {name!r}; known: {', '.join(GEOMETRIES)}") from None
