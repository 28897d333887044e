"""Parallel ranges: a sequential reader of a server that caps each connection gets several
concurrent Range requests, never more than ``--max-connections`` per origin, bytes exact; a reader
that closes mid-stream leaves no request running.

Real mounts against nginx's ``/slow/`` location at 1 MB/s per request after its first MB (its own instance, so
the rate does not depend on the session's). Overlap is computed from the access log: each
request's start ($msec - $request_time) and end ($msec), at millisecond resolution.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from rangefs.limits import Slots
from rangefs.spread import Spread

from nginx import Nginx, Request
from proxy import ThrottleProxy
from util import Mounts, Server, wait_until

SIZE = 32 * 1024 * 1024
RATE = "1m"
SLACK = 0.003  # seconds trimmed off each end of a request: the log's times are rounded to the ms


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("capped")
    www = root / "www"
    www.mkdir()
    with Nginx(root / "conf", www, slow_rate=RATE) as server:
        yield Server(server, www)


def ranged(server: Server, rel: str, since: int) -> list[Request]:
    return [r for r in server.nginx.requests(since) if r.method == "GET" and r.path == "/slow/" + rel and r.range]


def most_at_once(requests: list[Request]) -> int:
    """The most requests served at the same time (ends before starts at equal times)."""
    events = sorted([(r.start + SLACK, 1) for r in requests] + [(r.end - SLACK, -1) for r in requests])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def read_all(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize(("connections", "io"), [(8, "--direct-io"), (3, "--direct-io"), (8, "page cache")])
def test_a_sequential_reader_of_a_capped_server_gets_several_ranges_at_once_within_max_connections(
    mounts: Mounts, capped: Server, connections: int, io: str
) -> None:
    data = os.urandom(SIZE)
    rel = f"seq{connections}{io.strip('-')[0]}.bin"
    capped.put(rel, data)
    since = capped.mark()
    # --direct-io: each read() of the reader reaches rangefs, so the ranges at once are the prefetch's
    # doing. Through the page cache the kernel's readahead adds its own reads (up to two at once).
    direct = [io] if io.startswith("--") else []
    m = mounts.mount([capped.url("slow/" + rel)], "--max-connections", str(connections), *direct)
    assert read_all(m.path / rel) == hashlib.sha256(data).hexdigest()
    requests = ranged(capped, rel, since)
    most = most_at_once(requests)
    assert most <= connections, f"{most} ranges at once with --max-connections {connections}"
    # One range per window step gives about 3 at once (the window's steps overlap); more is the spread.
    assert most >= min(connections, 4), f"at most {most} ranges at once: the reader was not given more connections"


def test_a_reader_that_closes_mid_stream_leaves_no_request_running(mounts: Mounts, capped: Server) -> None:
    data = os.urandom(SIZE)
    rel = "closed.bin"
    capped.put(rel, data)
    since = capped.mark()
    m = mounts.mount([capped.url("slow/" + rel)])
    with open(m.path / rel, "rb") as f:
        read = 0
        # Far enough for the prefetch to spread over several connections.
        while read < 24 * 1024 * 1024:
            chunk = f.read(1024 * 1024)
            assert chunk == data[read : read + len(chunk)]
            read += len(chunk)
        assert wait_until(lambda: most_at_once(ranged(capped, rel, since)) >= 2 or len(ranged(capped, rel, since)) >= 3)
    closed = time.time()
    bound = 3.0
    # Long enough for a fetch that was not cancelled to show: a 16 MiB request at 1 MB/s, and more.
    time.sleep(bound + 5.0)
    fetched_before_unmount = capped.bytes_sent("slow/" + rel, since)
    assert m.unmount().returncode == 0  # cancels what still runs: nginx then logs it, late
    requests = ranged(capped, rel, since)
    late = [r for r in requests if r.end > closed + bound]
    assert not late, f"{len(late)} requests still served {bound:g} s after the close: {late[:3]}"
    assert capped.bytes_sent("slow/" + rel, since) == fetched_before_unmount


def test_slots_never_exceed_their_total_and_serve_urgent_waiters_first() -> None:
    slots = Slots(2)
    order: list[str] = []
    most = 0

    async def hold(name: str, urgent: bool, seconds: float) -> None:
        nonlocal most
        async with slots.hold(urgent):
            most = max(most, slots.used)
            order.append(name)
            await trio.sleep(seconds)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(hold, f"prefetch{i}", False, 1.0)
                await trio.sleep(0.01)
            nursery.start_soon(hold, "read", True, 0.0)

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    assert most == 2
    assert order == ["prefetch0", "prefetch1", "read", "prefetch2", "prefetch3"]


def test_the_spread_doubles_while_it_pays_and_backs_off_when_it_does_not() -> None:
    capped = Spread(8)
    for _ in range(6):  # a try, then its verdict, per doubling
        capped.sample(capped.pieces, 8, 1.0)  # every connection brings the same: a cap per connection
        capped.starved = True
        capped.plan()
    assert capped.pieces == 8
    shared = Spread(8)
    shared.sample(1, 8, 1.0)
    shared.starved = True
    assert shared.plan() == 2
    shared.sample(2, 4, 1.0)  # two connections share what one had
    assert shared.plan() == 1
    shared.starved = True
    assert shared.plan() == 1  # held back one step before the next try


def test_a_reader_behind_slow_connections_gets_more_of_them(
    mounts: Mounts, nginx: Server, throttled: Callable[[float], ThrottleProxy]
) -> None:
    """A server that paces each connection over time (not each request, as nginx's limit_rate
    does) at 2 MB/s: a second of the reader's rate is too short a window to cut into pieces of the
    smallest size, yet the prefetch must spread over several connections, through the page cache."""
    data = os.urandom(32 * 1024 * 1024)
    url = nginx.put("parallel/paced.bin", data)
    proxy = throttled(2e6)
    m = mounts.mount([url.replace(f":{nginx.nginx.port}/", f":{proxy.port}/")], "--max-connections", "8")
    since = nginx.mark()
    assert read_all(m.path / "paced.bin") == hashlib.sha256(data).hexdigest()
    requests = [r for r in nginx.nginx.requests(since) if r.method == "GET" and r.path == "/parallel/paced.bin"]
    connections = {r.connection for r in requests if r.range}
    assert len(connections) >= 4, f"{len(connections)} connections for one sequential reader"
