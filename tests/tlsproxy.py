"""An https front for a plain HTTP server on 127.0.0.1, with a self-signed certificate made by openssl.

Tests need an https origin whose certificate fails verification (or is trusted through
SSL_CERT_FILE): this proxy ends TLS and relays the bytes to a FaultServer (scripts/relay.py), so
every fault switch works over https too. It counts the connections it accepted, handshake or not.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from functools import partial
from pathlib import Path

from procs import close_socket
from relay import Relay


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (``openssl req -x509``); returns (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return cert, key


class TlsProxy(Relay):
    """``with TlsProxy(upstream_port, cert, key) as proxy:`` then GET ``proxy.url(path)``."""

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        super().__init__(upstream_port)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self.connections = 0  # accepted, whether the handshake succeeded or not
        self._handshaking: set[socket.socket] = set()  # closed by stop, to end a handshake that hangs
        self._count_lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> TlsProxy:
        self.start()
        return self

    def stop(self) -> None:
        with self._count_lock:
            for sock in self._handshaking:
                close_socket(sock)
        super().stop()

    def accepted(self, client: socket.socket) -> None:
        with self._count_lock:
            self.connections += 1
            self._handshaking.add(client)
        self.spawn(partial(self._handshake, client))  # a slow handshake must not hold up the next

    def _handshake(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            secure = self._context.wrap_socket(client, server_side=True)
            secure.settimeout(None)
        except OSError:
            close_socket(client)  # a client that refused our certificate
            return
        finally:
            with self._count_lock:
                self._handshaking.discard(client)
        server = self.connect_upstream(secure)
        if server is not None:
            self.pump_both(secure, server)

    def serve(self, client: socket.socket, server: socket.socket) -> None:
        self.pump_both(client, server)
