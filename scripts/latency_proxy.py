"""A delaying TCP proxy on 127.0.0.1: adds round-trip time without limiting throughput.

This kernel has no ``netem`` qdisc, so the benchmark adds latency itself. Each direction of each
connection has a reader thread and a writer thread: the reader stamps every chunk it receives with
its arrival time and queues it at once; the writer sends each chunk at arrival + delay (half the
round-trip time per direction). Reading never waits for writing, so many chunks are in flight at
once, as bytes are on a long link, and throughput is bounded by the CPU, not by the delay. What is
in flight per direction is capped (``RING_SIZE`` bytes, the link's bandwidth-delay product), so a
slow client pushes back on the server as TCP would.

Standard library only. As a program, ``latency_proxy.py UPSTREAM_PORT [--rtt-ms 20]`` prints the
port it listens on (one line) and serves until SIGTERM or SIGINT; ``LatencyProxy`` does the same
in-process.
"""

from __future__ import annotations

import argparse
import mmap
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from types import FrameType, TracebackType

CHUNK = 1 << 20  # largest recv: below ~256 KiB Python's per-call cost caps throughput on loopback
MAX_SEND = 8 << 20  # due chunks adjacent in the ring are sent together, up to this many bytes
RING_SIZE = 32 << 20  # bytes in flight per direction: 32 MiB per 10 ms one-way allows ~3 GB/s
JOIN_TIMEOUT = 5.0


class _Connection:
    """One client connection and its upstream connection; aborts both at the first error.

    Four threads serve it (a reader and a writer per direction); the last one to end closes the sockets.
    """

    THREADS = 4

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.sockets = (client, server)
        self._lock = threading.Lock()
        self._open_directions = 2
        self._running_threads = self.THREADS
        self.aborted = threading.Event()
        self.closed = threading.Event()

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
            _shutdown(sock)


class _Direction:
    """Bytes from ``source`` to ``sink``, each chunk released ``delay`` seconds after it arrived.

    The bytes in flight live in a ring buffer of RING_SIZE bytes: the reader receives into its free
    part, the writer sends from its filled part in arrival order, nothing is allocated per chunk.
    """

    def __init__(self, conn: _Connection, source: socket.socket, sink: socket.socket, delay: float) -> None:
        self.conn, self.source, self.sink, self.delay = conn, source, sink, delay
        self._ring = memoryview(mmap.mmap(-1, RING_SIZE))  # not zero-filled: pages appear once touched
        self._write_pos = 0  # where the next chunk is received; moved by the reader only
        self._in_flight = 0  # bytes received and not yet sent
        self._queue: deque[tuple[float, int, int]] = deque()  # (release time, start, length); 0 = end
        self._cond = threading.Condition()

    def read_loop(self) -> None:
        try:
            while (region := self._free_region()) is not None:
                start, length = region
                received = self.source.recv_into(self._ring[start : start + length])
                self._put(start, received)
                if not received:
                    return
        except OSError:
            self._fail()

    def write_loop(self) -> None:
        try:
            while (item := self._get()) is not None:
                start, length = item
                if not length:
                    _shutdown(self.sink, socket.SHUT_WR)  # pass the end of stream on
                    self.conn.direction_done()
                    return
                self.sink.sendall(self._ring[start : start + length])
                self._done(length)
        except OSError:
            self._fail()

    def _free_region(self) -> tuple[int, int] | None:
        """Where to receive next (start, at most CHUNK bytes), waiting while the ring is full."""
        with self._cond:
            while self._in_flight >= RING_SIZE and not self.conn.aborted.is_set():
                self._cond.wait(0.5)
            if self.conn.aborted.is_set():
                return None
            start = self._write_pos
            return start, min(CHUNK, RING_SIZE - self._in_flight, RING_SIZE - start)

    def _put(self, start: int, length: int) -> None:
        with self._cond:
            self._write_pos = (start + length) % RING_SIZE
            self._in_flight += length
            self._queue.append((time.monotonic() + self.delay, start, length))
            self._cond.notify_all()

    def _get(self) -> tuple[int, int] | None:
        """The next bytes due (start, length; length 0 at the end), once due; None when aborted.

        Chunks already due and adjacent in the ring go out in one send: fewer, larger sends.
        """
        with self._cond:
            while not self._queue and not self.conn.aborted.is_set():
                self._cond.wait(0.5)
            if not self._queue:
                return None
            release, start, length = self._queue.popleft()
        if (wait := release - time.monotonic()) > 0:
            time.sleep(wait)
        with self._cond:
            while length and self._queue and length < MAX_SEND:
                next_release, next_start, next_length = self._queue[0]
                if not next_length or next_start != start + length or next_release > time.monotonic():
                    break
                self._queue.popleft()
                length += next_length
        return start, length

    def _done(self, length: int) -> None:
        with self._cond:
            self._in_flight -= length
            self._cond.notify_all()

    def _fail(self) -> None:
        self.conn.abort()
        with self._cond:
            self._cond.notify_all()


class LatencyProxy:
    """``with LatencyProxy(upstream_port, rtt) as proxy:`` then connect to ``proxy.port``."""

    def __init__(self, upstream_port: int, rtt: float) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.delay = rtt / 2
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def __enter__(self) -> LatencyProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._spawn(self._accept_loop)

    def stop(self) -> None:
        """Close the listener and every connection, join every thread (bounded)."""
        self._stopping.set()
        _shutdown(self._listener)
        self._listener.close()
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for conn in connections:
            conn.abort()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)

    def _spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._connections = [c for c in self._connections if not c.closed.is_set()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._serve(_Connection(client, server))

    def _serve(self, conn: _Connection) -> None:
        client, server = conn.sockets
        for sock in conn.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the delay is ours alone
        with self._lock:
            self._connections.append(conn)
        for direction in (_Direction(conn, client, server, self.delay), _Direction(conn, server, client, self.delay)):
            self._spawn(partial(conn.run, direction.read_loop))
            self._spawn(partial(conn.run, direction.write_loop))


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Delaying TCP proxy on 127.0.0.1 (adds RTT, not a rate limit).")
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="added round-trip time (default 20)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    proxy = LatencyProxy(args.upstream_port, args.rtt_ms / 1000)
    proxy.start()
    print(proxy.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
