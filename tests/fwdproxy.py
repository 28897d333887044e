"""A small forward HTTP proxy on 127.0.0.1 for the tests: absolute-form requests and CONNECT tunnels.

``with ForwardProxy() as proxy:`` then point HTTP_PROXY / HTTPS_PROXY / --proxy at ``proxy.url``.
It records every request it was asked to forward (``requests``: method and target) so a test can
see that probes and range GETs went through it. With ``credentials`` ("user:password") it answers
407 to a request without the matching Proxy-Authorization. An absolute-form request is forwarded
with ``Connection: close`` and its connection closed after the answer (simple, and still HTTP);
a CONNECT tunnel relays bytes both ways until either side closes. Standard library only.
"""

from __future__ import annotations

import base64
import socket
import socketserver
import threading
from types import TracebackType
from urllib.parse import urlsplit

from procs import close_socket

TIMEOUT = 30.0  # seconds of silence after which a connection is dropped
_MAX_HEAD = 64 * 1024


class ForwardProxy:
    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials
        self.requests: list[tuple[str, str]] = []  # (method, target) of every request it forwarded
        self.refused = 0  # requests answered 407
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=True)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        auth = f"{self.credentials}@" if self.credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def methods(self) -> list[str]:
        with self._lock:
            return [method for method, _ in self.requests]

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(TIMEOUT)
        try:
            head = _read_head(client)
            if head is None:
                return
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ", 2)
            headers = [line for line in lines if line]
            if self.credentials and not self._authorized(headers):
                with self._lock:
                    self.refused += 1
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                               b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
                return
            with self._lock:
                self.requests.append((method, target))
            if method == "CONNECT":
                self._tunnel(client, target)
            else:
                self._forward(client, method, target, version, headers)
        except (OSError, ValueError):
            pass
        finally:
            close_socket(client)

    def _authorized(self, headers: list[str]) -> bool:
        assert self.credentials is not None
        expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
        return any(
            name.strip().lower() == "proxy-authorization" and value.strip() == expected
            for name, _, value in (line.partition(":") for line in headers)
        )

    def _tunnel(self, client: socket.socket, target: str) -> None:
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        try:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            other = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            other.start()
            _pump(client, upstream)
            other.join(timeout=TIMEOUT)
        finally:
            close_socket(upstream)

    def _forward(self, client: socket.socket, method: str, target: str, version: str, headers: list[str]) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        kept = [line for line in headers
                if line.partition(":")[0].strip().lower() not in ("proxy-authorization", "proxy-connection",
                                                                   "connection", "keep-alive")]
        head = f"{method} {path} {version}\r\n" + "".join(f"{line}\r\n" for line in kept) + "Connection: close\r\n\r\n"
        upstream = socket.create_connection((parts.hostname, parts.port or 80), timeout=TIMEOUT)
        try:
            upstream.sendall(head.encode("latin-1"))
            _pump(upstream, client)
        finally:
            close_socket(upstream)


def _read_head(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > _MAX_HEAD:
            return None
        data += chunk
    return data.partition(b"\r\n\r\n")[0]


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until ``source`` ends, then end ``sink``'s writing side."""
    try:
        while True:
            chunk = source.recv(256 * 1024)
            if not chunk:
                break
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
