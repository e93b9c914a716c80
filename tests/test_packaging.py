"""The built wheel: one top-level import name, `kvwire`, never a bare name another package owns
(`kernels`, `proto`, `bench`, ...); every module, data file and console script it should ship.

The wheel is really built (pip wheel, no build isolation, no network: ~2 s) from a copy of the
source tree, so a stale build/ folder in the checkout cannot leak old files into it. Every name is
read from the wheel's file list, never from pyproject.toml.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Bare import names that would collide with other distributions (kernels: HF's kernels; proto, bench:
# common names on PyPI) or that are not importable code at all.
COLLISIONS = {"kernels", "proto", "bench", "kvcodec", "agent_common", "edge_agent", "cloud_agent", "tests", "docs"}
COLLISIONS |= {"deploy", "build", "dist", "scripts", "examples"}
# What a checkout holds besides the source: never copied into the build.
LOCAL_NAMES = (".git", ".venv", ".shim", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".kvwire-cache")
LOCAL_NAMES += (".hypothesis", "out")
DATA = ("kvcodec/data/*.json", "proto/*.proto", "bench/data/*.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*LOCAL_NAMES))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (path,) = tmp.glob("kvwire-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def _top_level(names: list[str]) -> set[str]:
    """Import names a wheel puts on sys.path: its top-level folders and .py files, metadata aside."""
    out = set()
    for name in names:
        head, sep, _ = name.partition("/")
        if sep and head.endswith((".dist-info", ".data")):
            continue
        out.add(head if sep else head.removesuffix(".py"))
    return out


def _source_packages() -> list[Path]:
    """The source folders that are Python packages (an __init__.py), tests aside."""
    skip = {"tests", ".git", ".venv", ".venv-vllm", ".shim", "build", "dist"}
    return sorted(p.parent for p in REPO.glob("**/__init__.py") if skip.isdisjoint(p.relative_to(REPO).parts))


def test_the_only_top_level_name_is_kvwire(wheel):
    top = _top_level(wheel.namelist())
    assert top == {"kvwire"}
    assert not top & COLLISIONS


def test_every_source_module_ships_under_kvwire(wheel):
    names = set(wheel.namelist())
    packages = _source_packages()
    assert len(packages) >= 9  # kvcodec (+selectors), kernels, proto, bench (+netlab), the three service packages
    missing = [
        str(py.relative_to(REPO))
        for pkg in packages
        for py in pkg.glob("*.py")
        if f"kvwire/{py.relative_to(REPO).as_posix()}" not in names
    ]
    assert not missing, f"not in the wheel (add the package to [tool.setuptools] packages): {missing}"


@pytest.mark.parametrize("pattern", DATA)
def test_package_data_ships(wheel, pattern):
    expected = sorted(f"kvwire/{p.relative_to(REPO).as_posix()}" for p in REPO.glob(pattern))
    assert expected, f"no source files match {pattern}"
    names = set(wheel.namelist())
    assert [n for n in expected if n not in names] == []


def test_console_scripts_point_at_shipped_modules(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    cfg = configparser.ConfigParser()
    cfg.read_string(wheel.read(entry_points).decode())
    scripts = dict(cfg["console_scripts"])
    assert set(scripts) == {"kvwire", "edge-agent", "cloud-agent"}
    names = set(wheel.namelist())
    for script, target in scripts.items():
        module = target.split(":")[0]
        assert f"{module.replace('.', '/')}.py" in names, (script, target)
