"""TLS, mutual TLS and bearer tokens switched on by settings, between real daemons on loopback.

A throwaway PKI is made per module with `cryptography`. Three daemons serve every test: a TLS edge
whose certificate names only edge.kvwire.test and which asks for a token, a mutual-TLS edge, and an
HTTPS cloud with a token of its own that reaches the TLS edge by 127.0.0.1 with
--edge-server-name. Cloud set-ups that must fail (no CA, wrong CA, wrong token, no client
certificate) are built in-process from CloudSettings with the same functions cloud-agent's main
uses, against the real edges; bad start-up settings run the real console entry points.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from edges import daemon_env
from fastapi.testclient import TestClient

from kvwire.agent_common.metrics import Metrics
from kvwire.cloud_agent.main import check_security, edge_client
from kvwire.cloud_agent.settings import CloudSettings
from tests.test_daemons import CONTEXT, QUESTION, _start, metric_samples, ok

EDGE_NAME = "edge.kvwire.test"  # the TLS edge's certificate names only this host: the cloud needs --edge-server-name
UNAUTHENTICATED = ("kvwire_requests_total", (("mode", "unknown"), ("outcome", "unauthenticated")))


# --- a throwaway PKI ---------------------------------------------------------------------------


def _pki(folder: Path) -> SimpleNamespace:
    """CA, other CA, server certificates (127.0.0.1 + localhost; edge.kvwire.test), client certificate, token files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    files = {}

    def write(name: str, data: bytes) -> str:
        path = folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        files[name] = str(path)
        return str(path)

    def issue(cn: str, issuer=None, ca=False, san=(), usage=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(key.public_key())
            .issuer_name(issuer[1].subject if issuer else subject)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
        return key, cert

    def save(stem: str, pair) -> None:
        key, cert = pair
        write(f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
        write(
            f"{stem}.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )

    ca, other = issue("kvwire test CA", ca=True), issue("some other CA", ca=True)
    save("ca", ca)
    save("other-ca", other)
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    save("server", issue("kvwire server", ca, san=loopback, usage=ExtendedKeyUsageOID.SERVER_AUTH))
    save("edge", issue(EDGE_NAME, ca, san=[x509.DNSName(EDGE_NAME)], usage=ExtendedKeyUsageOID.SERVER_AUTH))
    save("client", issue("cloud-agent", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    save("stranger", issue("cloud-agent", other, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    write("edge.token", b"edge-token-0123456789abcdef\n")
    write("cloud.token", b"cloud-token-0123456789abcdef\n")
    write("wrong.token", b"wrong-token-0123456789abcdef\n")
    write("short.token", b"tooshort\n")
    return SimpleNamespace(**{name.replace(".", "_").replace("-", "_"): path for name, path in files.items()})


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    return _pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure(tiny_model_dir, pki):
    """edge_tls (TLS + token), edge_mtls (mutual TLS), cloud (HTTPS + token, TLS + token to edge_tls)."""
    started = []
    try:
        model = ["--model", tiny_model_dir, "--grpc-port", "0"]
        edge_tls = _start(
            "edge_tls",
            "kvwire.edge_agent",
            [
                *model,
                "--tls-cert-file",
                pki.edge_pem,
                "--tls-key-file",
                pki.edge_key,
                "--auth-token-file",
                pki.edge_token,
            ],
        )
        edge_mtls = _start(
            "edge_mtls",
            "kvwire.edge_agent",
            [
                *model,
                "--tls-cert-file",
                pki.server_pem,
                "--tls-key-file",
                pki.server_key,
                "--tls-client-ca-file",
                pki.ca_pem,
            ],
        )
        started += [edge_tls, edge_mtls]
        edge_tls.wait_listening()
        cloud = _start(
            "cloud",
            "kvwire.cloud_agent",
            [
                "--model",
                tiny_model_dir,
                "--tls-cert-file",
                pki.server_pem,
                "--tls-key-file",
                pki.server_key,
                "--auth-token-file",
                pki.cloud_token,
                "--edge",
                edge_tls.grpc_address,
                "--edge-ca-file",
                pki.ca_pem,
                "--edge-server-name",
                EDGE_NAME,
                "--edge-token-file",
                pki.edge_token,
            ],
        )
        started.append(cloud)
        edge_mtls.wait_listening()
        cloud.wait_listening()
        yield SimpleNamespace(
            edge_tls=edge_tls,
            edge_mtls=edge_mtls,
            cloud=cloud,
            cloud_url=f"https://127.0.0.1:{cloud.listening['http_port']}",
            verify=ssl.create_default_context(cafile=pki.ca_pem),
        )
    finally:
        for d in started:
            d.terminate()
        for d in started:
            d.stop()


def edge_metrics(edge) -> dict:
    return metric_samples(f"http://127.0.0.1:{edge.listening['http_port']}")


def metric_samples_https(s) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    page = httpx.get(s.cloud_url + "/metrics", verify=s.verify, timeout=10).text
    return {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for f in text_string_to_metric_families(page)
        for x in f.samples
    }


def ask_cloud(s, token: str | None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(
        s.cloud_url + "/answer",
        json={"question": QUESTION, "context": CONTEXT, **body},
        headers=headers,
        verify=s.verify,
        timeout=120,
    )


def read(path: str) -> str:
    return Path(path).read_text().strip()


@pytest.fixture
def cloud_in_process(tiny_loaded):
    """Build in-process clouds against the real edges: `make(edge_daemon, **cloud options)` -> TestClient."""
    from kvwire.cloud_agent.app import create_app
    from kvwire.cloud_agent.service import AnswerService

    opened = []

    def make(edge, **options) -> TestClient:
        settings = CloudSettings(edge=edge.grpc_address, **options)
        security = check_security(settings)
        client = edge_client(settings, security)
        metrics = Metrics("cloud")
        service = AnswerService(tiny_loaded, settings, client, metrics)
        http = TestClient(create_app(service, metrics, settings.max_body_bytes, security.auth_token))
        opened.append((service, client))
        return http

    yield make
    for service, client in opened:
        service.close()
        client.close()


# --- the happy path ----------------------------------------------------------------------------


def test_kv_answer_over_tls_with_tokens_equals_the_text_answer(secure, pki):
    token = read(pki.cloud_token)
    text = ok(ask_cloud(secure, token, mode="text", max_new_tokens=12))
    kv = ok(ask_cloud(secure, token, mode="kv", profile="fp16", retention=1.0, max_new_tokens=12))
    assert text["answer"] and kv["answer"] == text["answer"] and kv["bytes_on_wire"] > 0
    scout = ok(ask_cloud(secure, token, mode="scout", retention=1.0, max_new_tokens=12))
    assert scout["answer"] == text["answer"]
    assert secure.cloud.listening["scheme"] == "https" and secure.cloud.listening["edge_tls"] == "tls"
    assert secure.edge_tls.listening["grpc_tls"] == "tls" and secure.edge_tls.listening["token"] is True


def test_health_readiness_and_metrics_stay_open(secure):
    for url, verify in (
        (secure.cloud_url, secure.verify),
        (f"http://127.0.0.1:{secure.edge_tls.listening['http_port']}", True),
    ):
        assert httpx.get(url + "/healthz", verify=verify, timeout=10).status_code == 200
        assert httpx.get(url + "/metrics", verify=verify, timeout=10).status_code == 200
        # the cloud's /readyz runs grpc.health on the TLS edge without a token: it must stay open too
        ready = httpx.get(url + "/readyz", verify=verify, timeout=10)
        assert ready.status_code == 200, ready.text


def test_the_cloud_http_port_speaks_only_https(secure):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{secure.cloud.listening['http_port']}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):  # an unknown CA: the client refuses the cloud's certificate
        httpx.get(secure.cloud_url + "/healthz", timeout=5)


# --- bearer tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent, challenge",
    [
        (None, 'Bearer realm="kvwire"'),
        ("wrong-token-0123456789abcdef", 'Bearer realm="kvwire", error="invalid_token"'),
    ],
)
def test_missing_or_wrong_token_is_401_and_counted(secure, sent, challenge):
    before = metric_samples_https(secure).get(UNAUTHENTICATED, 0)
    reply = ask_cloud(secure, sent, mode="kv")
    assert reply.status_code == 401, reply.text
    assert reply.headers["www-authenticate"] == challenge
    body = reply.json()
    assert body["error"] == "unauthenticated" and "Authorization" in body["detail"] and body["request_id"]
    assert "0123456789" not in reply.text  # the token is never echoed
    assert metric_samples_https(secure)[UNAUTHENTICATED] == before + 1


def test_the_token_is_asked_before_the_body_size_is_checked(secure):
    reply = httpx.post(
        secure.cloud_url + "/answer",
        content=b"x" * (5 << 20),
        verify=secure.verify,
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 401, reply.text


@pytest.mark.parametrize(
    "token_file, needle",
    [
        ("wrong_token", "refused this cloud-agent's token; check edge_token_file"),
        (None, "requires a bearer token and this cloud-agent sends none"),
    ],
)
def test_edge_refusing_the_cloud_token_is_502_and_counted_on_the_edge(
    secure, pki, cloud_in_process, token_file, needle
):
    before = edge_metrics(secure.edge_tls).get(UNAUTHENTICATED, 0)
    cloud = cloud_in_process(
        secure.edge_tls,
        edge_ca_file=pki.ca_pem,
        edge_server_name=EDGE_NAME,
        edge_token_file=getattr(pki, token_file) if token_file else None,
    )
    reply = cloud.post("/answer", json={"question": QUESTION, "context": CONTEXT, "mode": "kv"})
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"] == "edge_unauthenticated" and needle in reply.json()["detail"]
    assert edge_metrics(secure.edge_tls)[UNAUTHENTICATED] == before + 1
    ready = cloud.get("/readyz")  # grpc.health needs no token, but /readyz also probes this cloud's token
    assert ready.status_code == 503 and "edge_token_file" in ready.json()["reason"], ready.text


# --- TLS failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, needle",
    [
        ({}, "if it serves TLS (tls_cert_file), give this cloud-agent --edge-ca-file"),
        (
            {"edge_ca_file": "other_ca_pem", "edge_server_name": EDGE_NAME},
            "TLS handshake failed: check that --edge-ca-file",
        ),
        ({"edge_ca_file": "ca_pem"}, "does not name the host in --edge"),
    ],
)
def test_cloud_that_cannot_verify_the_tls_edge_gets_503(secure, pki, cloud_in_process, options, needle):
    options = {k: getattr(pki, v) if k.endswith("_file") else v for k, v in options.items()}
    cloud = cloud_in_process(secure.edge_tls, edge_token_file=pki.edge_token, **options)
    reply = cloud.post("/answer", json={"question": QUESTION, "context": CONTEXT, "mode": "kv", "max_new_tokens": 2})
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"] == "edge_unavailable" and needle in reply.json()["detail"]
    ready = cloud.get("/readyz")
    assert ready.status_code == 503 and needle in ready.json()["reason"]
    assert (
        cloud.post(
            "/answer", json={"question": QUESTION, "context": CONTEXT, "mode": "text", "max_new_tokens": 2}
        ).status_code
        == 200
    )


@pytest.mark.parametrize("client", [None, "stranger"])
def test_mutual_tls_edge_refuses_a_cloud_without_a_certificate_it_trusts(secure, pki, cloud_in_process, client):
    extra = (
        {"edge_cert_file": getattr(pki, f"{client}_pem"), "edge_key_file": getattr(pki, f"{client}_key")}
        if client
        else {}
    )
    cloud = cloud_in_process(secure.edge_mtls, edge_ca_file=pki.ca_pem, **extra)
    reply = cloud.post("/answer", json={"question": QUESTION, "context": CONTEXT, "mode": "scout", "max_new_tokens": 2})
    assert reply.status_code == 503, reply.text
    assert "unreachable" in reply.json()["detail"]
    if client is None:
        assert "--edge-cert-file and --edge-key-file" in reply.json()["detail"]


def test_mutual_tls_edge_serves_a_cloud_with_a_client_certificate(secure, pki, cloud_in_process):
    cloud = cloud_in_process(
        secure.edge_mtls, edge_ca_file=pki.ca_pem, edge_cert_file=pki.client_pem, edge_key_file=pki.client_key
    )
    text = ok(
        cloud.post("/answer", json={"question": QUESTION, "context": CONTEXT, "mode": "text", "max_new_tokens": 8})
    )
    kv = ok(
        cloud.post(
            "/answer",
            json={"question": QUESTION, "context": CONTEXT, "mode": "kv", "profile": "fp16", "max_new_tokens": 8},
        )
    )
    assert kv["answer"] == text["answer"] and kv["bytes_on_wire"] > 0
    assert secure.edge_mtls.listening["grpc_tls"] == "mutual"


# --- bad start-up settings ---------------------------------------------------------------------

BAD_SETTINGS = [
    (
        "kvwire.edge_agent",
        ["--tls-cert-file", "server_pem", "--tls-key-file", "client_key"],
        "tls_key_file: '{client_key}' is not the private key of the certificate",
    ),
    (
        "kvwire.edge_agent",
        ["--tls-cert-file", "server_pem"],
        "tls_cert_file given without tls_key_file: set both or neither",
    ),
    ("kvwire.edge_agent", ["--tls-client-ca-file", "ca_pem"], "tls_client_ca_file need tls_cert_file"),
    (
        "kvwire.edge_agent",
        ["--tls-cert-file", "server_key", "--tls-key-file", "server_key"],
        "must be a PEM certificate",
    ),
    ("kvwire.edge_agent", ["--auth-token-file", "short_token"], "has 8 characters; use at least 16"),
    (
        "kvwire.cloud_agent",
        ["--edge-ca-file", "/nonexistent/ca.pem"],
        "edge_ca_file: '/nonexistent/ca.pem' does not exist",
    ),
    (
        "kvwire.cloud_agent",
        ["--edge-ca-file", "server_key"],
        "edge_ca_file: '{server_key}' holds no PEM CA certificate",
    ),
    ("kvwire.cloud_agent", ["--edge-cert-file", "client_pem", "--edge-key-file", "client_key"], "need edge_ca_file"),
    (
        "kvwire.cloud_agent",
        ["--edge-token-file", "/nonexistent/token"],
        "edge_token_file: '/nonexistent/token' does not exist",
    ),
    ("kvwire.cloud_agent", ["--tls-cert-file", "server_pem", "--tls-key-file", "client_key"], "is not the private key"),
]


def test_bad_security_settings_exit_2_with_one_clear_line(pki):
    """Every case exits before any model loads (the model path does not even exist)."""

    def args(values):
        return [getattr(pki, v, v) for v in values]

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, "--model", "/nonexistent/model", *args(values)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **daemon_env()},
        )
        for module, values, _ in BAD_SETTINGS
    ]
    for proc, (module, values, needle) in zip(procs, BAD_SETTINGS):
        # a hang guard, not a speed check: three cold starts at once on a loaded host once took over 60 s
        _, err = proc.communicate(timeout=600)
        expected = needle.format(**vars(pki))
        assert proc.returncode == 2, (module, values, err)
        assert expected in err and "Traceback" not in err, (module, values, err)
        prog = module.removeprefix("kvwire.").replace("_", "-")
        assert f"{prog}: error:" in err


# --- the pieces, in-process --------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, accepted",
    [
        ("Bearer cloud-token-0123456789abcdef", True),
        ("bearer  cloud-token-0123456789abcdef ", True),  # the scheme is case-insensitive (RFC 7235)
        ("Bearer cloud-token-0123456789abcde", False),
        ("Basic cloud-token-0123456789abcdef", False),
        ("cloud-token-0123456789abcdef", False),
        ("", False),
        (None, False),
    ],
)
def test_bearer_header_parsing(header, accepted):
    from kvwire.agent_common.security import bearer_matches

    assert bearer_matches(header, "cloud-token-0123456789abcdef") is accepted


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\n", "is empty"),
        (b"two words-0123456789abcdef\n", "may hold only letters"),
        (b"caf\xc3\xa9-0123456789abcdef", "may hold only letters"),
    ],
)
def test_token_files_are_checked(tmp_path, content, needle):
    from kvwire.agent_common.security import SecurityConfigError, read_token

    path = tmp_path / "t.token"
    path.write_bytes(content)
    with pytest.raises(SecurityConfigError, match=needle):
        read_token(str(path), "auth_token_file")


def test_refusals_map_to_401_502_and_unauthenticated():
    import grpc

    from kvwire.agent_common.errors import EdgeRefusedTokenError, UnauthenticatedError
    from kvwire.agent_common.grpc_status import status_of
    from kvwire.cloud_agent.errors import classify

    assert classify(UnauthenticatedError("x")) == (401, "unauthenticated")
    assert classify(EdgeRefusedTokenError("x")) == (502, "edge_unauthenticated")
    assert status_of(UnauthenticatedError("x"))[:2] == (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")


def test_start_up_warns_about_a_token_in_clear_or_readable_by_all(tmp_path, caplog):
    import logging

    from kvwire.agent_common.daemon import warn_if_exposed

    path = tmp_path / "t.token"
    path.write_text("x" * 20)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        warn_if_exposed(logging.getLogger("t"), str(path), "auth_token_file", False, "the gRPC port is plaintext")
    assert [r.getMessage() for r in caplog.records] == ["token_in_clear", "token_file_readable"]
    caplog.clear()
    path.chmod(0o600)
    warn_if_exposed(logging.getLogger("t"), str(path), "auth_token_file", True, "")
    assert not caplog.records
