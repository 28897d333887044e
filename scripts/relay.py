"""A TCP relay on 127.0.0.1 to an upstream port: the part every proxy of the benchmark and tests shares.

``Relay`` listens, connects each client to the upstream, and hands the pair (a ``Connection``)
to the subclass's ``serve``, which starts the threads that move the bytes; ``stop`` aborts every
connection and joins every thread. ``pump`` moves one direction through this process, at a byte
rate when given one (tests/proxy.py slows answers with it, tests/tlsproxy.py ends TLS in front
of it); scripts/latency_proxy.py moves its bytes through pipes instead, to delay them at little
CPU cost. Standard library only.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from types import TracebackType

JOIN_TIMEOUT = 5.0
_SLICE = 16 * 1024  # what pump reads at once: small, so a rate is kept smoothly


class Connection:
    """One client connection and its upstream connection; aborts both at the first error.

    ``threads`` threads serve it; the last one to end closes the sockets and ``closers``.
    """

    def __init__(self, client: socket.socket, server: socket.socket, threads: int) -> None:
        self.sockets = (client, server)
        self._lock = threading.Lock()
        self._open_directions = 2
        self._running_threads = threads
        self.aborted = threading.Event()
        self.closed = threading.Event()
        self.closers: list[Callable[[], None]] = []  # run after the sockets are closed (pipes)

    def run(self, target: Callable[[], None]) -> None:
        """A thread's body: ``target``, then close the sockets if it was the connection's last thread."""
        try:
            target()
        finally:
            with self._lock:
                self._running_threads -= 1
                last = self._running_threads == 0
            if last:
                for sock in self.sockets:
                    sock.close()
                for close in self.closers:
                    close()
                self.closed.set()

    def direction_done(self) -> None:
        """One direction has delivered its end of stream; close both sockets after the second."""
        with self._lock:
            self._open_directions -= 1
            last = self._open_directions == 0
        if last:
            self.abort()

    def abort(self) -> None:
        self.aborted.set()
        for sock in self.sockets:
            shutdown(sock)


class Relay:
    """``with Relay(upstream_port) as relay:`` then connect to ``relay.port``; subclasses define ``serve``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[Connection] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.spawn(self._accept_loop)

    def stop(self) -> None:
        """Close the listener and every connection, join every thread (bounded)."""
        self._stopping.set()
        shutdown(self._listener)
        self._listener.close()
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for conn in connections:
            conn.abort()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)

    def spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._connections = [c for c in self._connections if not c.closed.is_set()]
            self._threads.append(thread)
        thread.start()

    def accepted(self, client: socket.socket) -> None:
        """Connect ``client`` to the upstream and serve the pair (a subclass may do more first)."""
        server = self.connect_upstream(client)
        if server is not None:
            self.serve(client, server)

    def connect_upstream(self, client: socket.socket) -> socket.socket | None:
        """A connection to the upstream, or None (``client`` closed) when it cannot be made."""
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return None
        server.settimeout(None)
        return server

    def serve(self, client: socket.socket, server: socket.socket) -> None:
        """Start the threads that move the bytes between ``client`` and ``server``."""
        raise NotImplementedError

    def track(self, conn: Connection) -> None:
        """``stop`` aborts ``conn`` too."""
        with self._lock:
            self._connections.append(conn)

    def pump_both(self, client: socket.socket, server: socket.socket, rate: float | None = None,
                  counted: Callable[[int], None] | None = None) -> None:
        """Serve the pair with a ``pump`` per direction; ``rate`` and ``counted`` apply to the server's answers."""
        conn = Connection(client, server, threads=2)
        self.track(conn)
        self.spawn(partial(conn.run, partial(pump, conn, client, server)))
        self.spawn(partial(conn.run, partial(pump, conn, server, client, rate, counted)))

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # e.g. out of file descriptors for a moment
                continue
            self.accepted(client)


def pump(conn: Connection, source: socket.socket, sink: socket.socket, rate: float | None = None,
         counted: Callable[[int], None] | None = None) -> None:
    """Move bytes from ``source`` to ``sink`` until either ends, at most ``rate`` bytes/s when given;
    ``counted(n)`` hears of each ``n`` bytes passed on. Ends the whole connection when it ends."""
    try:
        while data := source.recv(_SLICE):
            if rate:
                time.sleep(len(data) / rate)
            sink.sendall(data)
            if counted is not None:
                counted(len(data))
    except OSError:
        pass
    finally:
        conn.abort()


def shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass
