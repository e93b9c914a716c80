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

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource

# The values of the --config file for the settings object being built (set only inside load_settings).
_file_values: ContextVar[dict[str, Any] | None] = ContextVar("kvwire_config_file_values", default=None)


class AgentSettings(BaseSettings):
    """Base class: adds the config-file source between the environment and the defaults."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # flags (passed as init kwargs) > environment > config file > defaults
        return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=_file_values.get() or {}))

    @classmethod
    def env_prefix(cls) -> str:
        return cls.model_config.get("env_prefix", "")

    def require_together(self, *names: str) -> None:
        """ValueError unless the named options are all set or all unset (a certificate without its key, ...)."""
        given = [n for n in names if getattr(self, n) is not None]
        if given and len(given) != len(names):
            missing = [n for n in names if n not in given]
            raise ValueError(f"{' and '.join(given)} given without {' and '.join(missing)}: set both or neither")

    def require_for(self, needed: str, *names: str) -> None:
        """ValueError when any of `names` is set while `needed` is not (a client certificate without TLS, ...)."""
        given = [n for n in names if getattr(self, n) is not None]
        if given and getattr(self, needed) is None:
            raise ValueError(f"{' and '.join(given)} need {needed} (they only apply with TLS)")


MIB = 1 << 20


class DaemonSettings(AgentSettings):
    """The options both daemons have: model, threads, bind address, gRPC message cap, shutdown, logs, and
    the two security options that mean the same on both (each daemon adds its own TLS options)."""

    model: str = Field(
        "embedded", description="model folder or hub id; 'embedded' is the bundled SmolLM2-135M-Instruct"
    )
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="weights and KV dtype")
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1")
    threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="CPU threads for torch (0: torch's default, one per core; 1 avoids thrashing on a shared host)",
    )
    host: str = Field("127.0.0.1", description="address this daemon's ports bind to (0.0.0.0 for every interface)")
    max_message_bytes: int = Field(
        8 * MIB, ge=4 * MIB, le=64 * MIB, description="gRPC message cap in both directions (frames are at most ~1 MiB)"
    )
    grace_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM/SIGINT, how long requests in flight may take to finish"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level of the JSON logs on stderr"
    )
    auth_token_file: str | None = Field(
        None,
        description="file holding the bearer token callers must send (Authorization: Bearer <token>); "
        "none: no token asked. Health, readiness and metrics stay open (docs/security.md)",
    )
    tls_cert_file: str | None = Field(
        None, description="PEM certificate (chain) this daemon's server presents; with tls_key_file it switches TLS on"
    )
    tls_key_file: str | None = Field(None, description="unencrypted PEM private key of tls_cert_file")

    @model_validator(mode="after")
    def _tls_pair(self):
        self.require_together("tls_cert_file", "tls_key_file")
        return self


def read_config_file(path: str) -> dict[str, Any]:
    """A JSON or TOML file of settings (by extension; keys are option names with underscores or dashes)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    text = p.read_text()
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(
            f"config file {path!r} is not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'}: {exc}"
        ) from None
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
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Every option can also be set in a --config file (JSON or TOML, same names with underscores)\n"
            f"or in the environment as {prefix}<NAME> (e.g. {prefix}{next(iter(cls.model_fields)).upper()}).\n"
            "Precedence: defaults < config file < environment < flags."
        ),
    )
    parser.add_argument(
        "--config", metavar="FILE", default=None, help=f"JSON or TOML file of settings (environment: {prefix}CONFIG)"
    )
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not None else "none"
        help_text = f"{field.description} (default: {default}; env {prefix}{name.upper()})"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "FILE" if name.endswith("_file") else _type_name(field.annotation)
            parser.add_argument(flag, dest=name, metavar=metavar, default=None, help=help_text)
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
            raise ValueError(
                f"config file {config!r} has unknown settings {unknown}; known: {', '.join(cls.model_fields)}"
            )
        token = _file_values.set(file_values)
        try:
            return cls(**flags)
        finally:
            _file_values.reset(token)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        parser.exit(2, f"{prog}: error: invalid settings: {problems}\n")
    except ValueError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


def _problem(error: dict) -> str:
    """One validation error as `field: message`; a check across fields (a cert without its key) is its message alone."""
    where = ".".join(map(str, error["loc"]))
    message = (
        str(error["ctx"]["error"])
        if error["type"] == "value_error" and "error" in error.get("ctx", {})
        else error["msg"]
    )
    return f"{where}: {message}" if where else message


def grpc_address(host: str, port: int) -> str:
    """host:port for gRPC, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def apply_thread_limit(threads: int) -> None:
    """Cap torch's CPU threads before torch is imported (OMP reads the variable once, for every thread)."""
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
