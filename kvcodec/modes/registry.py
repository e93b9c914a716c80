"""The mode registry: name -> Mode instance. The API's allowed values and the stream's header check read it."""

from __future__ import annotations

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.modes.base import Mode
from kvwire.kvcodec.modes.kv import KVMode
from kvwire.kvcodec.modes.scout import ScoutMode
from kvwire.kvcodec.modes.text import TextMode

_MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    """Add a mode; ValueError for a nameless one or a name already taken."""
    if not mode.name:
        raise ValueError(f"{type(mode).__name__} has no name")
    if mode.name in _MODES:
        raise ValueError(f"mode {mode.name!r} is already registered")
    _MODES[mode.name] = mode
    return mode


for _mode in (KVMode(), ScoutMode(), TextMode()):
    register_mode(_mode)


def mode_names() -> list[str]:
    return list(_MODES)


def streamed_mode_names() -> list[str]:
    """The modes the edge streams (the others need no edge)."""
    return [name for name, mode in _MODES.items() if mode.streamed]


def get_mode(name: str) -> Mode:
    """The mode called `name`; ConfigError listing the known names otherwise."""
    try:
        return _MODES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown mode {name!r}; known: {', '.join(_MODES)}") from None
