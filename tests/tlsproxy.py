"""An https front for a plain HTTP server on 127.0.0.1, with a self-signed certificate made by openssl.

Tests need an https origin whose certificate fails verification (or is trusted through
SSL_CERT_FILE): this proxy ends TLS and relays the bytes to a FaultServer, so every fault switch
works over https too. It counts the connections it accepted, handshake or not.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path
from types import TracebackType

from procs import close_socket

_SLICE = 64 * 1024


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (``openssl req -x509``); returns (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return cert, key


class TlsProxy:
    """``with TlsProxy(upstream_port, cert, key) as proxy:`` then GET ``proxy.url(path)``."""

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0  # accepted, whether the handshake succeeded or not
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> TlsProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Close every socket and join every thread (bounded)."""
        close_socket(self._listener)
        with self._lock:
            for sock in self._sockets:
                close_socket(sock)
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._sockets.append(client)
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            secure = self._context.wrap_socket(client, server_side=True)
            secure.settimeout(None)
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
        except OSError:
            close_socket(client)  # a client that refused our certificate, or a dead upstream
            return
        with self._lock:
            self._sockets += [secure, server]
        self._spawn(self._pump, server, secure)
        self._pump(secure, server)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(_SLICE):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            close_socket(source)
            close_socket(sink)
