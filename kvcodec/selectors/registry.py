"""The selector registry: name -> Selector class."""

from __future__ import annotations

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.selectors.base import Selector
from kvwire.kvcodec.selectors.h2o import H2OSelector
from kvwire.kvcodec.selectors.q2c import Q2CSelector
from kvwire.kvcodec.selectors.random import RandomSelector
from kvwire.kvcodec.selectors.snapkv import SnapKVSelector

_SELECTORS: dict[str, type[Selector]] = {}


def register_selector(cls: type[Selector]) -> type[Selector]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _SELECTORS:
        raise ValueError(f"selector {cls.name!r} is already registered")
    _SELECTORS[cls.name] = cls
    return cls


for _cls in (Q2CSelector, SnapKVSelector, H2OSelector, RandomSelector):
    register_selector(_cls)


def selector_names() -> list[str]:
    return list(_SELECTORS)


def get_selector(name: str) -> Selector:
    """A new selector instance by name; ConfigError listing the known names otherwise."""
    try:
        return _SELECTORS[name]()
    except KeyError:
        raise ConfigError(f"unknown selector {name!r}; known: {', '.join(_SELECTORS)}") from None
