"""The life of a daemon process, the same for edge-agent and cloud-agent: settings, logs, start-up
checks, the model, serving, and the exit code."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kvwire.agent_common.errors import StartupConfigError
from kvwire.agent_common.logs import log_event, setup_logging
from kvwire.agent_common.security import SecurityConfigError
from kvwire.agent_common.settings import AgentSettings, DaemonSettings, apply_thread_limit, load_settings
from kvwire.kvcodec.errors import ConfigError, KVWireError

S = TypeVar("S", bound=AgentSettings)


def run_daemon(
    prog: str,
    settings_cls: type[S],
    description: str,
    argv: list[str] | None,
    check: Callable[[S], Any],
    serve: Callable[[S, Any], Awaitable[int]],
    log: logging.Logger,
) -> int:
    """Load settings (bad ones: exit 2), run `check` (TLS files, tokens, the profile, data files: bad ones exit
    2; ports already taken: exit 1) before the model loads, then `serve(settings, checked)` until it drains; a
    StartupConfigError while serving starts exits 2 too, other start-up failures exit 1."""
    settings = load_settings(settings_cls, argv, prog, description)
    setup_logging(prog, settings.log_level)
    try:
        checked = check(settings)
    except (SecurityConfigError, StartupConfigError, ConfigError) as exc:  # a setting at fault
        return _failed(prog, log, exc, 2)
    except OSError as exc:  # a port already taken: found before the model loads too
        return _failed(prog, log, exc, 1)
    apply_thread_limit(settings.threads)
    try:
        return asyncio.run(serve(settings, checked))
    except StartupConfigError as exc:
        return _failed(prog, log, exc, 2)
    except (KVWireError, OSError, RuntimeError) as exc:
        return _failed(prog, log, exc, 1)


def _failed(prog: str, log: logging.Logger, exc: Exception, code: int) -> int:
    log_event(log, "startup_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return code


def load_daemon_model(settings: DaemonSettings):
    """(LoadedModel, seconds): torch and transformers import here, after the settings and files were checked."""
    from transformers.utils import logging as hf_logging

    from kvwire.kvcodec.models import load_model

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    loaded = load_model(settings.model, settings.dtype, settings.device)
    return loaded, round(time.perf_counter() - started, 2)


def warn_if_exposed(
    log: logging.Logger, token_file: str | None, setting: str, protected_by_tls: bool, where: str
) -> None:
    """Start-up warnings for a token that would cross the network in clear or a token file others can read."""
    from kvwire.agent_common.security import readable_by_others

    if token_file is None:
        return
    if not protected_by_tls:
        log_event(
            log,
            "token_in_clear",
            logging.WARNING,
            setting=setting,
            reason=f"{where} travels without TLS: anyone on the path can read the token",
        )
    if readable_by_others(token_file):
        log_event(
            log,
            "token_file_readable",
            logging.WARNING,
            setting=setting,
            path=token_file,
            reason="every user on this host can read the token; chmod 0600 (or 0640 to the service's group)",
        )


def check_ports_free(host: str, *ports: int) -> None:
    """OSError naming the port when one of `ports` (0: any free port, not checked) cannot be bound on
    `host`: a taken port is found in a second, not after the model has loaded."""
    from kvwire.agent_common.serve import bind_socket

    for port in ports:
        if port:
            try:
                bind_socket(host, port).close()
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
