"""Engines by name: the cloud-agent's --engine chooses one."""

from __future__ import annotations

from kvwire.cloud_agent.engines.base import Engine
from kvwire.cloud_agent.engines.hf import HfEngine
from kvwire.cloud_agent.engines.vllm import VllmEngine

ENGINES: dict[str, type[Engine]] = {}
DEFAULT_ENGINE = "hf"


def register_engine(cls: type[Engine]) -> type[Engine]:
    if cls.name in ENGINES:
        raise ValueError(f"engine {cls.name!r} is registered twice")
    ENGINES[cls.name] = cls
    return cls


for _cls in (HfEngine, VllmEngine):
    register_engine(_cls)


def get_engine(name: str) -> type[Engine]:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}") from None
