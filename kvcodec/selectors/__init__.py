"""Selectors: which context positions to keep."""

from kvwire.kvcodec.selectors.base import (
    Selection,
    Selector,
    check_retention,
    check_retention_and_name,
    context_budget,
    full_selection,
)
from kvwire.kvcodec.selectors.registry import get_selector, register_selector, selector_names

__all__ = [
    "Selection",
    "Selector",
    "check_retention",
    "check_retention_and_name",
    "context_budget",
    "full_selection",
    "get_selector",
    "register_selector",
    "selector_names",
]
