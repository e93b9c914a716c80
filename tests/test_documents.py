"""The edge's document store (edge_agent/documents.py), its HTTP API (edge_agent/http.py) and `kvwire docs`.

In-process: the store on a temporary folder, and the HTTP app through a TestClient (no model). Live:
edge-agent daemons with the tiny model on loopback — documents survive a restart, the bearer token
guards the API, the CLI works against it, and a locked or corrupt SQLite file stops the start with
exit 2 naming the file. Nothing here depends on how long anything takes.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from edges import daemon_env
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from kvwire.agent_common.launch import Daemon
from kvwire.agent_common.metrics import Metrics
from kvwire.edge_agent.documents import (
    DB_NAME,
    ID_RULE,
    DocumentLimits,
    DocumentNotFoundError,
    DocumentStore,
    DocumentStoreOpenError,
    DocumentTooLargeError,
    InvalidDocumentError,
    InvalidDocumentIdError,
    StoreFullError,
    check_document_store,
)
from kvwire.edge_agent.http import create_app

TOKEN = "edge-docs-token-0123456789abcdef"
TEXT = "The Normans gave their name to Normandy. Their leader was Rollo."
UNSAFE_IDS = ["a/b", "..", ".", "a..b", "x" * 129, "a\nb", "tab\tid", "nul\x00", "spa ce", "caf\u00e9", ""]


def words(text: str) -> int:
    return len(text.split())


def _store(path, **limits) -> DocumentStore:
    return DocumentStore(path, words, DocumentLimits(**limits), busy_timeout_s=0)


# --- the store -----------------------------------------------------------------------------------


def test_put_get_list_delete(tmp_path):
    store = _store(tmp_path)
    first = store.put("normans", TEXT)
    assert (first.id, first.text, first.tokens, first.bytes) == ("normans", TEXT, words(TEXT), len(TEXT))
    assert first.etag == hashlib.sha256(TEXT.encode()).hexdigest()
    assert store.get("normans") == first
    unicode_text = "Caf\u00e9 \u2014 na\u00efve"
    other = store.put("cafe.v1_x-y", unicode_text)
    assert other.bytes == len(unicode_text.encode("utf-8")) and other.version > first.version
    replaced = store.put("normans", TEXT + " Again.")
    assert replaced.version > other.version and replaced.created_at == first.created_at
    assert replaced.updated_at >= first.updated_at and replaced.etag != first.etag
    assert [m.id for m in store.list()] == ["cafe.v1_x-y", "normans"]
    assert store.list()[1] == replaced.meta and store.meta("normans") == replaced.meta
    assert len(store) == 2 and store.total_bytes() == other.bytes + replaced.bytes
    assert store.delete("normans") is True
    assert store.delete("normans") is False
    with pytest.raises(DocumentNotFoundError) as exc:
        store.get("normans")
    assert exc.value.doc_id == "normans" and "no document with id 'normans'" in str(exc.value)
    assert [m.id for m in store.list()] == ["cafe.v1_x-y"]


def test_documents_survive_a_new_store_on_the_same_folder(tmp_path):
    store = _store(tmp_path)
    kept = store.put("kept", TEXT)
    gone = store.put("gone", "soon deleted")
    store.delete("gone")
    store.close()
    again = _store(tmp_path)
    assert again.get("kept") == kept and [m.id for m in again.list()] == ["kept"]
    assert again.put("gone", "back").version > gone.version  # the version counter persists: no reuse
    assert (tmp_path / DB_NAME).is_file()
    mode = sqlite3.connect(tmp_path / DB_NAME).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


CRASHING_WRITER = """
import sys
from kvwire.edge_agent.documents import DocumentStore
store = DocumentStore(sys.argv[1], lambda text: len(text.split()))
i = 0
while True:  # killed by the test at some point in here, usually in the middle of a put
    doc = store.put(f"d{i}", f"document number {i} " * 50)
    print(i, doc.version, flush=True)
    i += 1
"""


def test_a_killed_writer_loses_no_acknowledged_put(tmp_path):
    """SIGKILL a process that puts documents in a loop once it has acknowledged five: all five are there."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **daemon_env()},
    )
    acked = {}
    for line in proc.stdout:
        i, version = map(int, line.split())
        acked[f"d{i}"] = version
        if len(acked) == 5:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    assert len(acked) == 5, "the writer died before acknowledging five puts"
    store = _store(tmp_path)
    for doc_id, version in acked.items():
        assert store.get(doc_id).version == version
    # anything after the last acknowledgement is either whole or absent, never half a document
    for meta in store.list():
        assert store.get(meta.id).text == f"document number {meta.id[1:]} " * 50


def test_a_put_that_fails_inside_its_transaction_leaves_the_old_version(tmp_path):
    store = _store(tmp_path, max_total_bytes=100)
    old = store.put("doc", "short text")
    with pytest.raises(StoreFullError, match="over its limit of 100 .*--max-documents-total-bytes"):
        store.put("doc", "long " * 30)  # the row is written, then the total is checked: rolled back
    assert store.get("doc") == old

    def fail_after_write(conn, doc_id):
        raise RuntimeError("disk went away")

    store._check_total = fail_after_write  # a fault after the UPDATE and the INSERT, before COMMIT
    with pytest.raises(RuntimeError, match="disk went away"):
        store.put("doc", "replacement")
    with pytest.raises(RuntimeError):
        store.put("new", "never stored")
    del store._check_total
    assert store.get("doc") == old and [m.id for m in store.list()] == ["doc"]
    assert store.put("doc", "next").version == old.version + 1  # the failed puts took no version


def test_limits_refuse_with_the_setting_named(tmp_path):
    store = _store(tmp_path, max_document_bytes=40, max_document_tokens=5, max_documents=2, max_total_bytes=60)
    with pytest.raises(DocumentTooLargeError, match="is 41 bytes; .* at most 40 per document .*--max-document-bytes"):
        store.put("big", "x" * 41)
    with pytest.raises(DocumentTooLargeError, match="is 6 tokens; .* at most 5 .*--max-document-tokens"):
        store.put("wordy", "a b c d e f")
    with pytest.raises(InvalidDocumentError, match="the text is empty"):
        store.put("empty", "")
    store.put("one", "x" * 30)
    store.put("two", "y" * 20)
    with pytest.raises(StoreFullError, match="holds 2 documents, its limit .*--max-documents"):
        store.put("three", "z")
    assert store.put("two", "w" * 30).bytes == 30  # replacing stays within max_documents (total 60)
    with pytest.raises(StoreFullError, match="61 bytes, over its limit of 60"):
        store.put("one", "x" * 31)
    assert [(m.id, m.bytes) for m in store.list()] == [("one", 30), ("two", 30)]


@pytest.mark.parametrize("doc_id", UNSAFE_IDS)
def test_unsafe_ids_are_refused_naming_the_rule(tmp_path, doc_id):
    store = _store(tmp_path)
    for call in (lambda: store.put(doc_id, TEXT), lambda: store.get(doc_id), lambda: store.delete(doc_id)):
        with pytest.raises(InvalidDocumentIdError) as exc:
            call()
        assert ID_RULE in str(exc.value)
        assert "\n" not in str(exc.value) and "\x00" not in str(exc.value)  # the id is shown escaped
    assert store.list() == []


def test_a_128_byte_id_is_accepted(tmp_path):
    assert _store(tmp_path).put("x" * 128, TEXT).id == "x" * 128


def test_concurrent_puts_of_one_id_last_writer_wins(tmp_path):
    store = _store(tmp_path)
    n = 8
    barrier = threading.Barrier(n)
    results = [None] * n

    def writer(i):
        barrier.wait()
        results[i] = store.put("shared", f"writer {i} " * (i + 1))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = [doc.version for doc in results]
    assert len(set(versions)) == n  # every put got its own version
    last = max(results, key=lambda doc: doc.version)
    assert store.get("shared") == last  # the highest version is the one stored
    for doc in results:  # each writer's snapshot is its own text
        assert doc.text.startswith(f"writer {results.index(doc)} ")


def test_delete_while_a_reader_holds_a_snapshot(tmp_path):
    store = _store(tmp_path)
    store.put("doc", TEXT)
    snapshot = store.get("doc")
    store.put("doc", "a newer text")
    store.delete("doc")
    assert snapshot.text == TEXT and snapshot.etag == hashlib.sha256(TEXT.encode()).hexdigest()
    with pytest.raises(DocumentNotFoundError):
        store.get("doc")


def test_subscribers_hear_each_committed_change_in_order(tmp_path):
    store = _store(tmp_path, max_documents=1)
    heard = []
    seen_by_listener = []

    def listener(doc_id, version):
        heard.append((doc_id, version))
        try:  # a listener may read the store, and sees the committed state
            seen_by_listener.append(store.get(doc_id).version)
        except DocumentNotFoundError:
            seen_by_listener.append(None)

    def broken(doc_id, version):
        raise ValueError("a listener's own bug")

    store.subscribe(broken)
    unsubscribe = store.subscribe(listener)
    a = store.put("a", "one")
    b = store.put("a", "two")
    with pytest.raises(StoreFullError):
        store.put("b", "refused")  # nothing committed, nothing heard
    assert store.delete("a") is True
    assert store.delete("a") is False  # nothing deleted, nothing heard
    assert heard == [("a", a.version), ("a", b.version), ("a", None)]
    assert seen_by_listener == [a.version, b.version, None]
    unsubscribe()
    store.put("a", "three")
    assert len(heard) == 3


def test_a_locked_file_at_start_is_a_clear_error(tmp_path):
    _store(tmp_path).close()
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DocumentStoreOpenError) as exc:
            _store(tmp_path)
        assert str(tmp_path / DB_NAME) in str(exc.value) and "is locked by another process" in str(exc.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _store(tmp_path).list() == []  # once the lock is gone the store opens


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: p.write_bytes(b"this is not an SQLite file at all " * 200), "is corrupt or not an SQLite file"),
        (lambda p: p.write_bytes(p.read_bytes()[:100] + os.urandom(4000)), "corrupt"),
    ],
    ids=["garbage", "damaged-pages"],
)
def test_a_corrupt_file_at_start_is_a_clear_error(tmp_path, damage, needle):
    store = _store(tmp_path)
    store.put("doc", TEXT * 40)
    store.close()
    path = tmp_path / DB_NAME
    for extra in ("-wal", "-shm"):
        Path(str(path) + extra).unlink(missing_ok=True)
    damage(path)
    with pytest.raises(DocumentStoreOpenError) as exc:
        check_document_store(tmp_path, busy_timeout_s=0)
    assert str(path) in str(exc.value) and needle in str(exc.value)


def test_a_file_from_a_newer_schema_is_refused(tmp_path):
    _store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(DocumentStoreOpenError, match="schema version 99"):
        _store(tmp_path)


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DocumentStoreOpenError, match="data_dir: cannot create .*file"):
        _store(tmp_path / "file" / "sub")


# --- the HTTP API, in-process ----------------------------------------------------------------------


def _client(tmp_path, token=None, cached=None, **limits) -> TestClient:
    store = _store(tmp_path, **limits)
    app = create_app(SimpleNamespace(draining=False), Metrics("edge"), "tiny", store, token, cached)
    return TestClient(app)


def test_http_put_get_list_delete(tmp_path):
    http = _client(tmp_path, cached=lambda meta: meta.id == "warm")
    created = http.put("/v1/documents/normans", content=TEXT.encode(), headers={"Content-Type": "text/plain"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"] == "normans" and body["tokens"] == words(TEXT) and body["bytes"] == len(TEXT)
    assert body["etag"] == hashlib.sha256(TEXT.encode()).hexdigest() and created.headers["etag"] == f'"{body["etag"]}"'
    assert body["cached"] is False and body["created_at"].endswith("Z")
    replaced = http.put("/v1/documents/normans", content=b"new text")
    assert replaced.status_code == 200 and replaced.json()["version"] > body["version"]
    http.put("/v1/documents/warm", content="caf\u00e9".encode(), headers={"Content-Type": "text/plain; charset=utf-8"})
    meta = http.get("/v1/documents/warm").json()
    assert meta["cached"] is True and meta["bytes"] == 5 and "text" not in meta
    assert http.get("/v1/documents/warm/text").text == "caf\u00e9"
    listing = http.get("/v1/documents").json()
    assert [d["id"] for d in listing["documents"]] == ["normans", "warm"]
    assert listing["count"] == 2 and listing["bytes"] == len(b"new text") + 5
    assert http.delete("/v1/documents/normans").status_code == 204
    missing = http.get("/v1/documents/normans", headers={"X-Request-ID": "req-1"})
    assert missing.status_code == 404
    assert missing.json() == {
        "detail": "no document with id 'normans' on this edge",
        "error": "not_found",
        "request_id": "req-1",
    }
    assert http.delete("/v1/documents/normans").status_code == 404
    assert http.get("/v1/documents/normans/text").status_code == 404


@pytest.mark.parametrize("raw", ["a%2Fb", "a/b", "%2E%2E", "a..b", "a%0Ab", "x" * 129, "nul%00", "spa%20ce"])
def test_http_unsafe_ids_are_a_422_naming_the_rule(tmp_path, raw):
    http = _client(tmp_path)
    for method in ("GET", "PUT", "DELETE"):
        response = http.request(method, "/v1/documents/" + raw, content=b"text")
        assert response.status_code == 422, (method, raw, response.text)
        assert response.json()["error"] == "invalid" and ID_RULE in response.json()["detail"]
    assert http.get("/v1/documents").json()["count"] == 0


def test_http_body_limits_and_types(tmp_path):
    http = _client(tmp_path, max_document_bytes=50, max_document_tokens=3)
    too_big = http.put("/v1/documents/big", content=b"x" * 51)
    assert too_big.status_code == 413 and "51 bytes" in too_big.json()["detail"]
    assert "--max-document-bytes" in too_big.json()["detail"] and too_big.json()["error"] == "too_long"
    wordy = http.put("/v1/documents/wordy", content=b"a b c d")
    assert wordy.status_code == 413 and "4 tokens" in wordy.json()["detail"]
    chunked = http.put("/v1/documents/chunked", content=iter([b"a ", b"b"]))
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"]
    as_json = http.put("/v1/documents/j", json={"text": "hello"})
    assert as_json.status_code == 415 and "text/plain" in as_json.json()["detail"]
    latin1 = http.put("/v1/documents/l", content=b"x", headers={"Content-Type": "text/plain; charset=latin-1"})
    assert latin1.status_code == 415
    not_utf8 = http.put("/v1/documents/bad", content=b"caf\xe9", headers={"Content-Type": "text/plain"})
    assert not_utf8.status_code == 422 and "not UTF-8" in not_utf8.json()["detail"]
    empty = http.put("/v1/documents/empty", content=b"")
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    assert http.get("/v1/documents").json()["count"] == 0


def test_http_store_full_is_507(tmp_path):
    http = _client(tmp_path, max_documents=1)
    assert http.put("/v1/documents/one", content=b"x").status_code == 201
    full = http.put("/v1/documents/two", content=b"y")
    assert (
        full.status_code == 507 and full.json()["error"] == "store_full" and "--max-documents" in full.json()["detail"]
    )


def test_http_token_guards_the_documents_api_not_health(tmp_path):
    http = _client(tmp_path, token=TOKEN)
    for method, path in [
        ("GET", "/v1/documents"),
        ("PUT", "/v1/documents/a"),
        ("GET", "/v1/documents/a"),
        ("DELETE", "/v1/documents/a"),
    ]:
        none = http.request(method, path, content=b"x")
        assert none.status_code == 401 and none.json()["error"] == "unauthenticated", (method, path)
        assert none.headers["www-authenticate"] == 'Bearer realm="kvwire"'
        wrong = http.request(method, path, content=b"x", headers={"Authorization": "Bearer " + "w" * 32})
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    # the token comes before the size limit: a caller without it learns nothing about limits
    assert http.put("/v1/documents/a", content=b"x" * (5 << 20)).status_code == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http.get(path).status_code == 200
    ok = http.put("/v1/documents/a", content=b"x", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 201


def test_the_documents_gauge_follows_the_store(tmp_path):
    from kvwire.edge_agent.main import open_documents
    from kvwire.edge_agent.settings import EdgeSettings

    def tokenizer(text, add_special_tokens, split_special_tokens):
        assert add_special_tokens is False and split_special_tokens is True  # the literal count, no BOS
        return {"input_ids": list(range(len(text.split())))}

    metrics = Metrics("edge")
    settings = EdgeSettings(data_dir=str(tmp_path))
    store = open_documents(settings, tokenizer, metrics)
    store.put("a", "one two")
    store.put("b", "three")
    store.close()
    metrics = Metrics("edge")
    store = open_documents(settings, tokenizer, metrics)  # the gauge starts from what the file holds
    assert _gauge(metrics.render().decode()) == 2
    store.delete("a")
    assert _gauge(metrics.render().decode()) == 1 and store.get("b").tokens == 1


def test_the_default_data_dir_follows_xdg(monkeypatch, tmp_path):
    from kvwire.edge_agent.settings import EdgeSettings

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert EdgeSettings().documents_dir() == tmp_path / "kvwire-edge"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert EdgeSettings().documents_dir() == tmp_path / "home" / ".local" / "share" / "kvwire-edge"
    assert EdgeSettings(data_dir="~/docs").documents_dir() == tmp_path / "home" / "docs"


def _gauge(text: str) -> float:
    return next(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "kvwire_documents"
    )


# --- live daemons ----------------------------------------------------------------------------------


COMMON = ["--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--threads", "1"]


def _edge(name, tiny_model_dir, data_dir, *extra) -> Daemon:
    return Daemon(
        name,
        "kvwire.edge_agent",
        [*COMMON, "--model", tiny_model_dir, "--data-dir", str(data_dir), *extra],
        env=daemon_env(),
    )


@pytest.fixture(scope="module")
def restarted(tiny_model_dir, tmp_path_factory):
    """An edge that stored a document and was stopped, then a new edge (auth on) on the same data_dir."""
    data_dir = tmp_path_factory.mktemp("edge_data")
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    first = _edge("edge_first", tiny_model_dir, data_dir)
    try:
        first.wait_listening()
        put = httpx.put(first.http_url + "/v1/documents/normans", content=TEXT.encode(), timeout=60)
        assert put.status_code == 201, put.text
        before = put.json()
    finally:
        assert first.stop() == 0
    second = _edge("edge_second", tiny_model_dir, data_dir, "--auth-token-file", str(token_file))
    try:
        second.wait_listening()
        yield SimpleNamespace(edge=second, before=before, token_file=str(token_file), data_dir=data_dir)
    finally:
        second.stop()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_documents_survive_an_edge_restart(restarted):
    after = httpx.get(restarted.edge.http_url + "/v1/documents/normans", headers=_auth(), timeout=60)
    assert after.status_code == 200
    # `cached` is the prefix cache's state, not the document's: the new edge prefills it in the background
    unchanged = {k: v for k, v in after.json().items() if k != "cached"}
    assert unchanged == {k: v for k, v in restarted.before.items() if k != "cached"}
    text = httpx.get(restarted.edge.http_url + "/v1/documents/normans/text", headers=_auth(), timeout=60)
    assert text.text == TEXT
    assert restarted.edge.events("documents_opened")[0]["documents"] >= 1


def test_live_edge_asks_for_its_token(restarted):
    url = restarted.edge.http_url
    refused = httpx.get(url + "/v1/documents", timeout=60)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"
    assert httpx.put(url + "/v1/documents/x", content=b"x", timeout=60).status_code == 401
    assert httpx.get(url + "/healthz", timeout=60).status_code == 200
    metrics = httpx.get(url + "/metrics", timeout=60).text
    assert _gauge(metrics) == len(httpx.get(url + "/v1/documents", headers=_auth(), timeout=60).json()["documents"])


def test_cli_against_a_live_edge(restarted, tmp_path, monkeypatch, capsys):
    from kvwire.bench.main import main

    edge = ["--edge", restarted.edge.http_url.removeprefix("http://"), "--token-file", restarted.token_file]
    doc = tmp_path / "doc.txt"
    doc.write_text("Rollo led the Norse raiders.", encoding="utf-8")
    assert main(["docs", "put", "cli-doc", str(doc), *edge]) == 0
    assert capsys.readouterr().out.startswith("created cli-doc  version ")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("from stdin \u00e9".encode())))
    assert main(["docs", "put", "cli-doc", "-", *edge]) == 0
    assert capsys.readouterr().out.startswith("replaced cli-doc")
    assert main(["docs", "get", "cli-doc", "--text", *edge]) == 0
    assert capsys.readouterr().out == "from stdin \u00e9"
    assert main(["docs", "get", "cli-doc", *edge]) == 0
    assert "cli-doc  version" in capsys.readouterr().out
    assert main(["docs", "ls", *edge]) == 0
    listing = capsys.readouterr().out
    assert "cli-doc" in listing and "normans" in listing
    assert main(["docs", "rm", "cli-doc", *edge]) == 0
    assert capsys.readouterr().out == "deleted cli-doc\n"
    assert main(["docs", "rm", "cli-doc", *edge]) == 1
    assert "HTTP 404: no document with id 'cli-doc'" in capsys.readouterr().err
    assert main(["docs", "put", "..", str(doc), *edge]) == 1
    assert "HTTP 422" in capsys.readouterr().err
    assert main(["docs", "ls", "--edge", edge[1]]) == 1  # no token
    assert "HTTP 401" in capsys.readouterr().err


def test_cli_names_an_unreachable_edge(capsys):
    from kvwire.bench.main import main

    assert main(["docs", "ls", "--edge", "127.0.0.1:1"]) == 1
    assert "cannot reach the edge-agent at http://127.0.0.1:1" in capsys.readouterr().err


def test_locked_or_corrupt_store_stops_the_edge_with_exit_2(tmp_path):
    """Before any model loads (the model path does not exist): one line naming the file, exit 2."""
    locked, corrupt = tmp_path / "locked", tmp_path / "corrupt"
    _store(locked).close()
    corrupt.mkdir()
    (corrupt / DB_NAME).write_bytes(b"garbage, not SQLite " * 100)
    holder = sqlite3.connect(locked / DB_NAME, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        cases = {locked: "is locked by another process", corrupt: "is corrupt or not an SQLite file"}
        procs = {
            d: subprocess.Popen(
                [sys.executable, "-m", "kvwire.edge_agent", "--model", "/nonexistent/model", "--data-dir", str(d)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **daemon_env()},
            )
            for d in cases
        }
        for d, proc in procs.items():
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 2, err
            assert f"edge-agent: error: document store {str(d / DB_NAME)!r}" in err and cases[d] in err
            assert "Traceback" not in err
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False)],
)
def test_the_plain_http_token_warning_is_for_hosts_off_loopback(host, loopback):
    from kvwire.edge_agent.main import is_loopback

    assert is_loopback(host) is loopback
