"""Tests of tests/nginx.py against the real nginx binary; HTTP through urllib only."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import alive, children

from nginx import NGINX_BIN, Nginx

pytestmark = pytest.mark.timeout(60)


def test_nginx_is_installed() -> None:
    # a missing nginx is a loud failure (run `make deps`), never a silent skip
    assert Path(NGINX_BIN).exists(), f"no nginx binary at {NGINX_BIN}"

SIZE = 300 * 1024
UNICODE_REL = "sub dir/café.bin"


@pytest.fixture
def content() -> bytes:
    return random.Random(1).randbytes(SIZE)


@pytest.fixture
def www(tmp_path: Path, content: bytes) -> Path:
    www = tmp_path / "www"
    (www / "sub dir").mkdir(parents=True)
    (www / "data.bin").write_bytes(content)
    (www / UNICODE_REL).write_bytes(content[:5000])
    return www


@pytest.fixture
def server(tmp_path: Path, www: Path) -> Iterator[Nginx]:
    (tmp_path / "nginx").mkdir()
    with Nginx(tmp_path / "nginx", www) as nginx:
        yield nginx


@pytest.fixture
def slow_server(tmp_path: Path, www: Path) -> Iterator[Nginx]:
    """Sends 100 KiB/s: the 300 KiB file takes about 2 s (the first second's worth goes at once)."""
    (tmp_path / "nginx").mkdir()
    with Nginx(tmp_path / "nginx", www, slow_rate="100k") as nginx:
        yield nginx


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def test_whole_file(server: Nginx, content: bytes) -> None:
    status, headers, body = fetch(server.url("data.bin"))
    assert status == 200
    assert body == content
    assert headers["ETag"].startswith('"')  # strong
    assert "Last-Modified" in headers
    assert headers["Accept-Ranges"] == "bytes"


def test_range(server: Nginx, content: bytes) -> None:
    status, headers, body = fetch(server.url("data.bin"), headers={"Range": "bytes=1000-1999"})
    assert status == 206
    assert body == content[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{SIZE}"


def test_if_range(server: Nginx, content: bytes) -> None:
    _, headers, _ = fetch(server.url("data.bin"), method="HEAD")
    etag = headers["ETag"]
    status, _, body = fetch(server.url("data.bin"), headers={"Range": "bytes=0-9", "If-Range": etag})
    assert (status, body) == (206, content[:10])
    status, _, body = fetch(server.url("data.bin"), headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (status, body) == (200, content)


def test_nohead(server: Nginx, content: bytes) -> None:
    assert fetch(server.url("nohead/data.bin"), method="HEAD")[0] == 405
    status, _, body = fetch(server.url("nohead/data.bin"), headers={"Range": "bytes=10-19"})
    assert (status, body) == (206, content[10:20])
    assert fetch(server.url("data.bin"), method="HEAD")[0] == 200


def test_slow_serves_same_bytes(server: Nginx, content: bytes) -> None:
    status, _, body = fetch(server.url("slow/data.bin"))
    assert (status, body) == (200, content)


def test_slow_is_rate_limited(slow_server: Nginx, content: bytes) -> None:
    started = time.monotonic()
    assert fetch(slow_server.url("slow/data.bin"))[2] == content
    assert time.monotonic() - started > 0.8
    started = time.monotonic()
    assert fetch(slow_server.url("data.bin"))[2] == content
    assert time.monotonic() - started < 0.5


def test_missing_is_404(server: Nginx) -> None:
    assert fetch(server.url("missing/nothing.bin"))[0] == 404
    assert server.requests()[-1].status == 404


def test_access_log(server: Nginx) -> None:
    fetch(server.url("data.bin"))
    fetch(server.url("data.bin"), headers={"Range": "bytes=1000-1999", "If-Range": '"x"'})
    fetch(server.url("nohead/data.bin"), method="HEAD")
    fetch(server.url("data.bin") + "?q=1", headers={"Range": "bytes=0-99"})
    records = [(r.method, r.path, r.status, r.body_bytes, r.range, r.if_range) for r in server.requests()]
    assert records == [
        ("GET", "/data.bin", 200, SIZE, "", ""),
        ("GET", "/data.bin", 200, SIZE, "bytes=1000-1999", '"x"'),  # If-Range mismatch: whole file
        ("HEAD", "/nohead/data.bin", 405, 0, "", ""),
        ("GET", "/data.bin", 206, 100, "bytes=0-99", ""),
    ]
    assert server.bytes_sent() == 2 * SIZE + 100
    assert server.bytes_sent("data") == 2 * SIZE + 100
    assert server.bytes_sent("nohead/") == 0
    assert server.bytes_sent("other") == 0


def test_log_escaping_round_trips(server: Nginx) -> None:
    if_range = 'x"\tb\\c é\x1b'
    raw = b"GET /data.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\nIf-Range: " + if_range.encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw + b"\r\nConnection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    [record] = server.requests()
    assert (record.range, record.if_range, record.status) == ("bytes=0-0", if_range, 200)


def test_mark_since(server: Nginx) -> None:
    fetch(server.url("data.bin"))
    mark = server.mark()
    assert mark == 1
    fetch(server.url("data.bin"), headers={"Range": "bytes=0-9"})
    fetch(server.url("slow/data.bin"), headers={"Range": "bytes=10-29"})
    assert [r.range for r in server.requests(since=mark)] == ["bytes=0-9", "bytes=10-29"]
    assert server.bytes_sent(since=mark) == 30
    assert server.bytes_sent("slow/", since=mark) == 20
    assert server.bytes_sent() == SIZE + 30
    assert server.mark() == 3


def test_unicode_path(server: Nginx, content: bytes) -> None:
    url = server.url(UNICODE_REL)
    assert url == server.base_url + "/sub%20dir/caf%C3%A9.bin"
    assert fetch(url)[2] == content[:5000]
    assert server.requests()[-1].path == "/" + UNICODE_REL
    assert server.bytes_sent("sub dir/") == 5000


def test_interrupted_transfer_logs_bytes_actually_sent(slow_server: Nginx) -> None:
    with socket.create_connection(("127.0.0.1", slow_server.port)) as sock:
        sock.sendall(b"GET /slow/data.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096)
    deadline = time.monotonic() + 10  # nginx notices the close at its next rate-limited write
    while not slow_server.requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    [record] = slow_server.requests()
    assert record.status == 200
    assert 0 < record.body_bytes < SIZE


def test_stop_kills_master_and_is_idempotent(server: Nginx) -> None:
    pid = server.pid
    assert pid is not None and Path(f"/proc/{pid}").exists()
    server.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert server.pid is None
    server.stop()
    with pytest.raises(OSError):
        fetch(server.url("data.bin"))


def test_stop_without_start_is_harmless(tmp_path: Path) -> None:
    Nginx(tmp_path, tmp_path).stop()


def test_taken_fixed_port_raises(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        nginx = Nginx(tmp_path, tmp_path, port=taken.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match="Address already in use"):
                nginx.start()
            assert nginx.pid is None
        finally:
            nginx.stop()


def test_free_port_is_picked_again_when_taken(tmp_path: Path, www: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nginx as nginx_module

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real_free_port = nginx_module._free_port
        monkeypatch.setattr(nginx_module, "_free_port", lambda: next(ports, None) or real_free_port())
        with Nginx(tmp_path, www) as server:
            assert server.port != taken.getsockname()[1]
            assert fetch(server.url("data.bin"))[0] == 200


def test_stop_kills_a_stuck_master_and_its_worker(server: Nginx, monkeypatch: pytest.MonkeyPatch) -> None:
    import nginx as nginx_module

    master = server.pid
    assert master is not None
    [worker] = children(master)
    os.kill(master, signal.SIGSTOP)  # SIGTERM stays pending: stop() must fall back to SIGKILL
    monkeypatch.setattr(nginx_module, "STOP_TIMEOUT", 0.5)
    server.stop()
    assert not Path(f"/proc/{master}").exists()
    deadline = time.monotonic() + 5  # the worker is not our child: something else reaps it
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)
