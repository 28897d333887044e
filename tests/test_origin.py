"""The origin against an in-memory server: every 206 is checked, short bodies resume, liars fail."""

from __future__ import annotations

import pytest
import trio
from fakeorigin import FakeOrigin

from rangefs.errors import BadResponse, RemoteChanged, RemoteUnreachable
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
