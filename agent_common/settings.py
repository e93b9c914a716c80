"""Settings loading shared by both daemons: defaults < config file < environment < command-line flags.

Each daemon declares one pydantic-settings class whose fields (with their descriptions) are the
single list of options: the command-line parser and `--help` are generated from it, the config
file and the environment use the same names. Nothing is read from the environment at import time.
"""
from __future__ import annotations

import argparse
import json
import os
import tomllib
import types
import typing
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource

# The values of the --config file for the settings object being built (set only inside load_settings).
_file_values: ContextVar[dict[str, Any]] = ContextVar("kvwire_config_file_values", default={})


class AgentSettings(BaseSettings):
    """Base class: adds the config-file source between the environment and the defaults."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # flags (passed as init kwargs) > environment > config file > defaults
        return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=_file_values.get()))

    @classmethod
    def env_prefix(cls) -> str:
        return cls.model_config.get("env_prefix", "")


def read_config_file(path: str) -> dict[str, Any]:
    """A JSON or TOML file of settings (by extension; keys are option names with underscores or dashes)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    text = p.read_text()
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"config file {path!r} is not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold one object of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _type_name(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _type_name(args[0])
    return {int: "N", float: "X", str: "TEXT"}.get(annotation, "VALUE")


def build_parser(cls: type[AgentSettings], prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one --kebab-case flag per settings field; flags default to "not given"."""
    prefix = cls.env_prefix()
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"Every option can also be set in a --config file (JSON or TOML, same names with underscores)\n"
                f"or in the environment as {prefix}<NAME> (e.g. {prefix}{next(iter(cls.model_fields)).upper()}).\n"
                "Precedence: defaults < config file < environment < flags."),
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"JSON or TOML file of settings (environment: {prefix}CONFIG)")
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not None else "none"
        help_text = f"{field.description} (default: {default}; env {prefix}{name.upper()})"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, metavar=_type_name(field.annotation), default=None, help=help_text)
    return parser


def load_settings(cls: type[AgentSettings], argv: list[str] | None, prog: str, description: str):
    """Parse flags, read the config file and the environment, and validate; exits 2 with a clear message on bad input."""
    parser = build_parser(cls, prog, description)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    config = args.config or os.environ.get(cls.env_prefix() + "CONFIG")
    try:
        file_values = read_config_file(config) if config else {}
        unknown = sorted(set(file_values) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"config file {config!r} has unknown settings {unknown}; known: {', '.join(cls.model_fields)}")
        token = _file_values.set(file_values)
        try:
            return cls(**flags)
        finally:
            _file_values.reset(token)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        parser.exit(2, f"{prog}: error: invalid settings: {problems}\n")
    except ValueError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


def grpc_address(host: str, port: int) -> str:
    """host:port for gRPC, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def apply_thread_limit(threads: int) -> None:
    """Cap torch's CPU threads before torch is imported (OMP reads the variable once, for every thread)."""
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
