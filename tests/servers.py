"""Raw test servers on 127.0.0.1 that more than one test file needs.

``TLSServer``: HTTPS with a certificate from a throwaway CA, answering every POST with 202.
``DripServer``: plain TCP that reads a request and drips a fixed answer one byte at a time.
"""

from __future__ import annotations

import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trustme


class TLSServer:
    """HTTPS on 127.0.0.1 answering every POST with 202; counts the POSTs it read."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.posts = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.posts += 1
                self.send_response(202)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # failed handshakes are what some tests are about

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_tls(ca: trustme.CA, *hostnames: str) -> TLSServer:
    """A TLSServer whose certificate ``ca`` issued for ``hostnames``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hostnames).configure_cert(context)
    return TLSServer(context)


class DripServer:
    """Accepts connections, reads the request, then drips ``answer`` one byte per ``every`` s."""

    def __init__(self, answer: bytes, every: float) -> None:
        self.answer = answer
        self.every = every
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopping = threading.Event()
        self.cut = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                for i in range(len(self.answer)):
                    if self.stopping.wait(self.every):
                        return
                    try:
                        conn.sendall(self.answer[i : i + 1])
                    except OSError:
                        self.cut.set()  # the client hung up on us
                        break

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
