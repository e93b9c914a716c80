"""`kvwire docs put|ls|get|rm`: the edge's documents API (/v1/documents on its HTTP port) for people.

Only httpx and the standard library: this module is the subcommand's argument module too, and must
not load torch (tests/test_cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import quote

import httpx

DEFAULT_EDGE = (
    "127.0.0.1:8081"  # edge_agent.settings.DEFAULT_HTTP_PORT, not imported: that would load pydantic settings
)
TIMEOUT_S = 300.0  # a put tokenizes the whole document on the edge before it answers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="docs_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--edge",
            default=DEFAULT_EDGE,
            metavar="HOST:PORT",
            help=f"the edge-agent's HTTP port (its --http-port), or a URL (default: {DEFAULT_EDGE})",
        )
        p.add_argument(
            "--token-file", metavar="FILE", help="file holding the edge's bearer token (its --auth-token-file)"
        )
        return p

    put = action("put", "store a document's text under an id (created, or replaced with a new version)")
    put.add_argument("id", help="document id: letters, digits, '.', '_', '-' (1-128)")
    put.add_argument("file", help="UTF-8 text file to store, or - for standard input")
    action("ls", "list the edge's documents")
    get = action("get", "show one document's metadata (or its text, with --text)")
    get.add_argument("id")
    get.add_argument("--text", action="store_true", help="print the document's text instead of its metadata")
    get.add_argument("--json", action="store_true", help="print the metadata as JSON")
    rm = action("rm", "delete a document")
    rm.add_argument("id")


def base_url(edge: str) -> str:
    """http://HOST:PORT from HOST:PORT (a URL is kept as given)."""
    edge = edge.strip().rstrip("/")
    return edge if "://" in edge else f"http://{edge}"


def _headers(token_file: str | None) -> dict[str, str]:
    if not token_file:
        return {}
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"kvwire docs: error: --token-file {token_file!r}: {exc.strerror}") from None
    return {"Authorization": f"Bearer {token}"}


def _fail(response: httpx.Response) -> int:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    print(f"kvwire docs: error: HTTP {response.status_code}: {detail}", file=sys.stderr)
    return 1


def _line(meta: dict) -> str:
    return (
        f"{meta['id']}  version {meta['version']}  {meta['tokens']} tokens  {meta['bytes']} bytes  "
        f"updated {meta['updated_at']}{'  cached' if meta.get('cached') else ''}"
    )


def run(args: argparse.Namespace) -> int:
    url = base_url(args.edge) + "/v1/documents"
    headers = _headers(args.token_file)
    try:
        with httpx.Client(headers=headers, timeout=TIMEOUT_S) as client:
            return _run(client, url, args)
    except httpx.TransportError as exc:
        print(f"kvwire docs: error: cannot reach the edge-agent at {base_url(args.edge)}: {exc}", file=sys.stderr)
        return 1


def _doc_url(url: str, doc_id: str) -> str:
    """The document's URL, the id percent-quoted (a slash too) so that the edge, not the client, judges it;
    an id of dots only is quoted as %2E, which clients do not fold away as a '.' or '..' path segment."""
    quoted = quote(doc_id, safe="")
    return f"{url}/{quoted.replace('.', '%2E') if set(doc_id) <= {'.'} else quoted}"


def _run(client: httpx.Client, url: str, args: argparse.Namespace) -> int:
    command = args.docs_command
    if command == "ls":
        response = client.get(url)
        if response.status_code != 200:
            return _fail(response)
        listing = response.json()
        for meta in listing["documents"]:
            print(_line(meta))
        print(f"{listing['count']} documents, {listing['bytes']} bytes")
        return 0
    if command == "put":
        data = sys.stdin.buffer.read() if args.file == "-" else _read(args.file)
        response = client.put(
            _doc_url(url, args.id), content=data, headers={"Content-Type": "text/plain; charset=utf-8"}
        )
        if response.status_code not in (200, 201):
            return _fail(response)
        print(("created " if response.status_code == 201 else "replaced ") + _line(response.json()))
        return 0
    if command == "get":
        response = client.get(_doc_url(url, args.id) + ("/text" if args.text else ""))
        if response.status_code != 200:
            return _fail(response)
        if args.text:
            sys.stdout.write(response.text)
        elif args.json:
            print(json.dumps(response.json(), indent=2))
        else:
            meta = response.json()
            print(_line(meta))
            print(f"etag {meta['etag']}  created {meta['created_at']}")
        return 0
    response = client.delete(_doc_url(url, args.id))  # rm
    if response.status_code != 204:
        return _fail(response)
    print(f"deleted {args.id}")
    return 0


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"kvwire docs: error: cannot read {path!r}: {exc.strerror}") from None
