"""The prefix cache's disk tier: PrefixEntry objects kept as files of the codec's own checksummed frames, so
a restarted edge starts warm.

One file per entry, `<folder>/<key>.kvpc`: a HEADER frame whose body is a small JSON object of this tier's
own (key, model fingerprint, SHA-256 of the prefix ids, positions, geometry, dtype, encoding, document id
and version), CHUNK frames carrying each layer's K then V in blocks of positions, encoded with the
passthrough encoding of the model's own dtype (exact), and a TRAILER frame with the chunk count. Every
frame is checked by kvcodec/wire.py's parse_frame (magic, version, type, CRC32C, lengths); the stream
header of kvcodec/stream.py is not used, so this file format does not move with the stream's.

Files are written by one background thread (tmp file, fsync, rename, fsync of the folder), so a crash
leaves either the whole file or none, and a request never waits for the disk. The tier is an LRU bounded
in bytes (of files); at start it reads every file's first frame to rebuild its index (ordered by mtime, a
hit touches the file). A file that is corrupt, truncated, of another model or gone is dropped and
counted, never served: the caller recomputes the entry. A write that fails (disk full, I/O error) is
logged and counted, and the entry stays in memory only.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kvwire.kvcodec.encodings import Passthrough, encodings
from kvwire.kvcodec.errors import ConfigError, FrameError
from kvwire.kvcodec.prefix_cache import PrefixEntry
from kvwire.kvcodec.wire import (
    CHUNK,
    HEADER,
    TRAILER,
    Reader,
    pack_frame,
    pack_json,
    parse_frame,
    read_frames,
    read_json,
)

log = logging.getLogger("kvwire.kvcodec")

SUFFIX = ".kvpc"
FORMAT = "kvwire-prefix-entry"
FORMAT_VERSION = 1
FRAME_PAYLOAD = 1 << 20  # positions per chunk frame are chosen to keep a frame's payload near 1 MiB (cap: 3 MiB)
_BLOCK = struct.Struct("<HBII")  # layer, tensor (0: keys, 1: values), first position, positions
_KEY = re.compile(r"[0-9a-f]{64}")
# the reasons kvwire_prefix_cache_disk_errors_total counts (started at 0)
ERROR_REASONS = ("corrupt", "truncated", "mismatch", "missing", "read", "disk_full", "write")


class DiskEntryError(Exception):
    """A disk entry that cannot be served; `reason` is one of ERROR_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def passthrough_for(dtype: torch.dtype) -> Passthrough:
    """The registered passthrough encoding of `dtype` (exact); ConfigError when there is none."""
    for enc in encodings():
        if isinstance(enc, Passthrough) and enc.dtype == dtype:
            return enc
    raise ConfigError(f"no passthrough encoding stores {dtype} exactly: the prefix cache's disk tier cannot keep it")


def ids_digest(ids) -> str:
    return hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


@dataclass
class _Indexed:
    nbytes: int  # the file's size
    doc_id: str | None
    doc_version: int | None


def encode_entry(key: str, model_fp: str, entry: PrefixEntry) -> Iterator[bytes]:
    """The frames of one entry's file, one at a time (a long document's KV is never copied whole): header,
    chunks (each layer's K then V, in blocks of positions), trailer."""
    k0 = entry.keys[0]  # [kv_heads, P, head_dim]
    heads, positions, head_dim = k0.shape
    enc = passthrough_for(k0.dtype)
    stream_id = hashlib.sha256(key.encode()).digest()[:16]  # names the file's frames as one stream
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "model": model_fp,
        "ids_sha256": ids_digest(entry.ids),
        "positions": positions,
        "layers": len(entry.keys),
        "kv_heads": heads,
        "head_dim": head_dim,
        "dtype": str(k0.dtype).removeprefix("torch."),
        "encoding": enc.name,
        "doc_id": entry.doc_id,
        "doc_version": entry.doc_version,
        "prefill_s": entry.prefill_s,
    }
    yield pack_frame(HEADER, stream_id, 0, pack_json(meta))
    step = max(1, FRAME_PAYLOAD // (heads * head_dim * k0.element_size()))
    seq = 1
    for layer, pair in enumerate(zip(entry.keys, entry.values, strict=True)):
        for which, tensor in enumerate(pair):
            for start in range(0, positions, step):
                n = min(step, positions - start)
                _, payload = enc.encode(tensor[:, start : start + n], "token", 0)
                yield pack_frame(CHUNK, stream_id, seq, _BLOCK.pack(layer, which, start, n) + payload)
                seq += 1
    yield pack_frame(TRAILER, stream_id, seq, pack_json({"chunks": seq - 1}))


def _read_meta(f) -> dict:
    """The parsed header JSON of an open entry file (FrameError when its first frame is bad)."""
    first = next(read_frames(f), None)
    if first is None:
        raise FrameError("truncated", "the file is empty")
    frame = parse_frame(first)
    if frame.kind != HEADER:
        raise FrameError("malformed", "the first frame is not a header")
    r = Reader(frame.body, "prefix entry header")
    meta = read_json(r)
    r.done()
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise FrameError("malformed", f"not a {FORMAT} version {FORMAT_VERSION} file")
    return meta


def decode_entry(f, key: str, model_fp: str, ids: tuple[int, ...], dtype: torch.dtype) -> PrefixEntry:
    """Read one entry from an open file, checking every frame and that it is the entry of `key` for `ids`
    on this model at `dtype`; FrameError (corrupt or truncated) or DiskEntryError("mismatch") otherwise."""
    meta = _read_meta(f)
    want = {"key": key, "model": model_fp, "ids_sha256": ids_digest(ids), "positions": len(ids)}
    wrong = [name for name, value in want.items() if meta.get(name) != value]
    if meta.get("dtype") != str(dtype).removeprefix("torch."):
        wrong.append("dtype")
    if wrong:
        raise DiskEntryError("mismatch", f"the file's {', '.join(wrong)} differ from the entry asked for")
    enc = passthrough_for(dtype)
    if meta.get("encoding") != enc.name:
        raise DiskEntryError("mismatch", f"encoding {meta.get('encoding')!r}, not {enc.name!r}")
    layers, heads, positions, head_dim = (int(meta[k]) for k in ("layers", "kv_heads", "positions", "head_dim"))
    tensors = [[torch.empty(heads, positions, head_dim, dtype=dtype) for _ in range(layers)] for _ in range(2)]
    filled = [[0] * layers for _ in range(2)]  # positions read so far per tensor: blocks come in order
    chunks = 0
    for raw in read_frames(f):
        frame = parse_frame(raw)
        if frame.seq != chunks + 1:
            raise FrameError("malformed", f"frame seq {frame.seq} where {chunks + 1} belongs")
        if frame.kind == TRAILER:
            r = Reader(frame.body, "prefix entry trailer")
            trailer = read_json(r)
            r.done()
            if trailer.get("chunks") != chunks or any(n != positions for row in filled for n in row):
                raise FrameError("truncated", f"the trailer counts {trailer.get('chunks')} chunks; {chunks} came")
            if next(read_frames(f), None) is not None:
                raise FrameError("trailing_bytes", "frames after the trailer")
            return PrefixEntry(
                ids=tuple(ids),
                keys=tensors[0],
                values=tensors[1],
                prefill_s=float(meta.get("prefill_s") or 0.0),
                doc_id=meta.get("doc_id"),
                doc_version=meta.get("doc_version"),
            )
        if frame.kind != CHUNK:
            raise FrameError("malformed", "a second header")
        r = Reader(frame.body, "prefix entry chunk")
        layer, which, start, n = r.unpack(_BLOCK.format.lstrip("<"), "block")
        if layer >= layers or which > 1 or start != filled[which][layer] or n < 1 or start + n > positions:
            raise FrameError("malformed", f"block (layer {layer}, tensor {which}, {start}+{n}) is out of place")
        size = enc.sizes("token", 0, heads, n, head_dim)[1]
        enc.decode(b"", r.take(size, "payload"), tensors[which][layer][:, start : start + n], "token", 0)
        r.done()
        filled[which][layer] += n
        chunks += 1
    raise FrameError("truncated", f"the file ends after {chunks} chunks, without its trailer")


class DiskTier:
    """Entries on disk under `folder`, an LRU bounded by `max_bytes` of files; thread-safe.

    on_error(reason): a dropped file or a failed write (reason in ERROR_REASONS). load() runs on the
    caller's thread; store() queues the entry for the writer thread (`wait_written` waits for it).
    """

    def __init__(
        self,
        folder: str | Path,
        max_bytes: int,
        model_fp: str,
        dtype: torch.dtype,
        on_error: Callable[[str], None] | None = None,
    ):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        passthrough_for(dtype)  # a dtype the tier cannot store exactly is a start-up error
        self.folder = Path(folder)
        self.max_bytes, self.model_fp, self.dtype = max_bytes, model_fp, dtype
        self.on_error = on_error
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Indexed] = OrderedDict()
        self._pending: OrderedDict[str, PrefixEntry] = OrderedDict()  # key -> entry waiting for the writer
        self._writing: PrefixEntry | None = None  # the entry the writer is writing now
        self._writing_dropped = False
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self.bytes = 0
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="prefix-disk-writer", daemon=True)
        self._writer.start()

    # --- index -----------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):  # keys are prefix_key digests: nothing else becomes a file name
            raise ValueError(f"a disk-tier key is 64 hex digits, not {key!r}")
        return self.folder / f"{key}{SUFFIX}"

    def _scan(self) -> None:
        """Rebuild the index from the folder: leftover tmp files go, unreadable files are dropped and counted."""
        found = []
        for path in self.folder.iterdir():
            if path.name.startswith(".") and ".tmp" in path.name:
                path.unlink(missing_ok=True)  # a write a crash cut short
                continue
            if not path.name.endswith(SUFFIX):
                continue
            key = path.name[: -len(SUFFIX)]
            if not _KEY.fullmatch(key):
                continue  # not a file of this tier's: left alone
            try:
                with open(path, "rb") as f:
                    meta = _read_meta(f)
                if meta.get("key") != key or meta.get("model") != self.model_fp:
                    raise DiskEntryError("mismatch", "its header names another key or model")
                stat = path.stat()
            except FrameError as exc:
                self._discard(path, "truncated" if exc.reason == "truncated" else "corrupt", str(exc))
                continue
            except DiskEntryError as exc:
                self._discard(path, exc.reason, str(exc))
                continue
            except OSError as exc:
                self._discard(path, "read", str(exc))
                continue
            found.append((stat.st_mtime_ns, key, _Indexed(stat.st_size, meta.get("doc_id"), meta.get("doc_version"))))
        for _, key, item in sorted(found):
            self._index[key] = item
            self.bytes += item.nbytes
        self._evict_locked()

    def _discard(self, path: Path, reason: str, why: str) -> None:
        log.warning("prefix_disk_entry_dropped", extra={"path": str(path), "reason": reason, "detail": why})
        path.unlink(missing_ok=True)
        if self.on_error is not None:
            self.on_error(reason)

    def _evict_locked(self) -> None:
        while self.bytes > self.max_bytes and self._index:
            key, item = self._index.popitem(last=False)
            self.bytes -= item.nbytes
            self._path(key).unlink(missing_ok=True)

    def _forget_locked(self, key: str) -> None:
        item = self._index.pop(key, None)
        if item is not None:
            self.bytes -= item.nbytes

    def drop_stale(self, current: dict[str, int]) -> int:
        """Remove the files of documents not in `current` (doc id -> version) or of another version of
        theirs (the store changed while the edge was down); returns how many."""
        with self._lock:
            keys = [
                k for k, i in self._index.items() if i.doc_id is not None and current.get(i.doc_id) != i.doc_version
            ]
            for k in keys:
                self._forget_locked(k)
                self._path(k).unlink(missing_ok=True)
        return len(keys)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def documents(self) -> dict[str, set[int | None]]:
        """doc id -> the document versions entries on disk were computed from."""
        out: dict[str, set[int | None]] = {}
        with self._lock:
            for item in self._index.values():
                if item.doc_id is not None:
                    out.setdefault(item.doc_id, set()).add(item.doc_version)
        return out

    def holds_document(self, doc_id: str) -> bool:
        with self._lock:
            pending = [*self._pending.values(), *([self._writing] if self._writing is not None else [])]
            return any(item.doc_id == doc_id for item in self._index.values()) or any(
                e.doc_id == doc_id for e in pending
            )

    def drop_document(self, doc_id: str) -> int:
        """Remove the files and the queued or running writes of document `doc_id`; returns how many."""
        with self._lock:
            keys = [k for k, i in self._index.items() if i.doc_id == doc_id]
            for k in keys:
                self._forget_locked(k)
                self._path(k).unlink(missing_ok=True)
            queued = [k for k, e in self._pending.items() if e.doc_id == doc_id]
            for k in queued:
                del self._pending[k]
            if self._writing is not None and self._writing.doc_id == doc_id:
                self._writing_dropped = True  # the writer discards its file instead of renaming it
        return len(keys) + len(queued)

    # --- reading ---------------------------------------------------------------------------------

    def load(self, key: str, ids: tuple[int, ...]) -> PrefixEntry | None:
        """The entry of `key` read from disk (bit-identical to what was stored), or None: not on disk, or its
        file was bad (dropped, counted, logged: the caller recomputes it)."""
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                entry = decode_entry(f, key, self.model_fp, tuple(ids), self.dtype)
        except FileNotFoundError:
            reason, why = "missing", "the file was removed while the edge ran"
        except FrameError as exc:
            reason, why = ("truncated" if exc.reason == "truncated" else "corrupt"), str(exc)
        except DiskEntryError as exc:
            reason, why = exc.reason, str(exc)
        except OSError as exc:
            reason, why = "read", str(exc)
        else:
            try:
                os.utime(path)  # the LRU order survives a restart
            except OSError:
                pass
            return entry
        with self._lock:
            self._forget_locked(key)
        self._discard(path, reason, why)
        return None

    # --- writing ---------------------------------------------------------------------------------

    def store(self, key: str, entry: PrefixEntry) -> None:
        """Queue `entry` for the writer thread (a file already on disk for `key` is kept as is)."""
        self._path(key)  # ValueError now for a key that cannot be a file name, not in the writer thread
        with self._lock:
            if self._closed or key in self._index:
                return
            self._pending[key] = entry
            self._wake.notify_all()

    def wait_written(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued entry is written or given up (True), or `timeout_s` passed (False)."""
        with self._lock:
            return self._wake.wait_for(lambda: not self._pending and self._writing is None, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued writes (up to `timeout_s`), then stop the writer."""
        self.wait_written(timeout_s)
        with self._lock:
            self._closed = True
            self._pending.clear()
            self._wake.notify_all()
        self._writer.join(timeout_s)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                key, entry = self._pending.popitem(last=False)
                self._writing, self._writing_dropped = entry, False
            try:
                self._write(key, entry)
            except Exception:  # never let the writer die: the entry stays in memory only
                log.exception("prefix_disk_write_failed", extra={"key": key})
                if self.on_error is not None:
                    self.on_error("write")
            finally:
                with self._lock:
                    self._writing = None
                    self._wake.notify_all()

    def _write(self, key: str, entry: PrefixEntry) -> None:
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole tier (its file is a little larger still): kept in memory only
        path = self._path(key)
        tmp = self.folder / f".{key}.tmp{os.getpid()}"
        size = 0
        try:
            with open(tmp, "wb") as f:
                for frame in encode_entry(key, self.model_fp, entry):
                    self._write_bytes(f, frame)
                    size += len(frame)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                # dropped (its document changed) or closed while it was written: it must not appear
                if self._closed or self._writing_dropped:
                    tmp.unlink(missing_ok=True)
                    return
                os.replace(tmp, path)
                self._forget_locked(key)
                self._index[key] = _Indexed(size, entry.doc_id, entry.doc_version)
                self.bytes += size
                self._evict_locked()
            self._fsync_folder()
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "write"
            log.warning(
                "prefix_disk_write_failed",
                extra={"path": str(path), "reason": reason, "detail": str(exc), "served_from": "memory"},
            )
            if self.on_error is not None:
                self.on_error(reason)

    @staticmethod
    def _write_bytes(f, data: bytes) -> None:
        """One write of the entry's file (a seam for tests that simulate a full disk)."""
        f.write(data)

    def _fsync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
