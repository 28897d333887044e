"""The origin against an in-memory server and the fault server: every 206 is checked, short bodies
resume, liars fail, trickles end."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing
from fakeorigin import FakeOrigin
from faultserver import FaultServer

from rangefs.errors import BadResponse, RemoteChanged, RemoteUnreachable
from rangefs.limits import Pace
from rangefs.origin import Origin, OriginConfig, RemoteFile

DATA = bytes(range(256)) * 4096  # 1 MiB
URL = "http://origin.test/file.bin"


def fetch(fake: FakeOrigin, start: int, stop: int, retries: int = 2) -> bytes:
    """Probe, then fetch bytes [start, stop) through the origin; returns what the sink got."""
    got = bytearray()

    async def run() -> None:
        async with Origin(OriginConfig(retries=retries, retry_max_delay=0.01), fake.transport()) as origin:
            remote = await origin.probe(URL)

            async def sink(offset: int, chunk: bytes) -> None:
                assert offset == start + len(got)  # in order, no gap, no repeat
                got.extend(chunk)

            await origin.fetch(remote, start, stop, sink)

    trio.run(run)
    return bytes(got)


def test_probe_learns_size_and_validators() -> None:
    async def run() -> RemoteFile:
        async with Origin(transport=FakeOrigin(DATA).transport()) as origin:
            return await origin.probe(URL)

    remote = trio.run(run)
    assert (remote.size, remote.etag, remote.if_range) == (len(DATA), '"v1"', '"v1"')


def test_a_range_is_fetched_with_if_range() -> None:
    fake = FakeOrigin(DATA)
    assert fetch(fake, 1000, 300_000) == DATA[1000:300_000]
    assert fake.requests[-1] == ("GET", "bytes=1000-299999")


def test_a_body_cut_short_resumes_from_the_last_byte() -> None:
    fake = FakeOrigin(DATA, cut_after=100_000)
    assert fetch(fake, 0, len(DATA)) == DATA
    ranges = [r for method, r in fake.requests if method == "GET"]
    assert ranges[:3] == ["bytes=0-1048575", "bytes=100000-1048575", "bytes=200000-1048575"]
    assert len(ranges) == 11  # each attempt made progress, so none counted against the retries


def test_a_lying_content_range_is_never_accepted() -> None:
    fake = FakeOrigin(DATA, content_range_shift=1)
    with pytest.raises(RemoteUnreachable, match="Content-Range"):
        fetch(fake, 0, 1000, retries=2)
    assert len([m for m, _ in fake.requests if m == "GET"]) == 3  # first try + 2 retries, then give up


def test_a_206_of_another_version_is_refused() -> None:
    with pytest.raises(RemoteChanged):
        fetch(FakeOrigin(DATA, answer_etag='"v2"'), 0, 1000)


def test_200_with_the_same_validator_means_no_range_support() -> None:
    with pytest.raises(BadResponse, match="ignores Range"):
        fetch(FakeOrigin(DATA, ignore_ranges=True), 0, 1000)


def test_an_encoded_body_is_not_taken_as_range_bytes() -> None:
    fake = FakeOrigin(DATA)

    async def run() -> None:
        async with Origin(OriginConfig(retries=1, retry_max_delay=0.01), fake.transport()) as origin:
            remote = await origin.probe(URL)
            fake.encoding = "gzip"
            await origin.fetch(remote, 0, 1000, _ignore)

    with pytest.raises(RemoteUnreachable, match="Content-Encoding"):
        trio.run(run)


def test_a_size_from_an_encoded_answer_is_refused_at_probe() -> None:
    with pytest.raises(BadResponse, match="encodes the file"):
        fetch(FakeOrigin(DATA, encoding="gzip"), 0, 1000, retries=1)


def test_changed_file_answers_200_to_if_range() -> None:
    fake = FakeOrigin(DATA)

    async def run() -> None:
        async with Origin(transport=fake.transport()) as origin:
            remote = await origin.probe(URL)
            fake.etag = '"v2"'
            await origin.fetch(remote, 0, 10, _ignore)

    with pytest.raises(RemoteChanged):
        trio.run(run)


async def _ignore(offset: int, chunk: bytes) -> None:
    pass


@pytest.mark.parametrize("url", ["http://a..b/f", "http://⒈.com/f"])
def test_unusable_host_names_are_one_clear_error(url: str) -> None:
    async def run() -> None:
        async with Origin(OriginConfig(retries=0)) as origin:
            await origin.probe(url)

    with pytest.raises(BadResponse, match="not a usable"):
        trio.run(run)


# -- the low-speed limit across attempts ------------------------------------------------------

# A one-second window of 64 KiB, so that trickles show within seconds.
SMALL_WINDOW = OriginConfig(retries=2, retry_max_delay=0.01, low_speed_limit=64 * 1024, low_speed_time=1)


def fetch_all(url: str, config: OriginConfig = SMALL_WINDOW, bound: float = 15) -> bytes:
    """Probe, then fetch the whole file from a real server, failing the test past ``bound`` seconds."""
    got = bytearray()

    async def run() -> None:
        with trio.fail_after(bound):
            async with Origin(config) as origin:
                remote = await origin.probe(url)

                async def sink(offset: int, chunk: bytes) -> None:
                    assert offset == len(got)
                    got.extend(chunk)

                await origin.fetch(remote, 0, remote.size, sink)

    trio.run(run)
    return bytes(got)


def test_a_trickle_by_reconnection_ends_though_every_attempt_makes_progress(server: FaultServer) -> None:
    # Each GET brings 200 bytes in 0.1 s and closes: no attempt lasts long enough to be cut.
    server.put("/drip.bin", DATA, cut_after=200, rate=2000)

    started = time.monotonic()
    with pytest.raises(RemoteUnreachable, match=r"too slow: \d+ B/s over 1\.\d s .*\(gave up after 3 attempts\)"):
        fetch_all(server.url("/drip.bin"))  # without the limit across attempts: 1 MiB at 2 KB/s
    assert time.monotonic() - started < 8
    gets = [r for r in server.requests if r.method == "GET"]
    assert len(gets) >= 6 and all(r.body_bytes_sent == 200 for r in gets)


def test_slow_cuts_between_quick_drops_keep_counting(server: FaultServer) -> None:
    # Odd GETs bring 100 bytes then stall (cut by the limit of the attempt), even ones 50 bytes
    # and close: the drops make progress, and must not forgive the cuts.
    server.put("/alternate.bin", DATA, stall_after=(100, 10.0), cut_next=[1000, 50] * 20)

    started = time.monotonic()
    with pytest.raises(RemoteUnreachable, match=r"too slow: 100 B/s over 1 s \(gave up after 3 attempts\)"):
        fetch_all(server.url("/alternate.bin"))  # without it: 20 cuts of 1 s, then more
    assert time.monotonic() - started < 8
    assert len([r for r in server.requests if r.method == "GET"]) == 5  # cut, drop, cut, drop, cut


def test_bodies_cut_short_but_fast_still_complete(server: FaultServer) -> None:
    # Each GET brings 32000 bytes, under a window's 64 KiB, at 512 KiB/s: well over the limit.
    server.put("/cut.bin", DATA, cut_after=32_000, rate=512 * 1024)
    config = OriginConfig(retries=0, low_speed_limit=64 * 1024, low_speed_time=1)
    assert fetch_all(server.url("/cut.bin"), config) == DATA  # lasts longer than a window
    assert len([r for r in server.requests if r.method == "GET"]) == 33


def test_the_pace_forgives_slow_windows_once_one_brings_enough() -> None:
    async def run() -> None:
        pace = Pace(1000, 1.0, 0)
        await trio.sleep(0.5)
        assert pace.judge(100) is None  # the window is not over
        await trio.sleep(0.6)
        assert pace.judge(200) == "too slow: 182 B/s over 1.1 s of attempts that broke off"
        await trio.sleep(1.5)
        assert pace.judge(300) is not None and pace.slow == 2
        assert pace.judge(1300) is None and pace.slow == 0  # enough bytes, however soon
        for off in (Pace(0, 1.0, 0), Pace(1000, 0, 0)):
            await trio.sleep(2)
            assert off.judge(1) is None and off.slow == 0

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_busy_answer_that_asks_for_no_wait_still_counts(server: FaultServer) -> None:
    server.put("/busy.bin", b"b" * 1000, fail_next=[(503, 0)] * 10)

    with pytest.raises(RemoteUnreachable, match=r"503.*gave up after 3 attempts"):
        fetch_all(server.url("/busy.bin"))
    assert len(server.requests) == 3
