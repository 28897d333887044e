"""The benchmark's delaying proxy (scripts/latency_proxy.py): it must add the round-trip time it is
given, pass every byte in order, pass the end of stream on, push back on a slow reader, and leave no
thread or pipe behind. The +20 ms benchmark row is only as honest as this proxy."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from latency_proxy import MAX_PIPES, PIPE_SIZE, LatencyProxy
from util import seeded_bytes

pytestmark = pytest.mark.timeout(60)

RTT = 0.050
Connect = Callable[..., socket.socket]  # (handle, rate=None) -> the client's socket


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Upstream:
    """A one-connection TCP server on 127.0.0.1 that runs ``handle(conn)`` in a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._handle = handle
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            self._handle(conn)

    def close(self) -> None:
        self._thread.join(10)
        self._listener.close()
        assert not self._thread.is_alive()


@pytest.fixture
def proxied() -> Iterator[Connect]:
    """Connect through a proxy with RTT of added delay to an upstream running the given handler."""
    threads_before = threading.active_count()
    fds_before = open_fds()
    opened: list[tuple[Upstream, LatencyProxy, socket.socket]] = []

    def connect(handle: Callable[[socket.socket], None], rate: float | None = None) -> socket.socket:
        upstream = Upstream(handle)
        proxy = LatencyProxy(upstream.port, RTT, rate)
        proxy.start()
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
        opened.append((upstream, proxy, client))
        return client

    yield connect
    for upstream, proxy, client in opened:
        proxy.stop()  # first: also while the client still has unread bytes coming
        client.close()
        upstream.close()
    deadline = time.monotonic() + 5
    while (threading.active_count() > threads_before or open_fds() > fds_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before, "the proxy left threads behind"
    assert open_fds() <= fds_before, "the proxy left file descriptors (pipes, sockets) open"


def buffered_by_sockets() -> int:
    """The most the four socket buffers between the upstream and the client can hold."""
    most = [int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2]) for name in ("tcp_rmem", "tcp_wmem")]
    return 2 * sum(most)


def receive_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_round_trip_takes_the_added_rtt_and_the_end_of_stream_passes(proxied: Connect) -> None:
    def echo_once(conn: socket.socket) -> None:
        conn.sendall(conn.recv(100))  # then close: the end of stream must reach the client

    client = proxied(echo_once)
    start = time.monotonic()
    client.sendall(b"ping")
    assert client.recv(100) == b"ping"
    elapsed = time.monotonic() - start
    assert RTT <= elapsed < RTT + 0.5, elapsed
    assert client.recv(100) == b""


def test_many_mib_pass_whole_and_in_order_to_a_slow_reader(proxied: Connect) -> None:
    """More than the proxy's pipes and the sockets' buffers hold: the ring wraps round and, while
    the client does not read, the proxy must stop taking bytes rather than lose or reorder them."""
    data = seeded_bytes(MAX_PIPES * PIPE_SIZE + buffered_by_sockets() + (16 << 20), seed=7)
    sent = threading.Event()

    def send(conn: socket.socket) -> None:
        conn.recv(10)
        for at in range(0, len(data), 3 << 20):  # pieces of odd sizes relative to the pipes
            conn.sendall(data[at : at + (3 << 20)])
        sent.set()

    client = proxied(send)
    client.sendall(b"go")
    assert not sent.wait(1.5), "the proxy took everything from a client that read nothing"
    assert receive_all(client) == data


def test_a_rate_capped_answer_passes_whole_and_the_server_waits(proxied: Connect) -> None:
    """With a rate the proxy holds little of an answer: a server sending far more than the
    socket buffers hold is still sending after a second, and every byte arrives in order."""
    rate = 50e6
    data = seeded_bytes(buffered_by_sockets() + int(2 * rate), seed=9)
    sent = threading.Event()

    def send(conn: socket.socket) -> None:
        conn.recv(10)
        conn.sendall(data)
        sent.set()

    client = proxied(send, rate)
    client.sendall(b"go")
    received = bytearray()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        received += client.recv(1 << 20)
    assert not sent.is_set(), "the proxy took the whole answer in at once"
    assert bytes(received) + receive_all(client) == data


def test_the_request_direction_is_delayed_too(proxied: Connect) -> None:
    arrived: list[float] = []

    def note_arrival(conn: socket.socket) -> None:
        conn.recv(10)
        arrived.append(time.monotonic())

    client = proxied(note_arrival)
    start = time.monotonic()
    client.sendall(b"x")
    assert client.recv(10) == b""
    assert arrived and RTT / 2 <= arrived[0] - start < RTT / 2 + 0.5


def test_one_direction_ends_and_the_other_goes_on(proxied: Connect) -> None:
    """A client that sends its request and shuts its side down still gets the whole answer."""
    data = seeded_bytes(8 << 20, seed=8)

    def answer_after_eof(conn: socket.socket) -> None:
        request = b""
        while chunk := conn.recv(100):
            request += chunk
        assert request == b"the whole request"
        conn.sendall(data)

    client = proxied(answer_after_eof)
    client.sendall(b"the whole request")
    client.shutdown(socket.SHUT_WR)
    assert receive_all(client) == data


def test_stop_ends_a_connection_whose_client_reads_nothing(proxied: Connect) -> None:
    """The fixture stops the proxy while its writer waits on a client that reads nothing, and
    then checks that every thread ended and every pipe and socket was closed."""
    stuck = threading.Event()

    def send_forever(conn: socket.socket) -> None:
        conn.recv(10)
        chunk = bytes(1 << 20)
        try:
            while True:
                conn.sendall(chunk)
                stuck.set()
        except OSError:
            pass  # the proxy went away

    client = proxied(send_forever)
    client.sendall(b"go")
    assert stuck.wait(10)
    time.sleep(0.5)  # let the proxy's buffers fill
