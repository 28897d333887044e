"""Real mounts against FaultServer: each misbehaviour of an origin, read through the mount.

Every test reads through a real rangefs mount (the CLI, a daemon, the kernel) and compares the
bytes with the source; where it says something, it also checks what the server was asked and sent.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import FaultServer, RequestRecord

from util import Mounts, seeded_bytes, wait_until

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
PAGE_READ = 128 * 1024  # at most one FUSE read: a handle's first read never starts rangefs readahead
# A read that fails costs each block run it needs 1 + --retries requests; with --retries 1 and a
# 1 MiB file, the kernel's readahead and its retry of the first page make 5-6 (observed): a few
# more is noise, a request loop is not.
MAX_FAILING_GETS = 12


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    server = FaultServer().start()
    try:
        yield server
    finally:
        server.stop()


# -- helpers ----------------------------------------------------------------------------------


def gets(server: FaultServer, path: str, since: int = 0) -> list[RequestRecord]:
    return [r for r in server.since(since) if r.method == "GET" and r.path == path]


def requested(record: RequestRecord) -> tuple[int, int]:
    """The (first, last) byte of a request's ``bytes=first-last`` Range header."""
    assert record.range is not None and record.range.startswith("bytes="), record.headers
    first, last = record.range.removeprefix("bytes=").split("-")
    return int(first), int(last)


def gets_once_quiet(server: FaultServer, path: str, quiet: float = 0.5, timeout: float = 5.0) -> list[RequestRecord]:
    """The GETs of ``path`` once the server has heard nothing for ``quiet`` seconds (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while True:
        heard = len(server.requests)
        time.sleep(quiet)
        if len(server.requests) == heard or time.monotonic() > deadline:
            return gets(server, path)


def length(record: RequestRecord) -> int:
    first, last = requested(record)
    return last + 1 - first


def resumed_after(requests: list[RequestRecord], record: RequestRecord) -> list[tuple[int, int]]:
    """The ranges asked for after ``record``."""
    index = next(i for i, r in enumerate(requests) if r is record)
    return [requested(r) for r in requests[index + 1 :]]


def cat(path: Path) -> bytes:
    done = subprocess.run(["cat", str(path)], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def read_until_error(path: Path, chunk: int = PAGE_READ) -> tuple[bytes, OSError | None]:
    """Read ``path`` from the start in ``chunk``-sized reads; what came before an error, and the error."""
    pieces: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                piece = os.read(fd, chunk)
            except OSError as exc:
                return b"".join(pieces), exc
            if not piece:
                return b"".join(pieces), None
            pieces.append(piece)
    finally:
        os.close(fd)


def read_range_randomly(path: Path, start: int, stop: int) -> bytes:
    """Read ``start..stop`` so that nothing past it is fetched: no kernel readahead (FADV_RANDOM),
    and a fresh handle per single-FUSE-read piece, so rangefs never sees a sequential reader."""
    pieces = []
    for offset in range(start, stop, PAGE_READ):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            pieces.append(os.pread(fd, min(PAGE_READ, stop - offset), offset))
        finally:
            os.close(fd)
    return b"".join(pieces)


# -- probing ----------------------------------------------------------------------------------


def test_refused_head_falls_back_to_a_one_byte_get(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(1 * MiB + 7, seed=101)
    fault_server.put("/nohead.bin", data, refuse_head=True)
    m = mounts.mount([fault_server.url("/nohead.bin")])

    probe = fault_server.requests
    assert [(r.method, r.status) for r in probe] == [("HEAD", 405), ("GET", 206)]
    assert probe[1].range == "bytes=0-0"
    assert os.stat(m.path / "nohead.bin").st_size == len(data)
    assert cat(m.path / "nohead.bin") == data
    assert fault_server.bytes_sent("/nohead.bin") == 1 + len(data)  # the probe's byte, then each byte once


@pytest.mark.parametrize("status", [302, 307])
def test_redirect_is_followed_once_and_ranges_go_to_the_final_url(
    fault_server: FaultServer, mounts: Mounts, status: int
) -> None:
    data = seeded_bytes(2 * MiB + 3, seed=102)
    fault_server.put("/real.bin", data)
    fault_server.put("/link.bin", b"", redirect=(status, "/real.bin"))
    m = mounts.mount([fault_server.url("/link.bin")])
    mark = fault_server.mark()

    assert (m.path / "link.bin").read_bytes() == data
    via_link = [r for r in fault_server.requests if r.path == "/link.bin"]
    # the probe only: the lean client's HEAD, then httpx's, which follows the redirect
    assert [(r.method, r.status) for r in via_link] == [("HEAD", status)] * 2
    assert {r.path for r in fault_server.since(mark)} == {"/real.bin"}
    assert fault_server.bytes_sent("/real.bin") == len(data)


def test_redirect_to_another_origin_drops_the_credentials(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(1 * MiB + 11, seed=103)
    with FaultServer() as other:
        other.put("/real.bin", data)
        # One 503 first: the probe's retry logs the listed URL, so the log has a chance to leak.
        fault_server.put("/link.bin", b"", redirect=(302, other.url("/real.bin")), fail_next=[(503, None)])
        url = fault_server.url("/link.bin").replace("http://", "http://user:secret@")
        m = mounts.mount([url], "-v")

        assert (m.path / "link.bin").read_bytes() == data
        assert other.requests and gets(other, "/real.bin")
        assert all(r.header("Authorization") is None for r in other.requests)
        assert fault_server.requests
        # the lean client's HEAD, then httpx's, which follows the redirect
        assert [r.status for r in fault_server.requests] == [503, 302, 302]
        assert all((r.header("Authorization") or "").startswith("Basic ") for r in fault_server.requests)
        assert m.unmount().returncode == 0
    log = (m.cache_dir / "rangefs.log").read_text()
    assert f"127.0.0.1:{fault_server.port}/link.bin" in log  # the log names the listed URL...
    assert m.result is not None
    assert "secret" not in log + m.result.stderr  # ...never its password


def test_redirect_to_a_non_http_scheme_fails_the_mount_in_one_line(fault_server: FaultServer, mounts: Mounts) -> None:
    fault_server.put("/link.bin", b"", redirect=(302, "ftp://127.0.0.1/x"))
    m = mounts.mount(["# line 1 is a comment", fault_server.url("/link.bin")], "--retries", "1", check=False)

    assert m.result is not None and m.result.returncode != 0
    assert not m.mounted()
    lines = m.result.stderr.splitlines()
    assert len(lines) == 1, m.result.stderr
    assert lines[0].startswith("rangefs: ") and "Traceback" not in m.result.stderr
    assert f"{m.url_list} line 2" in lines[0]
    assert "/link.bin" in lines[0]


# -- broken bodies ----------------------------------------------------------------------------


def test_cut_bodies_resume_from_the_last_byte(fault_server: FaultServer, mounts: Mounts) -> None:
    cut = 100_000
    data = seeded_bytes(2 * MiB, seed=104)
    fault_server.put("/cut.bin", data, cut_after=cut)
    m = mounts.mount([fault_server.url("/cut.bin")])

    assert (m.path / "cut.bin").read_bytes() == data
    assert fault_server.bytes_sent("/cut.bin") <= len(data) + 3 * cut
    requests = gets(fault_server, "/cut.bin")
    cut_short = [r for r in requests if r.body_bytes_sent < length(r)]
    assert cut_short
    for record in cut_short:  # each cut is picked up exactly where it happened
        first, last = requested(record)
        assert record.body_bytes_sent == cut
        assert (first + cut, last) in resumed_after(requests, record)


def test_short_body_is_resumed(fault_server: FaultServer, mounts: Mounts) -> None:
    short = 1000
    data = seeded_bytes(1 * MiB + 5, seed=105)
    fault_server.put("/short.bin", data)
    m = mounts.mount([fault_server.url("/short.bin")])
    fault_server.set_faults("/short.bin", short_body=short)
    # A body always `short` bytes short never ends: the request for its last bytes gets none.
    # So the fault lasts until the server has sent one short body; the resume must then complete it.
    stop = threading.Event()

    def heal() -> None:
        if wait_until(
            lambda: stop.is_set() or any(r.status == 206 for r in gets(fault_server, "/short.bin")),
            timeout=20,
            interval=0.005,
        ):
            fault_server.set_faults("/short.bin")

    healer = threading.Thread(target=heal)
    healer.start()
    try:
        assert (m.path / "short.bin").read_bytes() == data
    finally:
        stop.set()
        healer.join(timeout=30)
    requests = gets(fault_server, "/short.bin")
    cut = [r for r in requests if 0 < r.body_bytes_sent < length(r)]
    assert cut, "no body was cut short"
    for record in cut:
        first, last = requested(record)
        assert record.body_bytes_sent == length(record) - short
        assert (first + record.body_bytes_sent, last) in resumed_after(requests, record)


def test_extra_bytes_after_the_body_are_ignored(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(2 * MiB + 9, seed=106)
    fault_server.put("/extra.bin", data, extra_bytes=5000)
    m = mounts.mount([fault_server.url("/extra.bin")])

    assert (m.path / "extra.bin").read_bytes() == data
    requests = gets(fault_server, "/extra.bin")
    assert all(r.status == 206 for r in requests)
    ranges = [requested(r) for r in requests]
    assert len(set(ranges)) == len(ranges)  # no request was repeated
    assert sum(last + 1 - first for first, last in ranges) == len(data)


# -- answers that do not match the request ----------------------------------------------------


def test_lying_content_range_fails_the_read(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(1 * MiB, seed=107)
    fault_server.put("/shift.bin", data, content_range_shift=1000)
    m = mounts.mount([fault_server.url("/shift.bin")], "--retries", "1")

    got, error = read_until_error(m.path / "shift.bin")
    assert got == b"" and error is not None and error.errno == errno.EIO
    assert 2 <= len(gets_once_quiet(fault_server, "/shift.bin")) <= MAX_FAILING_GETS


def test_wrong_total_size_fails_the_read(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(1 * MiB, seed=108)
    fault_server.put("/total.bin", data, wrong_total=len(data) + 1)
    m = mounts.mount([fault_server.url("/total.bin")], "--retries", "1")

    got, error = read_until_error(m.path / "total.bin")
    assert got == b"" and error is not None and error.errno in (errno.ESTALE, errno.EIO)
    assert 1 <= len(gets_once_quiet(fault_server, "/total.bin")) <= MAX_FAILING_GETS


def test_gzip_body_to_a_ranged_get_fails_the_read(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(1 * MiB, seed=109)
    fault_server.put("/gz.bin", data)
    m = mounts.mount([fault_server.url("/gz.bin")], "--retries", "1")
    fault_server.set_faults("/gz.bin", gzip=True)

    got, error = read_until_error(m.path / "gz.bin")
    assert got == b"" and error is not None and error.errno == errno.EIO
    assert 2 <= len(gets_once_quiet(fault_server, "/gz.bin")) <= MAX_FAILING_GETS


def test_a_server_that_encodes_even_head_fails_the_mount_naming_it(fault_server: FaultServer, mounts: Mounts) -> None:
    fault_server.put("/gzall.bin", seeded_bytes(100_000, seed=116), gzip=True)
    m = mounts.mount([fault_server.url("/gzall.bin")], "--retries", "1", check=False)

    assert m.result is not None and m.result.returncode != 0 and not m.mounted()
    lines = m.result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rangefs: "), m.result.stderr
    assert f"{m.url_list} line 1" in lines[0] and "/gzall.bin" in lines[0] and "gzip" in lines[0]


def test_range_gets_ask_for_the_identity_encoding(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(1 * MiB, seed=115)
    fault_server.put("/plain.bin", data)
    m = mounts.mount([fault_server.url("/plain.bin")])

    assert (m.path / "plain.bin").read_bytes() == data
    requests = gets(fault_server, "/plain.bin")
    assert requests
    assert [r.header("Accept-Encoding") for r in requests] == ["identity"] * len(requests)


# -- a server that is busy, gone, slow or changing --------------------------------------------


def test_503_and_429_are_retried_after_retry_after(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(1 * MiB + 13, seed=110)
    fault_server.put("/busy.bin", data)
    m = mounts.mount([fault_server.url("/busy.bin")], "--retries", "2")
    fault_server.set_faults("/busy.bin", fail_next=[(503, 1), (429, None)])
    mark = fault_server.mark()

    started = time.monotonic()
    assert (m.path / "busy.bin").read_bytes() == data
    took = time.monotonic() - started
    statuses = [r.status for r in gets(fault_server, "/busy.bin", mark)]
    # The read may start two runs at once; the server logs requests as they arrive but hands out
    # the failures as it answers, so the first two may be logged in either order.
    assert sorted(statuses[:2]) == [429, 503], statuses
    assert statuses[2:] and all(s == 206 for s in statuses[2:]), statuses
    assert took >= 0.9  # the 503 asked for 1 s
    assert fault_server.bytes_sent("/busy.bin") == len(data)


def test_server_down_then_back_without_a_remount(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(2 * MiB, seed=111)
    half = len(data) // 2
    fault_server.put("/away.bin", data)
    m = mounts.mount([fault_server.url("/away.bin")], "--retries", "1", "--connect-timeout", "1")
    path = m.path / "away.bin"

    assert read_range_randomly(path, 0, half) == data[:half]
    assert all(requested(r)[1] < half for r in gets(fault_server, "/away.bin")), "the second half is cached"
    sent = fault_server.bytes_sent("/away.bin")
    fault_server.go_down()

    assert read_range_randomly(path, 0, half) == data[:half]  # from the cache
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        read_range_randomly(path, half, len(data))
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 5

    mark = fault_server.mark()
    fault_server.come_back()
    with open(path, "rb") as f:
        f.seek(half)
        assert f.read() == data[half:]
    assert gets(fault_server, "/away.bin", mark)
    assert fault_server.bytes_sent("/away.bin") == sent + len(data) - half


def test_stalled_body_times_out_and_resumes(fault_server: FaultServer, mounts: Mounts) -> None:
    stall_at = 300_000
    data = seeded_bytes(1 * MiB + 17, seed=112)
    fault_server.put("/slow.bin", data, stall_after=(stall_at, 5.0))
    m = mounts.mount([fault_server.url("/slow.bin")], "--read-timeout", "1")

    started = time.monotonic()
    assert (m.path / "slow.bin").read_bytes() == data
    assert time.monotonic() - started < 4.5
    requests = gets(fault_server, "/slow.bin")
    stalled = [r for r in requests if r.body_bytes_sent < length(r)]
    assert stalled, "no body stalled"
    for record in stalled:
        first, last = requested(record)
        assert record.body_bytes_sent == stall_at
        assert (first + stall_at, last) in resumed_after(requests, record)


def test_change_mid_read_never_mixes_versions(fault_server: FaultServer, mounts: Mounts) -> None:
    old = seeded_bytes(2 * MiB, seed=113)
    new = seeded_bytes(2 * MiB, seed=114)
    fault_server.put("/moving.bin", old, change_after=500_000, next_data=new)
    m = mounts.mount([fault_server.url("/moving.bin")])

    got, error = read_until_error(m.path / "moving.bin")
    if error is None:
        assert got == old
    else:
        assert error.errno in (errno.ESTALE, errno.EIO), error
        assert got == old[: len(got)]  # whatever came before the error is the old version
    assert fault_server.bytes_sent("/moving.bin") >= 500_000  # the change did happen mid-body
    # Once the read is over, nothing goes on fetching: a reader caught by the version switch
    # must fail or finish, not loop on requests.
    requests = gets_once_quiet(fault_server, "/moving.bin")
    assert len(requests) <= MAX_FAILING_GETS, f"{len(requests)} GETs, {fault_server.bytes_sent()} bytes sent"


# -- servers that ignore Range ---------------------------------------------------------------


def test_a_server_without_ranges_is_streamed_into_the_cache(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(3 * MiB + 17, seed=120)
    fault_server.put("/whole.bin", data, ignore_range=True, accept_ranges="none")
    m = mounts.mount([fault_server.url("/whole.bin")])

    tail = subprocess.run(["tail", "-c", "1000", str(m.path / "whole.bin")], capture_output=True, timeout=30)
    assert tail.stdout == data[-1000:]  # a read at the end waits for the stream to get there
    assert cat(m.path / "whole.bin") == data  # then everything is cached
    requests = gets(fault_server, "/whole.bin")
    assert [r.range for r in requests] == [None], "one plain GET, no ranged ones"
    assert fault_server.bytes_sent("/whole.bin") == len(data)


def test_a_server_that_ignores_range_while_claiming_it_is_streamed(
    fault_server: FaultServer, mounts: Mounts
) -> None:
    data = seeded_bytes(2 * MiB + 5, seed=121)
    fault_server.put("/liar.bin", data, ignore_range=True)  # says Accept-Ranges: bytes
    log = mounts.tmp / "liar.log"
    m = mounts.mount([fault_server.url("/liar.bin")], "--log-file", str(log))

    assert cat(m.path / "liar.bin") == data
    plain = [r for r in gets(fault_server, "/liar.bin") if r.range is None]
    assert len(plain) == 1, [r.range for r in gets(fault_server, "/liar.bin")]
    assert log.read_text().count("ignores Range requests; streaming") == 1  # warned once


def test_chunked_range_bodies_are_read_through_httpx(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(2 * MiB + 3, seed=122)
    fault_server.put("/chunked.bin", data, chunked=True)
    m = mounts.mount([fault_server.url("/chunked.bin")])

    assert cat(m.path / "chunked.bin") == data
    assert all(r.status == 206 for r in gets(fault_server, "/chunked.bin"))


def test_retry_time_bounds_retrying_whatever_the_count(fault_server: FaultServer, mounts: Mounts) -> None:
    data = seeded_bytes(1 * MiB, seed=123)
    fault_server.put("/busy.bin", data)
    m = mounts.mount([fault_server.url("/busy.bin")], "--retries", "10", "--retry-time", "2")
    mark = fault_server.mark()
    fault_server.set_faults("/busy.bin", fail_next=[(503, 1)] * 50)

    started = time.monotonic()
    fd = os.open(m.path / "busy.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        with pytest.raises(OSError) as failure:
            os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    assert failure.value.errno == errno.EIO
    assert time.monotonic() - started < 6  # 10 retries 1 s apart would take 10 s
    assert 2 <= len(gets(fault_server, "/busy.bin", mark)) <= 8
