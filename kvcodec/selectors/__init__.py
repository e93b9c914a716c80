"""Selectors: which context positions to keep."""
from kvcodec.selectors.base import Selection, Selector, check_retention, check_retention_and_name, context_budget, full_selection
from kvcodec.selectors.registry import get_selector, register_selector, selector_names

__all__ = ["Selection", "Selector", "check_retention", "check_retention_and_name", "context_budget", "full_selection", "get_selector", "register_selector", "selector_names"]
