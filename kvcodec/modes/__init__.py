"""Modes: how a context's understanding gets from the edge to the cloud (kv, scout, text), one file each."""

from kvwire.kvcodec.modes.base import Mode
from kvwire.kvcodec.modes.registry import get_mode, mode_names, register_mode, streamed_mode_names

__all__ = ["Mode", "get_mode", "mode_names", "register_mode", "streamed_mode_names"]
