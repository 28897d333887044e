"""A TCP proxy on 127.0.0.1 that slows the server's answers down to a byte rate.

nginx's ``limit_rate`` counts per request, and a 256 KiB answer fits in a loopback socket buffer
at once, so it cannot make a stream of small range requests slow. This proxy can: it forwards
the server-to-client direction at ``rate`` bytes per second per connection, in small slices
(scripts/relay.py's ``pump``).
"""

from __future__ import annotations

import socket
import threading

from relay import Relay


class ThrottleProxy(Relay):
    """``with ThrottleProxy(upstream_port, rate) as proxy:`` then connect to ``proxy.port``."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        super().__init__(upstream_port)
        self.rate = rate
        self._count_lock = threading.Lock()
        self.forwarded = 0  # bytes passed on from the server to clients (written to their sockets)

    def __enter__(self) -> ThrottleProxy:
        self.start()
        return self

    def serve(self, client: socket.socket, server: socket.socket) -> None:
        self.pump_both(client, server, self.rate, self._count)

    def _count(self, size: int) -> None:
        with self._count_lock:
            self.forwarded += size
