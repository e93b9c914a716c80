"""An output folder that several `kvwire eval` shards share: one lock for its summary files, and
writes that replace a file whole (a reader sees the old file or the new one, never half of one)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


def complete_records(text: str) -> Iterator[dict]:
    """The JSON records of a JSONL text, one per line; a line that does not parse (the torn last line of a
    run that was stopped mid-write) is skipped, and its work is done again."""
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the folder's exclusive lock (fcntl.flock on OUT/.lock; released if the process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so tools that infer a format from it still do) that
    replaces `path` atomically when the block ends, and is removed if the block fails."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
