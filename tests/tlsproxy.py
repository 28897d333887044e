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


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def private_ca(directory: Path) -> dict[str, Path]:
    """A CA of the test's own, a server certificate for 127.0.0.1 and a client certificate, both
    signed by it; returns paths: ca, server_cert, server_key, client_cert, client_key."""
    d = directory
    paths = {name: d / f"{name}.pem" for name in ("ca", "ca_key", "server_cert", "server_key", "client_cert",
                                                     "client_key")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rangefs test CA",
             "-keyout", str(paths["ca_key"]), "-out", str(paths["ca"]))
    for who, subject, ext in (("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1"),
                              ("client", "/CN=rangefs client", "extendedKeyUsage=clientAuth")):
        csr, extfile = d / f"{who}.csr", d / f"{who}.ext"
        extfile.write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", str(paths[f"{who}_key"]),
                 "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(paths["ca"]), "-CAkey", str(paths["ca_key"]),
                 "-CAcreateserial", "-days", "2", "-extfile", str(extfile), "-out", str(paths[f"{who}_cert"]))
    return paths


class TlsProxy(Relay):
    """``with TlsProxy(upstream_port, cert, key) as proxy:`` then GET ``proxy.url(path)``."""

    def __init__(self, upstream_port: int, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        """``client_ca``: require a client certificate signed by this CA (the handshake fails without)."""
        super().__init__(upstream_port)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        if client_ca is not None:
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(client_ca)
        self.handshakes = 0  # completed
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
            with self._count_lock:
                self.handshakes += 1
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
