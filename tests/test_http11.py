"""The lean range client (rangefs.http11) against FaultServer on 127.0.0.1."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest
import trio
from faultserver import FaultServer

from rangefs.http11 import RangeClient

from util import seeded_bytes

pytestmark = pytest.mark.timeout(30)
DATA = seeded_bytes(300_000, seed=11)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as fault_server:
        fault_server.put("/d.bin", DATA)
        yield fault_server


async def get(client: RangeClient, url: str, first: int, last: int) -> tuple[int, httpx.Headers, bytes]:
    async with client.get(url, {"Range": f"bytes={first}-{last}"}) as resp:
        body = b"".join([chunk async for chunk in resp.aiter_raw()])
        return resp.status_code, resp.headers, body


def run_with_client(fn, read_timeout: float = 5.0):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with RangeClient(connect_timeout=2.0, read_timeout=read_timeout) as client:
            return await fn(client)

    return trio.run(main)


def test_ranges_come_back_exact_over_one_kept_connection(server: FaultServer) -> None:
    async def fn(client: RangeClient) -> list[tuple[int, bytes]]:
        return [(s, b) for s, _, b in [await get(client, server.url("/d.bin"), a, b) for a, b in
                                       [(0, 99), (1000, 200_999), (299_990, 299_999)]]]

    got = run_with_client(fn)
    assert got == [(206, DATA[0:100]), (206, DATA[1000:201_000]), (206, DATA[299_990:])]
    assert len({r.connection for r in server.requests}) == 1  # keep-alive
    assert all(r.header("Host") == f"127.0.0.1:{server.port}" for r in server.requests)


def test_a_connection_the_server_closed_is_replaced_transparently(server: FaultServer) -> None:
    async def fn(client: RangeClient) -> bytes:
        await get(client, server.url("/d.bin"), 0, 9)
        server.go_down()  # drops the kept connection
        server.come_back()
        return (await get(client, server.url("/d.bin"), 10, 19))[2]

    assert run_with_client(fn) == DATA[10:20]


def test_a_cut_body_raises_and_the_connection_is_not_kept(server: FaultServer) -> None:
    server.set_faults("/d.bin", cut_after=50_000)

    async def fn(client: RangeClient) -> tuple[type[BaseException], int]:
        try:
            await get(client, server.url("/d.bin"), 0, 199_999)
        except httpx.TransportError as exc:
            server.set_faults("/d.bin")
            status, _, body = await get(client, server.url("/d.bin"), 0, 9)
            assert body == DATA[:10] and status == 206
            return type(exc), len({r.connection for r in server.requests})
        raise AssertionError("a cut body went unnoticed")

    error, connections = run_with_client(fn)
    assert issubclass(error, httpx.RemoteProtocolError)
    assert connections == 2


def test_bytes_after_the_body_are_never_delivered_nor_the_connection_reused(server: FaultServer) -> None:
    server.set_faults("/d.bin", extra_bytes=5000)

    async def fn(client: RangeClient) -> bytes:
        body = (await get(client, server.url("/d.bin"), 0, 99))[2]
        server.set_faults("/d.bin")
        await get(client, server.url("/d.bin"), 0, 9)
        return body

    assert run_with_client(fn) == DATA[:100]
    assert len({r.connection for r in server.requests}) == 2


def test_a_stalled_body_times_out(server: FaultServer) -> None:
    server.set_faults("/d.bin", stall_after=(10_000, 3.0))

    async def fn(client: RangeClient) -> None:
        await get(client, server.url("/d.bin"), 0, 99_999)

    with pytest.raises(httpx.ReadTimeout):
        run_with_client(fn, read_timeout=0.5)


def test_user_info_becomes_basic_auth_and_statuses_pass_through(server: FaultServer) -> None:
    url = server.url("/d.bin").replace("http://", "http://us%40er:p%23ss@")
    server.set_faults("/d.bin", fail_next=[(503, 2)])

    async def fn(client: RangeClient) -> tuple[int, str | None]:
        status, headers, _ = await get(client, url, 0, 9)
        return status, headers.get("Retry-After")

    assert run_with_client(fn) == (503, "2")
    expected = "Basic " + base64.b64encode(b"us@er:p#ss").decode()
    assert server.requests[0].header("Authorization") == expected


def test_unreachable_server_raises_connect_error() -> None:
    with FaultServer() as gone:
        url = gone.url("/x")
        gone.go_down()

        async def fn(client: RangeClient) -> None:
            await get(client, url, 0, 9)

        with pytest.raises(httpx.ConnectError):
            run_with_client(fn)


def test_a_chunked_answer_is_refused_before_any_byte(server: FaultServer) -> None:
    from rangefs.http11 import UnsupportedResponse

    server.set_faults("/d.bin", chunked=True)

    async def fn(client: RangeClient) -> None:
        await get(client, server.url("/d.bin"), 0, 99)

    with pytest.raises(UnsupportedResponse):
        run_with_client(fn)
