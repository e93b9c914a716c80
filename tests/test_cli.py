"""The `kvwire` CLI (bench/main.py) loads only the chosen subcommand: `--help` of the CLI and of every
subcommand parses without importing torch or transformers (module presence, never timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvwire.bench.benchmarks import BENCHES
from kvwire.bench.main import COMMANDS, main
from kvwire.bench.netlab.namespaces import REPO_ROOT

HEAVY = ("torch", "transformers", "triton", "matplotlib", "grpc")

# In a fresh interpreter: parse each command line's --help through the real main(), then report which
# heavy modules got imported and what --help printed.
PROBE = """
import contextlib, io, json, sys
from kvwire.bench.main import main

out = {}
for argv in json.loads(sys.argv[1]):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    out[" ".join(argv)] = {"code": code, "help": text.getvalue()}
out["loaded"] = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
print(json.dumps(out))
"""


def _help_lines() -> list[list[str]]:
    return [["--help"]] + [[name, "--help"] for name in COMMANDS] + [["bench", name, "--help"] for name in BENCHES]


@pytest.fixture(scope="module")
def probed() -> dict:
    argvs = _help_lines()
    res = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs), json.dumps(HEAVY)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_help_of_every_subcommand_imports_no_torch(probed):
    assert probed.pop("loaded") == []
    for line, got in probed.items():
        assert got["code"] == 0, line
        assert got["help"].startswith("usage: kvwire"), line


def test_top_level_help_lists_every_subcommand_with_its_help_line(probed):
    text = " ".join(probed["--help"]["help"].split())  # argparse wraps long help lines
    for name, command in COMMANDS.items():
        assert f"{name} {' '.join(command.help.split())}" in text


def test_subcommand_help_shows_its_own_options(probed):
    assert "--retentions" in probed["eval --help"]["help"]
    assert "--max-protected" in probed["diagnose --help"]["help"]
    assert "--geometry" in probed["bench wire-size --help"]["help"]
    assert "--hold" in probed["netlab --help"]["help"]


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_every_table_entry_resolves_to_functions():
    from kvwire.bench.main import _load

    for command in COMMANDS.values():
        assert command.arguments.startswith("kvwire.bench.") and command.run.startswith("kvwire.bench.")  # tools
        assert callable(_load(command.arguments)) and callable(_load(command.run))
