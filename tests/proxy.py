"""A TCP proxy on 127.0.0.1 that slows the server's answers down to a byte rate.

nginx's ``limit_rate`` counts per request, and a 256 KiB answer fits in a loopback socket buffer
at once, so it cannot make a stream of small range requests slow. This proxy can: it forwards
the server-to-client direction at ``rate`` bytes per second per connection, in small slices.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

from procs import close_socket

_SLICE = 16 * 1024


class ThrottleProxy:
    """``with ThrottleProxy(upstream_port, rate) as proxy:`` then connect to ``proxy.port``."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.forwarded = 0  # bytes passed on from the server to clients (written to their sockets)

    def __enter__(self) -> ThrottleProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Close every socket and join every thread (bounded)."""
        self._stopping.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                close_socket(sock)
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                return
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pump, client, server, None)
            self._spawn(self._pump, server, client, self.rate)

    def _pump(self, source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        try:
            while data := source.recv(_SLICE):
                if rate:
                    time.sleep(len(data) / rate)
                sink.sendall(data)
                if rate:
                    with self._lock:
                        self.forwarded += len(data)
        except OSError:
            pass
        finally:
            close_socket(source)
            close_socket(sink)
