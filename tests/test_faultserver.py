"""The fault server itself, read with http.client (or a raw socket where http.client hides the fault)."""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultserver import FaultServer

pytestmark = pytest.mark.timeout(30)

DATA = bytes(range(256)) * 40  # 10240 bytes
SIZE = len(DATA)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server
    assert not leftover_threads(server), "stop() left threads behind"


def leftover_threads(server: FaultServer) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"faultserver:{server.port}"]


def connect(server: FaultServer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)


def fetch(
    server: FaultServer, path: str = "/f", headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection; returns the response and its whole body."""
    conn = connect(server)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def raw(server: FaultServer, request: str) -> bytes:
    """Send a raw request and return every byte the server writes until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- normal behaviour -------------------------------------------------------------------------


def test_get_sends_full_body_with_validators(server: FaultServer) -> None:
    spec = server.put("/f", DATA)
    response, body = fetch(server)
    assert (response.status, body) == (200, DATA)
    assert response.headers["Content-Length"] == str(SIZE)
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"] == spec.etag and spec.etag is not None and spec.etag.startswith('"')
    assert response.headers["Last-Modified"] == spec.last_modified
    assert server.bytes_sent("/f") == SIZE


def test_head_sends_headers_without_body(server: FaultServer) -> None:
    server.put("/f", DATA)
    response, body = fetch(server, method="HEAD", headers={"Range": "bytes=0-9"})
    assert (response.status, body, response.headers["Content-Length"]) == (200, b"", str(SIZE))
    assert server.bytes_sent() == 0


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=10-19", 10, 19), ("bytes=10000-", 10000, SIZE - 1), ("bytes=-50", SIZE - 50, SIZE - 1),
     ("bytes=10-99999", 10, SIZE - 1), ("bytes=-99999", 0, SIZE - 1)],
)  # fmt: skip
def test_single_range_is_206(server: FaultServer, header: str, first: int, last: int) -> None:
    server.put("/f", DATA)
    response, body = fetch(server, headers={"Range": header})
    assert (response.status, body) == (206, DATA[first : last + 1])
    assert response.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert response.headers["Content-Length"] == str(last - first + 1)


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", "bytes=20000-30000", "bytes=-0"])
def test_unsatisfiable_range_is_416(server: FaultServer, header: str) -> None:
    server.put("/f", DATA)
    response, body = fetch(server, headers={"Range": header})
    assert (response.status, body, response.headers["Content-Range"]) == (416, b"", f"bytes */{SIZE}")


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=9-3", "items=0-1", "bytes=x-"])
def test_multi_or_invalid_range_gets_full_body(server: FaultServer, header: str) -> None:
    server.put("/f", DATA)
    response, body = fetch(server, headers={"Range": header})
    assert (response.status, body) == (200, DATA)


@pytest.mark.parametrize(
    ("if_range", "status"),
    [("etag", 206), ('"other"', 200), ("weak etag", 200), ("date", 206), ("Mon, 01 Jan 2001 00:00:00 GMT", 200)],
)
def test_if_range(server: FaultServer, if_range: str, status: int) -> None:
    spec = server.put("/f", DATA)
    assert spec.etag and spec.last_modified
    value = {"etag": spec.etag, "weak etag": "W/" + spec.etag, "date": spec.last_modified}.get(if_range, if_range)
    response, body = fetch(server, headers={"Range": "bytes=0-9", "If-Range": value})
    assert (response.status, body) == (status, DATA[:10] if status == 206 else DATA)


def test_unknown_path_is_404(server: FaultServer) -> None:
    response, body = fetch(server, "/missing")
    assert (response.status, body) == (404, b"")


def test_keep_alive_serves_many_requests_on_one_connection(server: FaultServer) -> None:
    server.put("/f", DATA)
    conn = connect(server)
    for start in range(0, 1000, 100):
        conn.request("GET", "/f", headers={"Range": f"bytes={start}-{start + 99}"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (206, DATA[start : start + 100])
    conn.close()
    assert len({r.connection for r in server.requests}) == 1
    assert [r.range for r in server.requests][:2] == ["bytes=0-99", "bytes=100-199"]


def test_change_makes_new_validators_and_if_range_then_fails(server: FaultServer) -> None:
    spec = server.put("/f", DATA)
    old_etag, old_date = spec.etag, spec.last_modified
    server.change("/f", DATA)  # even the same bytes are a new version
    assert spec.etag != old_etag and spec.last_modified != old_date
    response, body = fetch(server, headers={"Range": "bytes=0-9", "If-Range": str(old_etag)})
    assert (response.status, body, response.headers["ETag"]) == (200, DATA, spec.etag)


def test_mark_since_and_bytes_sent_per_path(server: FaultServer) -> None:
    server.put("/a", DATA)
    server.put("/b", DATA)
    fetch(server, "/a")
    mark = server.mark()
    fetch(server, "/b", headers={"Range": "bytes=0-99"})
    fetch(server, "/b", method="HEAD")
    assert [(r.method, r.path, r.status) for r in server.since(mark)] == [("GET", "/b", 206), ("HEAD", "/b", 200)]
    assert server.since(mark)[0].header("range") == "bytes=0-99"
    assert (server.bytes_sent("/a"), server.bytes_sent("/b"), server.bytes_sent()) == (SIZE, 100, SIZE + 100)


# -- one test per fault switch ----------------------------------------------------------------


def test_ignore_range(server: FaultServer) -> None:
    server.put("/f", DATA, ignore_range=True)
    response, body = fetch(server, headers={"Range": "bytes=0-9"})
    assert (response.status, body, response.headers["Accept-Ranges"]) == (200, DATA, "bytes")


@pytest.mark.parametrize("value", ["none", None])
def test_accept_ranges(server: FaultServer, value: str | None) -> None:
    server.put("/f", DATA, accept_ranges=value)
    response, _ = fetch(server, method="HEAD")
    assert response.headers["Accept-Ranges"] == value


@pytest.mark.parametrize(("switches", "status"), [({}, 405), ({"head_status": 403}, 403)])
def test_refuse_head(server: FaultServer, switches: dict[str, Any], status: int) -> None:
    server.put("/f", DATA, refuse_head=True, **switches)
    assert fetch(server, method="HEAD")[0].status == status
    assert fetch(server)[0].status == 200


@pytest.mark.parametrize("location", ["/other", "absolute"])
def test_redirect(server: FaultServer, location: str) -> None:
    target = server.url("/other") if location == "absolute" else location
    server.put("/f", b"", redirect=(302, target))
    response, body = fetch(server)
    assert (response.status, response.headers["Location"], body) == (302, target, b"")


def test_gzip_compresses_the_range_whatever_the_client_accepts(server: FaultServer) -> None:
    server.put("/f", DATA, gzip=True)
    response, body = fetch(server, headers={"Range": "bytes=100-199", "Accept-Encoding": "identity"})
    assert (response.status, response.headers["Content-Encoding"]) == (206, "gzip")
    assert response.headers["Content-Length"] == str(len(body))
    assert gzip.decompress(body) == DATA[100:200]


def test_content_range_shift_and_wrong_total(server: FaultServer) -> None:
    server.put("/f", DATA, content_range_shift=5, wrong_total=99)
    response, body = fetch(server, headers={"Range": "bytes=10-19"})
    assert (response.status, body, response.headers["Content-Range"]) == (206, DATA[10:20], "bytes 15-24/99")


def test_cut_after_closes_mid_body_and_counts_bytes(server: FaultServer) -> None:
    server.put("/f", DATA, cut_after=1000)
    conn = connect(server)
    conn.request("GET", "/f")
    response = conn.getresponse()
    assert response.headers["Content-Length"] == str(SIZE)
    with pytest.raises(http.client.IncompleteRead) as cut:
        response.read()
    assert cut.value.partial == DATA[:1000]
    assert server.bytes_sent("/f") == 1000
    response, body = fetch(server, headers={"Range": "bytes=0-99"})  # shorter than the cut: whole
    assert (response.status, body) == (206, DATA[:100])


def test_extra_bytes_follow_the_body(server: FaultServer) -> None:
    server.put("/f", DATA, extra_bytes=7)
    reply = raw(server, "GET /f HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Content-Length: 10" in head
    assert body == DATA[:10] + b"X" * 7
    assert server.bytes_sent() == 17


def test_short_body(server: FaultServer) -> None:
    server.put("/f", DATA, short_body=40)
    conn = connect(server)
    conn.request("GET", "/f", headers={"Range": "bytes=0-99"})
    response = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead) as cut:
        response.read()
    assert (cut.value.partial, cut.value.expected) == (DATA[:60], 40)


def test_fail_next_answers_in_order_then_recovers(server: FaultServer) -> None:
    server.put("/f", DATA, fail_next=[(503, 1.0), (429, None)])
    first, body = fetch(server, method="HEAD")
    second, _ = fetch(server)
    third, body = fetch(server)
    assert (first.status, first.headers["Retry-After"]) == (503, "1")
    assert (second.status, second.headers["Retry-After"]) == (429, None)
    assert (third.status, body) == (200, DATA)


def test_delay_holds_the_headers(server: FaultServer) -> None:
    server.put("/f", DATA, delay=0.3)
    started = time.monotonic()
    assert fetch(server)[0].status == 200
    assert time.monotonic() - started >= 0.3


def test_rate_caps_the_body(server: FaultServer) -> None:
    server.put("/f", DATA, rate=20_000)
    started = time.monotonic()
    assert fetch(server)[1] == DATA
    assert 0.45 <= time.monotonic() - started < 1.5  # 10240 bytes at 20 kB/s: about 0.5 s


def test_stall_after_pauses_mid_body(server: FaultServer) -> None:
    server.put("/f", DATA, stall_after=(1000, 0.6))
    started = time.monotonic()
    conn = connect(server)
    conn.request("GET", "/f")
    response = conn.getresponse()
    assert response.read(1000) == DATA[:1000]
    assert time.monotonic() - started < 0.3
    assert response.read() == DATA[1000:]
    assert time.monotonic() - started >= 0.6


def test_change_after_switches_version_during_a_read(server: FaultServer) -> None:
    new = DATA[::-1]
    spec = server.put("/f", DATA, change_after=100, next_data=new, stall_after=(200, 0.5))
    old_etag = spec.etag
    conn = connect(server)
    conn.request("GET", "/f")
    reading = conn.getresponse()
    assert reading.read(200) == DATA[:200]  # the first response is stalled past its switch point
    during, body = fetch(server, headers={"Range": "bytes=0-9", "If-Range": str(old_etag)})
    assert (during.status, body, during.headers["ETag"]) == (200, new, spec.etag)
    assert spec.etag != old_etag
    assert (reading.headers["ETag"], reading.read()) == (old_etag, DATA[200:])  # old bytes to the end


def test_validators_omitted_or_weak(server: FaultServer) -> None:
    server.put("/bare", DATA, etag=None, last_modified=None)
    server.put("/weak", DATA, etag='W/"x"')
    bare, _ = fetch(server, "/bare", headers={"Range": "bytes=0-9", "If-Range": '"x"'})
    assert (bare.status, bare.headers["ETag"], bare.headers["Last-Modified"]) == (200, None, None)
    weak, _ = fetch(server, "/weak", headers={"Range": "bytes=0-9", "If-Range": 'W/"x"'})
    assert (weak.status, weak.headers["ETag"]) == (200, 'W/"x"')  # If-Range compares strongly


def test_chunked(server: FaultServer) -> None:
    server.put("/f", DATA, chunked=True)
    response, body = fetch(server, headers={"Range": "bytes=0-99"})
    assert (response.status, body, response.headers["Transfer-Encoding"]) == (206, DATA[:100], "chunked")
    assert response.headers["Content-Length"] is None
    reply = raw(server, "GET /f HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n")
    assert reply.endswith(b"\r\n\r\na\r\n" + DATA[:10] + b"\r\n0\r\n\r\n")


def test_set_faults_replaces_the_switches(server: FaultServer) -> None:
    server.put("/f", DATA, ignore_range=True)
    server.set_faults("/f", accept_ranges="none")
    response, body = fetch(server, headers={"Range": "bytes=0-9"})
    assert (response.status, body, response.headers["Accept-Ranges"]) == (206, DATA[:10], "none")


# -- lifecycle and robustness -----------------------------------------------------------------


def test_go_down_then_come_back_on_the_same_port(server: FaultServer) -> None:
    server.put("/f", DATA)
    port = server.port
    conn = connect(server)
    conn.request("GET", "/f")
    conn.getresponse().read()
    server.go_down()
    with pytest.raises(ConnectionRefusedError):
        fetch(server)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.request("GET", "/f")  # the open keep-alive connection was dropped too
        conn.getresponse()
    server.come_back()
    assert (server.port, fetch(server)[1]) == (port, DATA)


def test_bind_a_given_port() -> None:
    with FaultServer() as first:
        port = first.port
    with FaultServer(port=port) as second:
        second.put("/f", DATA)
        assert second.url("/f") == f"http://127.0.0.1:{port}/f"
        assert fetch(second)[1] == DATA


def test_stop_while_stalled_returns_quickly() -> None:
    server = FaultServer().start()
    server.put("/f", DATA, stall_after=(10, 30.0))
    conn = connect(server)
    conn.request("GET", "/f")
    response = conn.getresponse()
    assert response.read(10) == DATA[:10]
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    assert not leftover_threads(server)
    conn.close()


def test_stop_while_a_client_does_not_read_returns_quickly() -> None:
    server = FaultServer().start()
    server.put("/big", bytes(16 << 20))  # more than the socket buffers hold: the writer blocks
    conn = connect(server)
    conn.request("GET", "/big")
    conn.getresponse()
    time.sleep(0.1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    assert not leftover_threads(server)
    conn.close()


def test_client_hanging_up_mid_body_leaves_the_server_serving(server: FaultServer) -> None:
    server.put("/f", DATA, rate=20_000)
    conn = connect(server)
    conn.request("GET", "/f")
    conn.getresponse().read(100)
    conn.close()
    server.set_faults("/f")
    assert fetch(server)[1] == DATA


def test_garbage_request_gets_400(server: FaultServer) -> None:
    assert raw(server, "NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_hang_from_leaves_gets_of_later_ranges_unanswered_and_records_the_close(server: FaultServer) -> None:
    server.put("/f", DATA, hang_from=1000)
    resp, body = fetch(server, headers={"Range": "bytes=0-99"})
    assert resp.status == 206 and body == DATA[:100]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /f HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-1099\r\n\r\n")
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(1)  # no answer
    assert server.requests[-1].closed_at is None
    closed = time.monotonic()
    sock.close()
    deadline = time.monotonic() + 5
    while server.requests[-1].closed_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (server.requests[-1].closed_at or 0) >= closed
    assert server.requests[0].closed_at is None and server.requests[-1].status == 0
