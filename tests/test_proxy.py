"""Proxies: HTTPTransport goes through a real forwarding proxy when told to, or when the
environment says so (as requests does), and never leaks the proxy's password.

The proxy is proxy.py (the ``proxy.py`` package), run as a subprocess on 127.0.0.1: it forwards
absolute-URI requests for ``http://`` and opens ``CONNECT`` tunnels for ``https://``, and writes
one access-log line per request, which is how a test knows the proxy carried it. The
HTTPS target is a TLS server with a throwaway CA (tests/servers.py, shared with test_tls.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from servers import DripServer, TLSServer, serve_tls

from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import ConfigurationError
from durable_analytics.transport import HTTPTransport, SendFailed

PAYLOAD = [json.dumps({"event": "e", "event_id": "00000000-0000-4000-8000-000000000001"})]
PROXY_VARIABLES = ("https_proxy", "http_proxy", "all_proxy", "no_proxy")
STARTUP = 30.0


class ProxyServer:
    """proxy.py in a subprocess on 127.0.0.1, its access log in a file."""

    def __init__(self, workdir: Path, *options: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        port_file = workdir / "port"
        self.log = workdir / "proxy.log"
        # Its own HOME: proxy.py keeps state under ~/.proxy.
        env = {**os.environ, "HOME": str(workdir)}
        for name in PROXY_VARIABLES:
            env.pop(name, None)
            env.pop(name.upper(), None)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0",
                 "--port-file", str(port_file), "--num-acceptors", "1", "--threaded",
                 *options],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=workdir,
            )  # fmt: skip
        deadline = time.monotonic() + STARTUP
        while True:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "proxy.py did not start:\n" + self.log.read_text()
            text = port_file.read_text().strip() if port_file.exists() else ""
            if text.isdigit() and self._accepts(int(text)):
                self.port = int(text)
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    def saw(self, needle: str, timeout: float = 10.0) -> bool:
        """Whether an access-log line containing ``needle`` appears within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.log.read_text().splitlines() if "access_log" in ln]
            if any(needle in line for line in lines):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    server = ProxyServer(tmp_path_factory.mktemp("proxy"))
    yield server
    server.close()


PROXY_USER, PROXY_PASSWORD = "analytics", "pr0xy-P@ss:word"
# In a URL the password's '@' and ':' are percent-encoded.
PROXY_AUTH_IN_URL = "analytics:pr0xy-P%40ss%3Aword"


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    server = ProxyServer(
        tmp_path_factory.mktemp("auth-proxy"), "--basic-auth", f"{PROXY_USER}:{PROXY_PASSWORD}"
    )
    yield server
    server.close()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[TLSServer]:
    server = serve_tls(ca, "127.0.0.1")
    yield server
    server.close()


# --- through the proxy ------------------------------------------------------------------------


def test_http_goes_through_the_proxy_in_absolute_form(
    proxy: ProxyServer, collector: Collector
) -> None:
    """proxy=URL: the POST reaches the collector via the proxy (its log names the request)."""
    transport = HTTPTransport(base_url=collector.url, app_id="test-app", proxy=proxy.url)
    for _ in range(2):
        assert transport.send(PAYLOAD).status == 202
    transport.close()
    assert collector.event_count == 2
    assert collector.requests[0].path == "/events"  # the proxy forwarded it in origin form
    assert proxy.saw(f"POST 127.0.0.1:{collector.port}/events")
    assert "proxy=" in repr(transport)


def test_https_goes_through_a_connect_tunnel(
    proxy: ProxyServer, tls_server: TLSServer, ca_file: str
) -> None:
    """An https:// ingest through the proxy: a CONNECT tunnel, the certificate checked end to
    end against the CA given, the batch delivered."""
    transport = HTTPTransport(
        base_url=tls_server.url, app_id="test-app", proxy=proxy.url, ca_bundle=ca_file
    )
    assert transport.send(PAYLOAD).status == 202
    transport.close()
    assert tls_server.posts == 1
    assert proxy.saw(f"CONNECT 127.0.0.1:{tls_server.port}")


def test_an_untrusted_certificate_is_refused_through_the_tunnel(
    proxy: ProxyServer, tls_server: TLSServer
) -> None:
    """The tunnel changes nothing about verification: certifi's bundle refuses the test CA."""
    transport = HTTPTransport(base_url=tls_server.url, app_id="test-app", proxy=proxy.url)
    with pytest.raises(SendFailed) as caught:
        transport.send(PAYLOAD)
    assert "certificate" in str(caught.value).lower()
    assert tls_server.posts == 0
    transport.close()


# --- the environment ----------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_the_proxy_from_the_environment_is_used(
    variable: str, proxy: ProxyServer, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """proxy=None (the default): HTTP_PROXY (either case) or ALL_PROXY routes http://."""
    monkeypatch.setenv(variable, proxy.url)
    transport = HTTPTransport(base_url=collector.url, app_id="test-app")
    assert transport.send(PAYLOAD).status == 202
    transport.close()
    assert proxy.saw(f"POST 127.0.0.1:{collector.port}/events")


def test_https_proxy_from_the_environment_is_used_for_https(
    proxy: ProxyServer,
    tls_server: TLSServer,
    ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY routes an https:// ingest through a CONNECT tunnel."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    transport = HTTPTransport(base_url=tls_server.url, app_id="test-app", ca_bundle=ca_file)
    assert transport.send(PAYLOAD).status == 202
    transport.close()
    assert proxy.saw(f"CONNECT 127.0.0.1:{tls_server.port}")


def test_no_proxy_bypasses_the_proxy(
    collector: Collector, dead_proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NO_PROXY naming the ingest host: straight to it, past a proxy that would refuse."""
    monkeypatch.setenv("HTTP_PROXY", dead_proxy)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    transport = HTTPTransport(base_url=collector.url, app_id="test-app")
    assert transport.send(PAYLOAD).status == 202
    transport.close()
    assert collector.event_count == 1


def test_proxy_false_ignores_the_environment(
    collector: Collector, dead_proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """proxy=False: every proxy variable set to a dead port, and the batch goes direct."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    direct = HTTPTransport(base_url=collector.url, app_id="test-app", proxy=False)
    assert direct.send(PAYLOAD).status == 202
    direct.close()
    assert collector.event_count == 1

    # The control: without proxy=False the environment's dead proxy is used, and fails.
    via_env = HTTPTransport(base_url=collector.url, app_id="test-app", timeout=5.0)
    with pytest.raises(SendFailed, match=r"(?i)proxy"):
        via_env.send(PAYLOAD)
    via_env.close()
    assert collector.event_count == 1


@pytest.fixture
def dead_proxy() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- credentials --------------------------------------------------------------------------------


def test_proxy_credentials_in_the_url_work_and_are_never_shown(
    auth_proxy: ProxyServer,
    collector: Collector,
    tls_server: TLSServer,
    ca_file: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """user:password@ in the proxy URL (percent-encoded) authenticates both the forwarded
    http:// request and the CONNECT; the password is in no log, repr or error."""
    with_auth = f"http://{PROXY_AUTH_IN_URL}@127.0.0.1:{auth_proxy.port}"
    with caplog.at_level(logging.DEBUG):
        plain = HTTPTransport(base_url=collector.url, app_id="test-app", proxy=with_auth)
        assert plain.send(PAYLOAD).status == 202
        tunnelled = HTTPTransport(
            base_url=tls_server.url, app_id="test-app", proxy=with_auth, ca_bundle=ca_file
        )
        assert tunnelled.send(PAYLOAD).status == 202
        wrong = f"http://{PROXY_USER}:wrong-Password@127.0.0.1:{auth_proxy.port}"
        refused = HTTPTransport(base_url=collector.url, app_id="test-app", proxy=wrong)
        refused_tunnel = HTTPTransport(
            base_url=tls_server.url, app_id="test-app", proxy=wrong, ca_bundle=ca_file
        )
        errors = []
        for transport in (refused, refused_tunnel):
            # A failure to retry, not the ingest's 4xx: that would dead-letter the batch.
            with pytest.raises(SendFailed, match="407") as caught:
                transport.send(PAYLOAD)
            errors.append(str(caught.value) + repr(caught.value))
    for transport in (plain, tunnelled, refused, refused_tunnel):
        transport.close()
    assert collector.event_count == 1 and tls_server.posts == 1
    shown = repr(plain) + repr(tunnelled) + repr(refused) + caplog.text + "".join(errors)
    for secret in ("pr0xy", PROXY_AUTH_IN_URL, PROXY_PASSWORD, "wrong-Password"):
        assert secret not in shown, secret
    assert f"***@127.0.0.1:{auth_proxy.port}" in repr(plain)


def test_a_proxy_error_names_no_password(dead_proxy: str) -> None:
    """A proxy that cannot be reached: the SendFailed names the proxy, not its password."""
    with_auth = dead_proxy.replace("http://", "http://someone:Sup3rSecretPw@")
    transport = HTTPTransport(base_url="http://ingest.invalid", app_id="a", proxy=with_auth)
    with pytest.raises(SendFailed) as caught:
        transport.send(PAYLOAD)
    assert "Sup3rSecretPw" not in str(caught.value)
    assert "Sup3rSecretPw" not in repr(transport)
    transport.close()


# --- bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "socks5://127.0.0.1:1080", "ftp://proxy.example:21", "http://"]
)
def test_a_proxy_that_is_not_an_http_url_is_refused_at_construction(bad: str) -> None:
    """A clear ConfigurationError naming the option, not a failure on every send."""
    with pytest.raises(ConfigurationError) as caught:
        HTTPTransport(base_url="http://127.0.0.1:9", app_id="a", proxy=bad)
    assert caught.value.option == "proxy"


@pytest.mark.parametrize(
    "bad", ["socks5://u:Pw12345@h:1", "http://u:Pw12345@[bad", "http://u:Pw12345@host:99999"]
)
def test_a_bad_proxy_url_in_the_error_has_its_password_hidden(bad: str) -> None:
    """Even the construction error (wrong scheme, unparsable URL) never shows the password."""
    with pytest.raises(ConfigurationError) as caught:
        HTTPTransport(base_url="http://127.0.0.1:9", app_id="a", proxy=bad)
    assert caught.value.option == "proxy"
    assert "Pw12345" not in "".join(traceback.format_exception(caught.value))


# --- the total deadline -------------------------------------------------------------------------


@pytest.fixture
def dripper() -> Iterator[DripServer]:
    """Drips its answer a byte every 0.2 s."""
    server = DripServer(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", 0.2)
    yield server
    server.close()


def _assert_cut_at_the_deadline(transport: HTTPTransport) -> None:
    try:
        with pytest.raises(SendFailed) as caught:
            transport.send(PAYLOAD)
        assert caught.value.timed_out
        assert "deadline" in str(caught.value)
    finally:
        transport.close()


def test_the_total_deadline_cuts_a_dripping_answer_through_the_proxy(
    proxy: ProxyServer, dripper: DripServer
) -> None:
    """The proxy relays a status line dripped a byte every 0.2 s: no per-read timeout (1 s)
    ever trips, the watchdog's total deadline cuts it."""
    transport = HTTPTransport(base_url=dripper.url, app_id="test-app", proxy=proxy.url, timeout=1.0)
    _assert_cut_at_the_deadline(transport)


def test_the_total_deadline_cuts_a_proxy_that_drips_its_connect_answer(
    dripper: DripServer,
) -> None:
    """A proxy that answers CONNECT a byte every 0.2 s is cut at the deadline, too."""
    dripper.answer = b"HTTP/1.1 200 Connection established\r\n\r\n"
    transport = HTTPTransport(
        base_url="https://127.0.0.1:9", app_id="test-app", proxy=dripper.url, timeout=1.0
    )
    _assert_cut_at_the_deadline(transport)


def test_analytics_options_reach_the_transport(
    proxy: ProxyServer, tls_server: TLSServer, ca_file: str, tmp_path: Path
) -> None:
    """Analytics(proxy=..., ca_bundle=...) are the transport's options: a client behind an
    egress proxy, trusting a corporate CA, delivers over a CONNECT tunnel."""
    from durable_analytics import Analytics

    with Analytics(
        app_id="proxied",
        persistence_dir=tmp_path / "q",
        base_url=tls_server.url,
        proxy=proxy.url,
        ca_bundle=ca_file,
        handle_signals=False,
    ) as client:
        client.track("u1", "Signup")
        assert client.flush(timeout=20)
    assert tls_server.posts == 1
    assert proxy.saw(f"CONNECT 127.0.0.1:{tls_server.port}")


def test_analytics_reads_the_proxy_from_the_environment(
    proxy: ProxyServer, collector: Collector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no proxy option, HTTP_PROXY is honoured by the client, like requests does (the
    0.1 client ignored it and delivered nothing behind an egress proxy)."""
    from durable_analytics import Analytics

    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    with Analytics(
        app_id="proxied",
        persistence_dir=tmp_path / "q",
        base_url=collector.url,
        handle_signals=False,
    ) as client:
        client.track("u1", "Signup")
        assert client.flush(timeout=20)
    assert proxy.saw(f"POST 127.0.0.1:{collector.port}/events")
