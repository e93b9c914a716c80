"""The layering, written down: imports point down only.

    kernels  <-  kvcodec (codec)  <-  proto, agent_common, edge_agent, cloud_agent (service)  <-  bench (tools)

Every module's imports are read with ast (inside functions too, relative ones resolved), and each
rule names the kvwire packages a layer may not import, with the modules that do. Modules named in
strings for importlib (the `kvwire` CLI's table) are not seen here: tests/test_cli.py checks those.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "kvcodec", "proto", "agent_common", "edge_agent", "cloud_agent", "bench")
SERVICE = {"proto", "agent_common", "edge_agent", "cloud_agent"}


def _imported(path: Path) -> set[str]:
    """Dotted names of the kvwire modules one file imports (`from kvwire import kernels` counts as
    kvwire.kernels; `from .namespaces import x` inside kvwire.bench.netlab as kvwire.bench.netlab.namespaces)."""
    rel = path.relative_to(REPO).with_suffix("").parts
    package = ["kvwire", *(rel[:-1])]  # the package this module lives in (an __init__ is its own package's)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}  # a name may be a submodule
    return {name for name in out if name.startswith("kvwire.")}


def _import_graph() -> dict[tuple[str, str], set[str]]:
    """(importing package, imported package) -> the importing modules, over every source file."""
    graph: dict[tuple[str, str], set[str]] = defaultdict(set)
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for name in _imported(path):
                target = name.split(".")[1]
                if target in PACKAGES:
                    graph[package, target].add(path.relative_to(REPO).as_posix())
    return graph


GRAPH = _import_graph()

# id: (importing packages, packages they may not import)
RULES = [
    pytest.param({"kernels"}, set(PACKAGES) - {"kernels"}, id="kernels-imports-only-kernels"),
    pytest.param({"kvcodec"}, set(PACKAGES) - {"kvcodec", "kernels"}, id="kvcodec-imports-only-kvcodec-kernels"),
    pytest.param({"proto"}, set(PACKAGES) - {"proto"}, id="proto-imports-only-proto"),
    pytest.param(SERVICE, {"bench"}, id="service-imports-no-bench"),
    pytest.param(set(PACKAGES) - {"bench"}, {"bench"}, id="only-bench-imports-bench"),
    pytest.param({"agent_common"}, {"edge_agent", "cloud_agent"}, id="agent_common-imports-neither-daemon"),
    pytest.param({"edge_agent"}, {"cloud_agent"}, id="edge_agent-imports-no-cloud_agent"),
    pytest.param({"cloud_agent"}, {"edge_agent"}, id="cloud_agent-imports-no-edge_agent"),
]


@pytest.mark.parametrize("importers, forbidden", RULES)
def test_imports_point_down(importers, forbidden):
    wrong = {f"{a} -> {b}": sorted(mods) for (a, b), mods in GRAPH.items() if a in importers and b in forbidden}
    assert not wrong, f"upward imports (importer -> imported: modules): {wrong}"


def test_the_scanner_sees_every_import_form():
    """Known edges of each form, so the rules above cannot pass by reading nothing."""
    assert "kvcodec/prefill.py" in GRAPH["kvcodec", "kernels"]  # from kvwire import kernels
    assert "bench/main.py" in GRAPH["bench", "kvcodec"]  # an import inside a function
    assert "kvwire.bench.netlab.namespaces" in _imported(REPO / "bench/netlab/__init__.py")  # relative
    assert "kvwire.bench.netlab.namespaces" in _imported(REPO / "bench/netlab/daemons.py")  # relative
    assert ("bench", "agent_common") in GRAPH and ("edge_agent", "proto") in GRAPH
