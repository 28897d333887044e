"""A delaying TCP proxy on 127.0.0.1: adds round-trip time, and optionally caps each connection's rate.

The benchmark adds latency itself rather than with a ``netem`` qdisc, which not every kernel
has. Each direction of each connection has a reader thread and a writer thread: the reader
stamps every chunk it receives with its arrival time and queues it at once; the writer sends
each chunk at arrival + delay (half the round-trip time per direction). Reading never waits for
writing, so many chunks are in flight at once, as bytes are on a long link. The chunks wait in
pipes and move with ``splice``, never through this process's memory, so that the proxy, like
``netem``, takes little of the CPU that the programs measured share with it (copying every byte
in and out would not). What is in flight per direction is capped (``MAX_PIPES`` pipes), so a
slow client pushes back on the server as TCP would.

With ``rate``, the server's answers on each connection are also paced to that many bytes per
second over the connection's whole life, as a server or CDN that caps each connection does (nginx's
``limit_rate`` counts per request, and a request's first MiBs escape it into loopback socket
buffers, so it barely slows a client that asks for many small ranges on one connection). The
proxy then holds little of an answer (RATED_PIPES pipes, a small receive buffer), so the server
still sees a slow client.

Standard library and scripts/relay.py (the listener and connection lifecycle it shares with the
tests' proxies). As a program, ``latency_proxy.py UPSTREAM_PORT [--rtt-ms 20] [--rate-mbs MB/s]`` prints the port
it listens on (one line) and serves until SIGTERM or SIGINT; ``LatencyProxy`` does the same
in-process.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from functools import partial
from types import FrameType

from relay import Connection, Relay, shutdown

PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size
# Per direction: what may be in flight is at most MAX_PIPES full pipes, enough for a fast link at
# the delays the benchmark adds (bytes in flight = rate x delay).
MAX_PIPES = 32
RATED_PIPES = 2  # with a rate: what a paced answer may hold in flight here, so the server waits instead
RATED_RCVBUF = 256 * 1024  # with a rate: the receive buffer towards the server, for the same reason
_RATE_SLICE = 64 * 1024  # with a rate: bytes sent per pacing step, so the pace is kept smoothly


class _Direction:
    """Bytes from ``source`` to ``sink``, each chunk released ``delay`` seconds after it arrived.

    The bytes in flight wait in kernel pipes, not in this process: the reader splices what the
    source has into the current pipe and queues (release time, pipe, length); the writer splices
    each chunk from its pipe to the sink once due. No byte is copied through user space (on
    loopback a pipe holds references to the sender's pages), so the proxy costs little CPU, as
    ``netem`` would, and leaves the cores to the programs measured. The reader moves on to the
    next pipe of a ring of at most MAX_PIPES (made as needed) when the current one is full,
    waiting while the next one still holds bytes not yet sent: that is the cap on what is in
    flight, and a slow client pushes back on the server as TCP would.
    """

    def __init__(self, conn: Connection, source: socket.socket, sink: socket.socket, delay: float,
                 rate: float | None = None) -> None:
        self.conn, self.source, self.sink, self.delay, self.rate = conn, source, sink, delay, rate
        self._ring = RATED_PIPES if rate else MAX_PIPES
        self._free_at = 0.0  # with a rate: when the pace allows the next slice (monotonic)
        self._pipes: list[tuple[int, int, int]] = []  # made as needed; the connection closes them
        self._held = [0] * self._ring  # bytes in each pipe not yet sent
        self._current = 0  # the pipe the reader fills
        self._move_on = False  # the current pipe took all it can
        self._queue: deque[tuple[float, int, int]] = deque()  # (release time, pipe, length); 0 = end
        self._cond = threading.Condition()
        self._readable, self._writable = select.poll(), select.poll()
        self._readable.register(source, select.POLLIN)
        self._writable.register(sink, select.POLLOUT)

    def read_loop(self) -> None:
        try:
            while (pipe := self._next_pipe()) is not None:
                _, write_end, capacity = self._pipes[pipe]
                self._readable.poll()  # waits outside splice, which holds the pipe's lock (see _serve)
                try:
                    received = os.splice(self.source.fileno(), write_end, capacity - self._held[pipe],
                                         flags=os.SPLICE_F_NONBLOCK)
                except BlockingIOError:  # the pipe ran out of slots before bytes, or no data after all
                    self._pipe_full(pipe)
                    continue
                self._put(pipe, received)
                if not received:
                    return
        except BaseException as exc:
            self._fail()
            if not isinstance(exc, OSError):
                raise

    def write_loop(self) -> None:
        try:
            while (item := self._get()) is not None:
                pipe, length = item
                if not length:
                    shutdown(self.sink, socket.SHUT_WR)  # pass the end of stream on
                    self.conn.direction_done()
                    return
                left = length
                while left:
                    self._writable.poll()  # as in read_loop: never wait inside splice
                    try:
                        sent = os.splice(self._pipes[pipe][0], self.sink.fileno(), self._allowed(left),
                                         flags=os.SPLICE_F_NONBLOCK)
                    except BlockingIOError:
                        continue
                    left -= sent
                    self._paced(sent)
                self._done(pipe, length)
        except BaseException as exc:
            self._fail()
            if not isinstance(exc, OSError):
                raise

    def _allowed(self, left: int) -> int:
        """How much of ``left`` to send now: all without a rate; with one, a slice once the pace allows."""
        if not self.rate:
            return left
        if (wait := self._free_at - time.monotonic()) > 0:
            time.sleep(wait)
        return min(left, _RATE_SLICE)

    def _paced(self, sent: int) -> None:
        """Account ``sent`` bytes against the rate. An idle connection saves up no credit: the pace
        restarts from now, so no answer's start escapes the cap."""
        if self.rate:
            self._free_at = max(self._free_at, time.monotonic()) + sent / self.rate

    def _next_pipe(self) -> int | None:
        """The pipe to splice into next (made if new); None once aborted."""
        with self._cond:
            pipe = self._current
            if self._pipes and (self._move_on or self._held[pipe] >= self._pipes[pipe][2] * 3 // 4):
                pipe = (pipe + 1) % self._ring
                while self._held[pipe] and not self.conn.aborted.is_set():
                    self._cond.wait(0.5)
                self._current, self._move_on = pipe, False
            if self.conn.aborted.is_set():
                return None
            if pipe == len(self._pipes):
                self._pipes.append(_make_pipe())
                self.conn.closers.append(partial(_close_pipe, self._pipes[-1]))
            return pipe

    def _pipe_full(self, pipe: int) -> None:
        """A splice into ``pipe`` would have blocked: move on to the next pipe if this one holds
        bytes; if it holds none (the writer may just have sent them), the socket had nothing."""
        with self._cond:
            if self._held[pipe]:
                self._move_on = True

    def _put(self, pipe: int, length: int) -> None:
        with self._cond:
            self._held[pipe] += length
            self._queue.append((time.monotonic() + self.delay, pipe, length))
            self._cond.notify_all()

    def _get(self) -> tuple[int, int] | None:
        """The next chunk due (pipe, length; length 0 at the end), once due; None when aborted."""
        with self._cond:
            while not self._queue and not self.conn.aborted.is_set():
                self._cond.wait(0.5)
            if not self._queue:
                return None
            release, pipe, length = self._queue.popleft()
        if (wait := release - time.monotonic()) > 0:
            time.sleep(wait)
        return pipe, length

    def _done(self, pipe: int, length: int) -> None:
        with self._cond:
            self._held[pipe] -= length
            self._cond.notify_all()

    def _fail(self) -> None:
        self.conn.abort()
        with self._cond:
            self._cond.notify_all()


def _make_pipe() -> tuple[int, int, int]:
    """A pipe (read end, write end, capacity in bytes) of PIPE_SIZE bytes, or the default size
    when /proc/sys/fs/pipe-max-size is lower and the process may not exceed it."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return read_end, write_end, fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)


def _close_pipe(pipe: tuple[int, int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


class LatencyProxy(Relay):
    """``with LatencyProxy(upstream_port, rtt) as proxy:`` then connect to ``proxy.port``;
    ``rate``: bytes/s per connection for the server's answers (None: no cap)."""

    def __init__(self, upstream_port: int, rtt: float, rate: float | None = None) -> None:
        super().__init__(upstream_port)
        self.delay = rtt / 2
        self.rate = rate

    def __enter__(self) -> LatencyProxy:
        self.start()
        return self

    def serve(self, client: socket.socket, server: socket.socket) -> None:
        conn = Connection(client, server, threads=4)  # a reader and a writer per direction
        for sock in conn.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the delay is ours alone
            # Non-blocking, and each loop polls before it splices: splice holds its pipe's lock
            # while it waits for a socket, so a reader waiting for data (or a writer for a slow
            # client) inside splice would hold up the other side of the same pipe.
            sock.setblocking(False)
        if self.rate:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RATED_RCVBUF)
        self.track(conn)
        for direction in (_Direction(conn, client, server, self.delay),
                          _Direction(conn, server, client, self.delay, self.rate)):
            self.spawn(partial(conn.run, direction.read_loop))
            self.spawn(partial(conn.run, direction.write_loop))


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Delaying TCP proxy on 127.0.0.1 (adds RTT, optionally a rate cap).")
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="added round-trip time (default 20)")
    parser.add_argument("--rate-mbs", type=float, default=0.0,
                        help="cap each connection's answers at this many MB/s over its life (default: no cap)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    proxy = LatencyProxy(args.upstream_port, args.rtt_ms / 1000, args.rate_mbs * 1e6 or None)
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
