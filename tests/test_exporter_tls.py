"""Optional TLS for the exporter, and client-certificate auth (issue 12): prometheus_client's own
parameters (``certfile``, ``keyfile``, ``client_cafile``, ``client_capath``, ``client_auth_required``) as
``metrics_*`` options, validated at ``install()``.  Certificates are made by ``openssl`` for each run."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import ConfigError
from loopwatch._config import resolve

from conftest import free_port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=d)
    return d


def _get(url: str, context: ssl.SSLContext | None) -> str:
    return urllib.request.urlopen(url, timeout=10, context=context).read().decode()


def _client(pki: Path, *, certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if certificate:
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
    return context


def _serve(pki: Path, tmp_path: Path, check, **options: object) -> None:  # noqa: ANN001
    async def main() -> None:
        agent = loopwatch.install(registry=CollectorRegistry(), metrics_port=free_port(), metrics_addr="127.0.0.1",
                                  dump_dir=tmp_path, metrics_certfile=pki / "server.pem",
                                  metrics_keyfile=pki / "server.key", **options)
        try:
            await asyncio.to_thread(check, agent.metrics_url)
        finally:
            loopwatch.uninstall()

    asyncio.run(main())


def test_the_exporter_serves_https_with_a_certificate_and_key(pki: Path, tmp_path: Path) -> None:
    def check(url: str) -> None:
        assert url.startswith("https://127.0.0.1:")
        assert "loopwatch_errors_total" in _get(url, _client(pki, certificate=False))
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _get(url.replace("https://", "http://"), None)  # plain HTTP gets no metrics

    _serve(pki, tmp_path, check)


def test_client_certificates_are_required_when_asked(pki: Path, tmp_path: Path) -> None:
    def check(url: str) -> None:
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, OSError)):
            _get(url, _client(pki, certificate=False))  # no client certificate: refused
        assert "loopwatch_errors_total" in _get(url, _client(pki, certificate=True))

    _serve(pki, tmp_path, check, metrics_client_cafile=pki / "ca.pem", metrics_client_auth_required=True)


def test_tls_options_are_validated_at_install(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics_certfile is set but metrics_keyfile is not"):
        resolve({"metrics_certfile": pki / "server.pem"}, environ={})
    with pytest.raises(ConfigError, match=r"^metrics_keyfile must be the path of a readable file, got '/nonexistent/key.pem'$"):
        resolve({"metrics_certfile": pki / "server.pem", "metrics_keyfile": "/nonexistent/key.pem"}, environ={})
    with pytest.raises(ConfigError, match=r"metrics_client_auth_required=True needs .* metrics_client_cafile"):
        resolve({"metrics_certfile": pki / "server.pem", "metrics_keyfile": pki / "server.key",
                 "metrics_client_auth_required": True}, environ={})
    with pytest.raises(ConfigError, match=r"metrics_client_cafile needs TLS"):
        resolve({"metrics_client_cafile": pki / "ca.pem"}, environ={})
    with pytest.raises(ConfigError, match=r"do not load as a PEM certificate"):
        resolve({"metrics_certfile": pki / "ca.pem", "metrics_keyfile": pki / "server.key"}, environ={})  # key mismatch
    with pytest.raises(ConfigError, match=r"LOOPWATCH_METRICS_CLIENT_AUTH_REQUIRED"):
        resolve({}, environ={"LOOPWATCH_METRICS_CLIENT_AUTH_REQUIRED": "maybe"})
    options = resolve({}, environ={"LOOPWATCH_METRICS_CERTFILE": str(pki / "server.pem"),
                                   "LOOPWATCH_METRICS_KEYFILE": str(pki / "server.key")})
    assert options.metrics_certfile == pki / "server.pem"
