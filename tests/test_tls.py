"""HTTPS: certificates are verified (RELIABILITY H5), against certifi's bundle by default.

A real TLS server on 127.0.0.1 with certificates from a throwaway CA (``trustme``). A publicly
trusted certificate for 127.0.0.1 can't be made here, so the tests that need our transport to
trust the throwaway CA point ``REQUESTS_CA_BUNDLE`` at it (which the client honours too); the
refusal test uses certifi's bundle, which has never heard of that CA. The tests at the end
name the CA each way there is: ``ca_bundle`` (a file or a hashed directory), the variables.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from servers import TLSServer, serve_tls

from durable_analytics.errors import ConfigurationError
from durable_analytics.transport import HTTPTransport, SendFailed

PAYLOAD = ['{"event":"e","event_id":"00000000-0000-4000-8000-000000000001"}']


@pytest.fixture(autouse=True)
def _no_ca_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's CA settings don't decide what these tests see (conftest clears its
    proxy settings)."""
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server_for_loopback(ca: trustme.CA) -> Iterator[TLSServer]:
    server = serve_tls(ca, "127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def trusting_ca(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))


def test_a_certificate_from_an_unknown_authority_is_refused_before_anything_is_sent(
    server_for_loopback: TLSServer, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    transport = HTTPTransport(base_url=server_for_loopback.url, app_id="test-app", timeout=5.0)
    with pytest.raises(SendFailed) as caught:
        transport.send(PAYLOAD)
    assert "certificate" in str(caught.value).lower()
    assert caught.value.timed_out is False

    key = "sk_tls_NEVER_LEAK"
    with caplog.at_level(logging.DEBUG, logger="durable_analytics"):
        client = make_client(base_url=server_for_loopback.url, write_key=key)
        client.track("u", "e")
        assert client.flush(timeout=0.5) is False
        assert client.queue_depth() == 1  # kept on disk for when the certificate is fixed
        client.shutdown(timeout=0.1)
    assert server_for_loopback.posts == 0
    assert key not in caplog.text


@pytest.mark.usefixtures("trusting_ca")
def test_a_trusted_certificate_delivers_over_one_kept_alive_connection(
    server_for_loopback: TLSServer, make_client: Any
) -> None:
    transport = HTTPTransport(base_url=server_for_loopback.url, app_id="test-app")
    for _ in range(3):
        assert transport.send(PAYLOAD).status == 202
    assert transport._get_pool().num_connections == 1
    assert server_for_loopback.posts == 3

    client = make_client(base_url=server_for_loopback.url)
    client.track("u", "e")
    assert client.flush(timeout=10)
    assert server_for_loopback.posts == 4


@pytest.mark.usefixtures("trusting_ca")
def test_a_trusted_certificate_for_another_host_name_is_refused(ca: trustme.CA) -> None:
    server = serve_tls(ca, "ingest.example.org")
    try:
        transport = HTTPTransport(base_url=server.url, app_id="test-app", timeout=5.0)
        with pytest.raises(SendFailed) as caught:
            transport.send(PAYLOAD)
        message = str(caught.value).lower()
        assert "hostname" in message or "ip address mismatch" in message, message
        assert server.posts == 0
    finally:
        server.close()


# --- which CAs are trusted: ca_bundle, the environment, certifi ------------------------------


def test_ca_bundle_as_a_file_is_trusted(
    server_for_loopback: TLSServer, ca: trustme.CA, tmp_path: Path
) -> None:
    """ca_bundle=<a PEM file> (str or Path) holding the CA: delivered."""
    bundle = tmp_path / "corporate-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    for given in (str(bundle), bundle):
        transport = HTTPTransport(base_url=server_for_loopback.url, app_id="a", ca_bundle=given)
        assert transport.send(PAYLOAD).status == 202
        transport.close()
    assert server_for_loopback.posts == 2


def test_ca_bundle_as_a_hashed_directory_is_trusted(
    server_for_loopback: TLSServer, ca: trustme.CA, tmp_path: Path
) -> None:
    """ca_bundle=<a directory made by `openssl rehash`>: delivered; the same directory
    without the CA in it: refused."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to hash a certificate directory"
    certs = tmp_path / "certs"
    certs.mkdir()
    ca.cert_pem.write_to_path(str(certs / "corporate-ca.pem"))
    subprocess.run([openssl, "rehash", str(certs)], check=True, capture_output=True)
    assert any(p.name.endswith(".0") for p in certs.iterdir())  # the hash link exists
    transport = HTTPTransport(base_url=server_for_loopback.url, app_id="a", ca_bundle=certs)
    assert transport.send(PAYLOAD).status == 202
    transport.close()

    empty = tmp_path / "empty"
    empty.mkdir()
    refusing = HTTPTransport(base_url=server_for_loopback.url, app_id="a", ca_bundle=empty)
    with pytest.raises(SendFailed, match=r"(?i)certificate"):
        refusing.send(PAYLOAD)
    refusing.close()
    assert server_for_loopback.posts == 1


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_the_ca_bundle_variables_are_honoured(
    variable: str,
    server_for_loopback: TLSServer,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ca_bundle=None: REQUESTS_CA_BUNDLE, or SSL_CERT_FILE, names the CA file to trust."""
    bundle = tmp_path / "env-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv(variable, str(bundle))
    transport = HTTPTransport(base_url=server_for_loopback.url, app_id="a")
    assert transport.send(PAYLOAD).status == 202
    transport.close()


def test_requests_ca_bundle_wins_over_ssl_cert_file_and_ca_bundle_over_both(
    server_for_loopback: TLSServer, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order: the ca_bundle argument, then REQUESTS_CA_BUNDLE, then SSL_CERT_FILE."""
    good = tmp_path / "good.pem"
    ca.cert_pem.write_to_path(str(good))
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    url = server_for_loopback.url

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(good))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    assert HTTPTransport(base_url=url, app_id="a").send(PAYLOAD).status == 202
    with pytest.raises(SendFailed, match=r"(?i)certificate"):
        HTTPTransport(base_url=url, app_id="a", ca_bundle=other).send(PAYLOAD)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(good))
    assert HTTPTransport(base_url=url, app_id="a", ca_bundle=good).send(PAYLOAD).status == 202
    assert server_for_loopback.posts == 2


def test_a_ca_bundle_that_does_not_exist_is_refused_at_construction(tmp_path: Path) -> None:
    """A clear ConfigurationError naming ca_bundle, for the argument and for the variable."""
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ConfigurationError) as caught:
        HTTPTransport(base_url="https://127.0.0.1:9", app_id="a", ca_bundle=missing)
    assert caught.value.option == "ca_bundle"
    assert str(missing) in str(caught.value)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REQUESTS_CA_BUNDLE", str(missing))
        with pytest.raises(ConfigurationError, match="REQUESTS_CA_BUNDLE"):
            HTTPTransport(base_url="https://127.0.0.1:9", app_id="a")
        # Plain HTTP never reads it: a wrong machine-wide setting doesn't break it.
        HTTPTransport(base_url="http://127.0.0.1:9", app_id="a")
