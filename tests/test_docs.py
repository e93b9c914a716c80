"""The README's lists of plugin names are the registries' lists: adding a plugin without its line fails here."""

from __future__ import annotations

import re
from pathlib import Path

from kvwire.kvcodec.modes import mode_names
from kvwire.kvcodec.profiles import profile_names
from kvwire.kvcodec.selectors import selector_names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _names_on(line_start: str) -> set[str]:
    """The `code` names of the README bullet that starts with `line_start` (the bullet may wrap)."""
    match = re.search(rf"^- {re.escape(line_start)}(.*?)(?=^\S|^- |\Z)", README, re.M | re.S)
    assert match, f"README has no bullet '- {line_start}'"
    return set(re.findall(r"`([a-z0-9][a-z0-9._-]*)`", match.group(1)))


def test_readme_lists_every_selector():
    assert _names_on("selectors:") == set(selector_names())


def test_readme_lists_every_named_profile():
    assert _names_on("precision profiles:") - {"kvcodec/profiles.py"} == set(profile_names())


def test_readme_lists_every_mode():
    assert _names_on("modes:") == set(mode_names())
