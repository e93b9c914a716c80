"""TLS material and bearer tokens, read and checked once at start-up before any model loads.

Every problem is a SecurityConfigError whose message names the setting and the file, so a
daemon exits at once with one line an operator can act on instead of failing at the first
handshake. Nothing here keeps a token in a log line or an error message.
"""

from __future__ import annotations

import hmac
import os
import ssl
import string
from pathlib import Path

import grpc

from kvwire.agent_common.errors import UnauthenticatedError

# RFC 6750 b64token characters: a token must fit an HTTP header and gRPC metadata unchanged.
TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~+/=")
# 16 characters of secrets.token_urlsafe carry 96 bits: below that a token can be guessed.
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


class SecurityConfigError(ValueError):
    """A TLS file or token file that cannot serve: missing, unreadable, malformed, or not matching its pair."""


def read_file(path: str, setting: str) -> bytes:
    """The bytes of `path`, or a SecurityConfigError that names `setting`."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(f"{setting}: {path!r} does not exist") from None
    except IsADirectoryError:
        raise SecurityConfigError(f"{setting}: {path!r} is a directory, not a file") from None
    except OSError as exc:
        raise SecurityConfigError(f"{setting}: cannot read {path!r} ({exc.strerror})") from None


def read_token(path: str, setting: str) -> str:
    """The bearer token in `path` (surrounding whitespace and the final newline dropped), checked for shape and length."""
    try:
        token = read_file(path, setting).decode("ascii").strip()
    except UnicodeDecodeError:
        token = "\x00"  # refused below as a bad character
    if not token:
        raise SecurityConfigError(f"{setting}: {path!r} is empty; put one token in it, e.g. the output of {MAKE_TOKEN}")
    if not set(token) <= TOKEN_CHARS:
        raise SecurityConfigError(
            f"{setting}: the token in {path!r} may hold only letters, digits and -._~+/= "
            f"(one line, no spaces), e.g. the output of {MAKE_TOKEN}"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise SecurityConfigError(
            f"{setting}: the token in {path!r} has {len(token)} characters; use at least "
            f"{MIN_TOKEN_CHARS}, e.g. the output of {MAKE_TOKEN}"
        )
    return token


def readable_by_others(path: str) -> bool:
    """True when group or other users may read `path` (a secret file should be 0600 or 0640 to a service group)."""
    return bool(os.stat(path).st_mode & 0o004)


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization value is `Bearer <token>` (scheme case-insensitive), compared in constant time."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def bearer_refusal(authorization: str | None, token: str | None, daemon: str) -> UnauthenticatedError | None:
    """Why an HTTP request to a protected path of `daemon` is refused (None: let it in). No token
    configured: nothing is asked."""
    if token is None or bearer_matches(authorization, token):
        return None
    if authorization is None:
        return UnauthenticatedError(
            f"this {daemon} requires the header 'Authorization: Bearer <token>' (the token in its auth_token_file)"
        )
    return UnauthenticatedError(
        f"the bearer token in the Authorization header is not the one this {daemon} accepts", token_sent=True
    )


def www_authenticate(exc: UnauthenticatedError) -> dict[str, str]:
    """RFC 6750: the scheme, and error="invalid_token" when a token was sent but wrong."""
    return {"WWW-Authenticate": 'Bearer realm="kvwire"' + (', error="invalid_token"' if exc.token_sent else "")}


def _no_password() -> bytes:
    raise SecurityConfigError("encrypted")


def check_key_pair(cert_file: str, key_file: str, cert_setting: str, key_setting: str) -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM), checked to parse and to belong together."""
    cert, key = read_file(cert_file, cert_setting), read_file(key_file, key_setting)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    except SecurityConfigError:
        raise SecurityConfigError(
            f"{key_setting}: {key_file!r} is encrypted; gRPC and uvicorn need an unencrypted PEM key "
            f"(keep it 0600 instead), e.g. `openssl pkey -in {key_file} -out plain.key`"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise SecurityConfigError(
                f"{key_setting}: {key_file!r} is not the private key of the certificate in {cert_setting} {cert_file!r}"
            ) from None
        raise SecurityConfigError(
            f"{cert_setting} {cert_file!r} and {key_setting} {key_file!r} must be a PEM certificate "
            f"(chain) and its PEM private key ({exc.reason or exc})"
        ) from None
    return cert, key


def read_ca(ca_file: str, setting: str) -> bytes:
    """The PEM CA bundle in `ca_file`, checked to hold at least one certificate."""
    data = read_file(ca_file, setting)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise SecurityConfigError(f"{setting}: {ca_file!r} holds no PEM CA certificate ({exc.reason or exc})") from None
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None) -> grpc.ServerCredentials:
    """TLS for a gRPC server port; with a client CA, mutual TLS: clients must present a certificate it signed."""
    cert, key = check_key_pair(cert_file, key_file, "tls_cert_file", "tls_key_file")
    client_ca = read_ca(client_ca_file, "tls_client_ca_file") if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(ca_file: str, cert_file: str | None, key_file: str | None) -> grpc.ChannelCredentials:
    """TLS for a gRPC channel that trusts `ca_file`; with a certificate and key, the client side of mutual TLS."""
    ca = read_ca(ca_file, "edge_ca_file")
    cert = key = None
    if cert_file and key_file:
        cert, key = check_key_pair(cert_file, key_file, "edge_cert_file", "edge_key_file")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
