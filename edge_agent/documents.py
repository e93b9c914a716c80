"""The edge's document store: texts registered by id, kept in SQLite (WAL) under the edge's data_dir.

One file, `<data_dir>/documents.sqlite3`. Every put and delete is one transaction, committed
(synchronous=FULL) before the call returns, so what a caller was told is stored survives a crash.
Versions come from one counter for the whole store: they strictly increase, across ids and across a
delete and a re-put, so a (doc_id, version) pair names one text forever (a cache may key on it).
The store is model-agnostic: the edge hands it a `count_tokens` callable (its tokenizer's count).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvwire.agent_common import errors
from kvwire.agent_common.errors import ServiceError, StartupConfigError

log = logging.getLogger("kvwire.edge_agent")

DB_NAME = "documents.sqlite3"
SCHEMA_VERSION = 1  # PRAGMA user_version of the file; a newer file is refused, not guessed at
MAX_ID_BYTES = 128
_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
ID_RULE = (
    f"a document id is 1-{MAX_ID_BYTES} characters of letters, digits, '.', '_' and '-', "
    "without '..' and not '.' alone (no slashes, spaces or control characters)"
)
START_BUSY_TIMEOUT_S = 5.0  # how long start-up waits for another process's lock before it gives up

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, text TEXT NOT NULL, version INTEGER NOT NULL, "
    "etag TEXT NOT NULL, bytes INTEGER NOT NULL, tokens INTEGER NOT NULL, created_at REAL NOT NULL, "
    "updated_at REAL NOT NULL)",
    # one version counter for the whole store: a (doc_id, version) pair is never reused, even after a delete
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('version', 0)",
)
_META_COLUMNS = "id, version, etag, bytes, tokens, created_at, updated_at"


class DocumentError(ServiceError):
    """Base class of the document store's refusals."""


class DocumentNotFoundError(DocumentError, errors.DocumentNotFoundError, KeyError):
    """No document has this id (never stored, or deleted)."""

    def __init__(self, doc_id: str):
        super().__init__(doc_id)
        self.doc_id = doc_id

    def __str__(self) -> str:
        return f"no document with id {_shown(self.doc_id)} on this edge"


class InvalidDocumentIdError(DocumentError, ValueError):
    """An id outside the safe pattern (ID_RULE)."""


class InvalidDocumentError(DocumentError, ValueError):
    """A text the store will not hold: empty, or not UTF-8 (over HTTP)."""


class DocumentTooLargeError(DocumentError):
    """One document over max_document_bytes or max_document_tokens."""


class StoreFullError(DocumentError):
    """Storing the document would pass max_documents or max_total_bytes."""


class DocumentStoreOpenError(StartupConfigError):
    """The SQLite file cannot serve: locked by another process, corrupt, newer than this code, or unwritable."""


@dataclass(frozen=True)
class DocumentLimits:
    """What the store accepts; the edge fills it from its settings (edge_agent/settings.py)."""

    max_document_bytes: int = 4 << 20
    max_document_tokens: int = 32768
    max_documents: int = 1000
    max_total_bytes: int = 256 << 20


@dataclass(frozen=True)
class DocumentMeta:
    """A document without its text. `version` strictly increases with every put in the store;
    `etag` is the sha256 of the UTF-8 text (hex); times are Unix seconds."""

    id: str
    version: int
    etag: str
    bytes: int
    tokens: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Document(DocumentMeta):
    """A snapshot of one document: later puts and deletes do not change it."""

    text: str = ""

    @property
    def meta(self) -> DocumentMeta:
        return DocumentMeta(**{k: getattr(self, k) for k in DocumentMeta.__dataclass_fields__})


Listener = Callable[[str, "int | None"], None]


def _shown(doc_id: str) -> str:
    """An id as it may appear in a message: quoted, escaped, and cut short (ids come from callers)."""
    return ascii(doc_id if len(doc_id) <= 64 else doc_id[:64] + "...")


def check_id(doc_id: str) -> str:
    """`doc_id` when it matches the safe pattern, else InvalidDocumentIdError naming the rule."""
    if not isinstance(doc_id, str):
        raise InvalidDocumentIdError(f"a document id is a string, not {type(doc_id).__name__}; {ID_RULE}")
    size = len(doc_id.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        raise InvalidDocumentIdError(f"document id {_shown(doc_id)} is {size} bytes; {ID_RULE}")
    if not _ID_PATTERN.fullmatch(doc_id) or doc_id == "." or ".." in doc_id:
        raise InvalidDocumentIdError(f"document id {_shown(doc_id)} is not allowed: {ID_RULE}")
    return doc_id


def etag_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/kvwire-edge, else ~/.local/share/kvwire-edge (read when called, never at import)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "kvwire-edge"


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """An open, checked connection to the store's file (created when absent), or DocumentStoreOpenError naming it."""
    where = f"document store {str(path)!r}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DocumentStoreOpenError(
            f"data_dir: cannot create {str(path.parent)!r} ({exc.strerror}); set --data-dir to a writable folder"
        ) from None
    conn = None
    try:
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT), never implicit
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise DocumentStoreOpenError(f"{where}: SQLite would not switch it to WAL mode (it stays in {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk before put() returns
        problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise DocumentStoreOpenError(
                f"{where} is corrupt ({'; '.join(problems[:3])}); move it away to start empty, or restore a backup"
            )
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise DocumentStoreOpenError(
                f"{where} has schema version {found}; this edge-agent reads version {SCHEMA_VERSION} (a newer kvwire wrote it)"
            )
        conn.execute("BEGIN IMMEDIATE")  # also proves the file is writable and not locked by another process
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
        return conn
    except DocumentStoreOpenError:
        if conn is not None:
            conn.close()
        raise
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise DocumentStoreOpenError(
                f"{where} is locked by another process (waited {busy_timeout_s:g} s): {text}; "
                "stop whatever holds it, or give this edge-agent its own --data-dir"
            ) from None
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            raise DocumentStoreOpenError(
                f"{where} is corrupt or not an SQLite file ({text}); move it away to start empty, or restore a backup"
            ) from None
        raise DocumentStoreOpenError(f"{where} cannot be opened: {text}") from None


def check_document_store(data_dir: str | Path, busy_timeout_s: float = START_BUSY_TIMEOUT_S) -> Path:
    """Open, check and close the store's file at start-up, before the model loads; returns its path."""
    path = Path(data_dir) / DB_NAME
    _connect(path, busy_timeout_s).close()
    return path


class DocumentStore:
    """Documents by id in one SQLite file; thread-safe (one connection behind a lock).

    `subscribe(listener)`: after every committed put, `listener(doc_id, new_version)`; after every
    committed delete, `listener(doc_id, None)`. Listeners run in commit order on the writing thread
    while the store's (reentrant) lock is held: they may read the store, and should be quick. A
    listener that raises is logged; the write it reports stays committed and later listeners still run.
    """

    def __init__(
        self,
        data_dir: str | Path,
        count_tokens: Callable[[str], int],
        limits: DocumentLimits = DocumentLimits(),
        busy_timeout_s: float = START_BUSY_TIMEOUT_S,
    ):
        self.path = Path(data_dir) / DB_NAME
        self.count_tokens = count_tokens
        self.limits = limits
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._conn = _connect(self.path, busy_timeout_s)

    # --- reading ---------------------------------------------------------------------------------

    def get(self, doc_id: str) -> Document:
        """The document `doc_id` as now stored; DocumentNotFoundError(doc_id) when there is none."""
        check_id(doc_id)
        with self._lock:
            row = self._conn.execute(f"SELECT {_META_COLUMNS}, text FROM documents WHERE id = ?", (doc_id,)).fetchone()
        if row is None:
            raise DocumentNotFoundError(doc_id)
        return Document(*row)

    def meta(self, doc_id: str) -> DocumentMeta:
        """The metadata of `doc_id` without reading its text; DocumentNotFoundError when there is none."""
        check_id(doc_id)
        with self._lock:
            row = self._conn.execute(f"SELECT {_META_COLUMNS} FROM documents WHERE id = ?", (doc_id,)).fetchone()
        if row is None:
            raise DocumentNotFoundError(doc_id)
        return DocumentMeta(*row)

    def list(self) -> list[DocumentMeta]:
        """Every document's metadata, by id."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_META_COLUMNS} FROM documents ORDER BY id").fetchall()
        return [DocumentMeta(*row) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def total_bytes(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM documents").fetchone()[0]

    # --- writing ---------------------------------------------------------------------------------

    def put(self, doc_id: str, text: str) -> Document:
        """Store `text` as `doc_id` (created or replaced) in one transaction, committed before it returns.

        Refusals, before anything changes: InvalidDocumentIdError, InvalidDocumentError (empty text),
        DocumentTooLargeError (max_document_bytes, max_document_tokens), StoreFullError (max_documents,
        max_total_bytes). Two puts of one id at once: the later commit wins and has the higher version.
        """
        return self.put_reporting(doc_id, text)[0]

    def put_reporting(self, doc_id: str, text: str) -> tuple[Document, bool]:
        """put(), and whether the id was new (True) or replaced (False), decided inside the transaction."""
        check_id(doc_id)
        if not isinstance(text, str) or not text:
            raise InvalidDocumentError(f"document {_shown(doc_id)}: the text is empty; send the document's text")
        size = len(text.encode("utf-8"))
        limits = self.limits
        if size > limits.max_document_bytes:
            raise DocumentTooLargeError(
                f"document {_shown(doc_id)} is {size} bytes; this edge stores at most "
                f"{limits.max_document_bytes} per document (--max-document-bytes)"
            )
        tokens = int(self.count_tokens(text))  # outside the lock: tokenizing a long text takes a while
        if tokens > limits.max_document_tokens:
            raise DocumentTooLargeError(
                f"document {_shown(doc_id)} is {tokens} tokens; this edge stores at most "
                f"{limits.max_document_tokens} per document (--max-document-tokens)"
            )
        etag = etag_of(text)
        with self._lock:
            now = time.time()
            with self._transaction() as conn:
                old = conn.execute("SELECT created_at FROM documents WHERE id = ?", (doc_id,)).fetchone()
                if old is None:
                    count = conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
                    if count >= limits.max_documents:
                        raise StoreFullError(
                            f"this edge holds {count} documents, its limit (--max-documents); "
                            f"delete some before adding {_shown(doc_id)}"
                        )
                created = now if old is None else old[0]
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'version'")
                version = conn.execute("SELECT value FROM counters WHERE name = 'version'").fetchone()[0]
                conn.execute(
                    "INSERT OR REPLACE INTO documents (id, text, version, etag, bytes, tokens, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (doc_id, text, version, etag, size, tokens, created, now),
                )
                self._check_total(conn, doc_id)
            doc = Document(doc_id, version, etag, size, tokens, created, now, text)
            self._notify(doc_id, version)
        return doc, old is None

    def _check_total(self, conn: sqlite3.Connection, doc_id: str) -> None:
        """Inside put's transaction, after the write: StoreFullError (and so a rollback) past max_total_bytes."""
        total = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM documents").fetchone()[0]
        if total > self.limits.max_total_bytes:
            raise StoreFullError(
                f"storing {_shown(doc_id)} would bring the edge's documents to {total} bytes, over its limit of "
                f"{self.limits.max_total_bytes} (--max-documents-total-bytes); delete some documents first"
            )

    def delete(self, doc_id: str) -> bool:
        """Remove `doc_id` (committed before it returns); False when there was none. Snapshots keep their text."""
        check_id(doc_id)
        with self._lock:
            with self._transaction() as conn:
                deleted = conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,)).rowcount > 0
            if deleted:
                self._notify(doc_id, None)
        return deleted

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(doc_id, version or None)` after each committed change (see the class); returns an unsubscribe."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- inside ----------------------------------------------------------------------------------

    def _transaction(self):
        return _Transaction(self._conn)

    def _notify(self, doc_id: str, version: int | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(doc_id, version)
            except Exception:
                log.exception("document_listener_failed", extra={"doc_id": doc_id, "version": version})


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises (the store's lock is held around it)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:  # SQLite may already have rolled back (e.g. after a disk-full error)
            self.conn.execute("ROLLBACK")
