"""Guarantees that survived a targeted mutation test of the code: each test here fails when the
line named in its docstring is broken.

Mostly real mounts against FaultServer; a version switch during a data-file read is timed
through the cache directly (a mount cannot hold a pread still). docs/guarantees.md maps every
promise of the README to the tests that defend it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from faultserver import FaultServer, RequestRecord

from rangefs.cache import DEFAULT_BLOCK_SIZE, Cache, CacheConfig
from rangefs.errors import RemoteChanged
from rangefs.fetcher import Fetcher
from rangefs.origin import RemoteFile

from util import Mounts, pread_random, seeded_bytes, wait_until

pytestmark = pytest.mark.timeout(60)

BLOCK = DEFAULT_BLOCK_SIZE
MiB = 1 << 20


def ranged_gets(server: FaultServer, path: str, since: int = 0) -> list[RequestRecord]:
    return [r for r in server.since(since) if r.method == "GET" and r.path == path and r.range is not None]


def _length(record: RequestRecord) -> int:
    assert record.range is not None
    first, last = record.range.removeprefix("bytes=").split("-")
    return int(last) + 1 - int(first)


def read_until_error(path: Path, chunk: int = 128 * 1024) -> tuple[bytes, OSError | None]:
    """Read ``path`` from the start; what came before an error, and the error (None: read to the end)."""
    pieces: list[bytes] = []
    with open(path, "rb", buffering=0) as f:
        while True:
            try:
                piece = f.read(chunk)
            except OSError as exc:
                return b"".join(pieces), exc
            if not piece:
                return b"".join(pieces), None
            pieces.append(piece)


def cat(path: Path) -> bytes:
    done = subprocess.run(["cat", str(path)], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


# -- If-Range on every ranged GET ---------------------------------------------------------------


@pytest.mark.parametrize("validators", ["etag", "date only"])
def test_every_ranged_get_carries_if_range_with_the_files_validator(
    mounts: Mounts, server: FaultServer, validators: str
) -> None:
    """Guards origin.py ``Origin._fetch_once``: ``if remote.if_range: headers["If-Range"] = remote.if_range``
    (and ``RemoteFile.if_range`` choosing a strong ETag, else Last-Modified). Small reads go out from
    the daemon, large prefetches from the fetch helper: both are checked."""
    data = seeded_bytes(6 * MiB + 11, seed=160)
    spec = server.put("/v.bin", data, **({} if validators == "etag" else {"etag": None}))
    m = mounts.mount([server.url("/v.bin")])

    assert pread_random(m.path / "v.bin", 3 * MiB + 5, 1000) == data[3 * MiB + 5 : 3 * MiB + 1005]
    assert cat(m.path / "v.bin") == data
    gets = ranged_gets(server, "/v.bin")
    expected = spec.etag if validators == "etag" else spec.last_modified
    assert expected is not None and len(gets) >= 2
    assert [r.header("If-Range") for r in gets] == [expected] * len(gets), [r.headers for r in gets]
    assert any(_length(r) > MiB for r in gets), "no prefetch went out (from the fetch helper)"


def test_a_change_behind_206s_without_validators_fails_the_old_handle_never_mixing_bytes(
    mounts: Mounts, server: FaultServer
) -> None:
    """Guards origin.py ``Origin._fetch_once``: ``if remote.if_range: headers["If-Range"] = remote.if_range``.
    The server's 206s name no ETag or Last-Modified, so only If-Range can tell that the file
    changed (the server then answers 200 with the whole new file); without it the new version's
    206 would be taken for the old one's bytes."""
    old, new = seeded_bytes(8 * BLOCK, seed=161), seeded_bytes(8 * BLOCK, seed=162)  # same size
    server.put("/bare.bin", old, bare_206=True)
    m = mounts.mount([server.url("/bare.bin")])
    path = m.path / "bare.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 1000, 0) == old[:1000]
        server.change("/bare.bin", new)
        mark = server.mark()
        with pytest.raises(OSError) as failure:
            got = os.pread(fd, 1000, 5 * BLOCK)
            pytest.fail(f"the old handle read {'new' if got == new[5 * BLOCK : 5 * BLOCK + 1000] else 'other'} bytes")
        assert failure.value.errno in (errno.ESTALE, errno.EIO)
        asked = ranged_gets(server, "/bare.bin", mark)
        assert asked and asked[0].status == 200, [(r.range, r.status) for r in asked]
    finally:
        os.close(fd)
    assert wait_until(lambda: pread_random(path, 5 * BLOCK, 1000) == new[5 * BLOCK : 5 * BLOCK + 1000], 10)


@pytest.mark.parametrize("change", ["shrank", "grew"])
def test_a_new_size_under_the_same_validators_fails_the_old_handle_and_reopens_new(
    mounts: Mounts, server: FaultServer, change: str
) -> None:
    """Guards remote.py ``check_range_answer``: ``if resp.status_code in (200, 416): raise RemoteChanged``
    (its 416 half; a 200 of another version is also caught by the ``same_version`` check after it)
    and ``if got[2] != remote.size: raise RemoteChanged``. The server keeps the validators but the
    size changed: If-Range matches, and a range past the new end gets 416, or a 206 names the new
    total. That is a change (ESTALE, and the next open sees the new size), not a bad answer (EIO
    after retries, with every open after it still on the old size)."""
    old = seeded_bytes(8 * BLOCK, seed=167)
    new = seeded_bytes(3 * BLOCK if change == "shrank" else 11 * BLOCK, seed=168)
    spec = server.put("/resized.bin", old)
    m = mounts.mount([server.url("/resized.bin")])
    path = m.path / "resized.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 1000, 0) == old[:1000]
        server.change("/resized.bin", new, etag=spec.etag, last_modified=spec.last_modified)
        mark = server.mark()
        with pytest.raises(OSError) as failure:
            os.pread(fd, 1000, 6 * BLOCK)
        assert [r.status for r in ranged_gets(server, "/resized.bin", mark)][:1] == [416 if change == "shrank" else 206]
        assert failure.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    assert wait_until(lambda: path.stat().st_size == len(new), 10)
    assert cat(path) == new


def test_a_206_longer_than_its_content_range_never_writes_past_the_range(mounts: Mounts, server: FaultServer) -> None:
    """Guards origin.py ``Origin._fetch_once``: ``chunk = chunk[: stop - position]``. The server's 206
    bodies carry garbage past the range they announce; handed on, it would land on the next
    block in the data file, which is already cached and checked in this session, and be served
    from there. ``--direct-io`` so that the second read of that block reaches the daemon."""
    data = seeded_bytes(8 * BLOCK, seed=169)
    server.put("/long.bin", data, long_206=1000)
    m = mounts.mount([server.url("/long.bin")], "--direct-io")
    path = m.path / "long.bin"

    assert pread_random(path, 3 * BLOCK, BLOCK) == data[3 * BLOCK : 4 * BLOCK]
    assert pread_random(path, 2 * BLOCK, BLOCK) == data[2 * BLOCK : 3 * BLOCK]  # its 206 runs on into block 3
    assert pread_random(path, 3 * BLOCK, BLOCK) == data[3 * BLOCK : 4 * BLOCK]
    assert all(r.body_bytes_sent == _length(r) + 1000 for r in ranged_gets(server, "/long.bin"))


# -- a server that ignores Range ---------------------------------------------------------------


@pytest.mark.parametrize("when", ["first GET", "retry"])
@pytest.mark.parametrize("change", ["etag", "size"])
def test_a_range_ignoring_server_serving_another_version_never_mixes_bytes(
    mounts: Mounts, server: FaultServer, when: str, change: str
) -> None:
    """Guards origin.py ``Origin._stream_once``: ``if not same_version(remote, resp) or (length is not
    None and length != str(remote.size)): raise RemoteChanged``. The file changes before the plain
    GET, or while a cut body waits for its retry; ``change`` is a new ETag and Last-Modified, or a
    new size under the same validators (so each half of the check is needed)."""
    old = seeded_bytes(2 * MiB, seed=163)
    new = seeded_bytes(2 * MiB + (BLOCK + 7 if change == "size" else 0), seed=164)
    cut = 700_001
    faults: dict[str, Any] = {"cut_next": [cut], "stall_after": (cut, 2.0)} if when == "retry" else {}
    spec = server.put("/moving.bin", old, ignore_range=True, accept_ranges="none", **faults)
    m = mounts.mount([server.url("/moving.bin")])
    same = {"etag": spec.etag, "last_modified": spec.last_modified} if change == "size" else {}
    if when == "first GET":
        server.change("/moving.bin", new, **same)

    outcome: list[tuple[bytes, OSError | None]] = []
    reader = threading.Thread(target=lambda: outcome.append(read_until_error(m.path / "moving.bin")))
    reader.start()
    try:
        if when == "retry":  # the body stalls at the cut for 2 s: the change lands before the retry
            assert wait_until(lambda: server.bytes_sent("/moving.bin") >= cut, 20)
            server.change("/moving.bin", new, **same)
    finally:
        reader.join(40)
    assert outcome, "the read did not end"
    got, error = outcome[0]
    assert got == old[: len(got)], f"bytes of another version from byte {_first_difference(got, old)}"
    assert error is not None and error.errno in (errno.ESTALE, errno.EIO), error
    if when == "retry":
        assert len(got) >= BLOCK  # the old version's bytes before the cut were served
    assert all(r.range is None for r in server.requests if r.method == "GET")


@pytest.mark.parametrize("accept_ranges", ["none", "bytes"])
def test_a_range_ignoring_server_cutting_bodies_at_varied_points_gives_every_byte_in_place(
    mounts: Mounts, server: FaultServer, accept_ranges: str
) -> None:
    """Guards origin.py ``Origin._stream_once``: ``piece = chunk[max(0, skip - received) : remote.size -
    received]`` and ``await sink(max(skip, received), piece)``: after a cut, the retry's plain GET
    starts again at byte 0 and only bytes past those already delivered go on, at their own offset.
    Cuts land at odd offsets, inside the client's reads. With ``accept_ranges="bytes"`` the server
    claims ranges, and its first 200 (to a ranged GET) takes the first cut."""
    data = seeded_bytes(3 * MiB + 17, seed=165)
    cuts = [100_003, 700_001, 1_300_007, 2_500_011]
    server.put("/cut.bin", data, ignore_range=True, accept_ranges=accept_ranges, cut_next=list(cuts))
    m = mounts.mount([server.url("/cut.bin")])

    got = cat(m.path / "cut.bin")
    assert len(got) == len(data)
    assert got == data, f"first wrong byte at {_first_difference(got, data)}"
    plain = [r for r in server.requests if r.method == "GET" and r.range is None]
    assert len(plain) >= 4, [(r.range, r.body_bytes_sent) for r in server.requests]
    assert plain[0].body_bytes_sent < len(data)  # resumption was exercised


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# -- a weak ETag -------------------------------------------------------------------------------


def test_with_a_weak_etag_ranged_gets_carry_the_date_and_fetch_only_what_is_asked(
    mounts: Mounts, server: FaultServer
) -> None:
    """Guards remote.py ``RemoteFile.if_range``: ``if self.etag and not self.etag.startswith("W/"):
    return self.etag`` (else Last-Modified). A weak ETag in If-Range never matches (RFC 9110
    13.1.5), so the server, as RFC 9110 says, ignores the Range and sends the whole file: a small
    read in the middle would cost the whole file."""
    data = seeded_bytes(8 * MiB, seed=166)
    spec = server.put("/weak.bin", data, etag='W/"weak-1"')
    m = mounts.mount([server.url("/weak.bin")])

    offset = 4 * MiB + 123
    assert pread_random(m.path / "weak.bin", offset, 4096) == data[offset : offset + 4096]
    gets = [r for r in server.requests if r.method == "GET"]
    assert gets and all(r.range is not None for r in gets), [(r.range, r.status) for r in gets]
    assert [(r.header("If-Range"), r.status) for r in gets] == [(spec.last_modified, 206)] * len(gets)
    assert server.bytes_sent("/weak.bin") <= 4 * BLOCK


# -- a data-file read racing a version switch (the cache, without a mount) ------------------------


class _Versions:
    """A stub origin: each version's bytes are the first letter of its ETag, repeated."""

    async def fetch(
        self, remote: RemoteFile, start: int, stop: int, sink: Callable[[int, bytes], Awaitable[None]]
    ) -> None:
        assert remote.etag is not None
        await sink(start, remote.etag[1:2].encode() * (stop - start))


def test_a_data_file_read_racing_a_version_switch_fails_with_remote_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards cachedfile.py ``CachedFile.read``: ``self.check_version(generation)  # the version may have
    switched while we waited`` after ``data = await self.data.pread(end - offset, offset)``. A reader of
    the old version waits in its pread while the file switches to a new version and the new
    version's block is fetched into the data file; its pread then reads the new bytes."""
    old = RemoteFile("http://origin.test/f", 4 * BLOCK, '"old"', None)
    new = RemoteFile("http://origin.test/f", 4 * BLOCK, '"new"', None)
    outcome: list[bytes | str] = []

    async def probe(url: str) -> RemoteFile:
        return new

    async def run() -> None:
        Cache.prepare(tmp_path)
        fetcher = Fetcher(_Versions(), BLOCK)  # type: ignore[arg-type]
        cache = Cache(CacheConfig(tmp_path, block_size=BLOCK), fetcher, probe=probe)
        cached = cache.file(old.url, old)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.serve)
                await cached.acquire()
                assert bytes(await cached.read(0, 100, generation=0)) == b"o" * 100
                real_pread, reading, go_on = cached.data.pread, trio.Event(), trio.Event()

                async def held_pread(size: int, offset: int) -> bytes | bytearray:
                    if not reading.is_set():  # only the old reader's pread waits
                        reading.set()
                        await go_on.wait()
                    return await real_pread(size, offset)

                monkeypatch.setattr(cached.data, "pread", held_pread)

                async def old_reader() -> None:
                    try:
                        outcome.append(bytes(await cached.read(0, 100, generation=0)))
                    except RemoteChanged:
                        outcome.append("RemoteChanged")

                async with trio.open_nursery() as readers:
                    readers.start_soon(old_reader)
                    await reading.wait()
                    assert await cached.revalidate(force=True)
                    assert bytes(await cached.read(0, 100, generation=1)) == b"n" * 100
                    go_on.set()
                await cached.release()
                nursery.cancel_scope.cancel()

    trio.run(run)
    assert outcome == ["RemoteChanged"]


# -- the fault server's switches these tests use -----------------------------------------------


def test_fault_server_cut_next_cuts_successive_bodies_then_sends_them_whole(server: FaultServer) -> None:
    import http.client

    data = bytes(range(256)) * 40
    server.put("/f", data, cut_next=[1000, 3000])
    for expected in (1000, 3000, len(data)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request("HEAD", "/f")  # a HEAD sends no body: it takes no cut
            conn.getresponse().read()
            conn.request("GET", "/f")
            response = conn.getresponse()
            try:
                body = response.read()
            except http.client.IncompleteRead as cut:
                body = cut.partial
            assert body == data[:expected]
        finally:
            conn.close()


def test_fault_server_bare_206_names_no_validator_but_honours_if_range(server: FaultServer) -> None:
    import http.client

    spec = server.put("/f", bytes(1000), bare_206=True)
    for if_range, status in ((spec.etag, 206), ('"other"', 200)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            assert if_range is not None
            conn.request("GET", "/f", headers={"Range": "bytes=0-9", "If-Range": if_range})
            response = conn.getresponse()
            response.read()
            assert response.status == status
            named = (response.getheader("ETag"), response.getheader("Last-Modified"))
            assert named == ((None, None) if status == 206 else (spec.etag, spec.last_modified))
        finally:
            conn.close()


# -- read-only: the daemon's own answers, behind the kernel's -------------------------------------


_CHANGES = ("setattr", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "write", "create",
            "setxattr", "removexattr")


@pytest.mark.parametrize("operation", _CHANGES)
def test_the_daemon_answers_erofs_to_every_change(operation: str) -> None:
    """Guards fs.py ``_erofs``: ``raise pyfuse3.FUSEError(errno.EROFS)`` and the handlers bound to it.
    The mount is also ``ro`` (mount.py ``_mount_fuse``), so through a mount the kernel answers
    first and tests/test_mount.py cannot see this layer: it is called here directly."""
    import pyfuse3

    from rangefs.fs import Filesystem

    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(getattr(Filesystem, operation))
    assert info.value.errno == errno.EROFS


@pytest.mark.parametrize("flag", [os.O_WRONLY, os.O_RDWR, os.O_TRUNC, os.O_APPEND])
def test_the_daemon_refuses_an_open_for_writing_with_erofs(flag: int) -> None:
    """Guards fs.py ``Filesystem.open``: ``if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
    raise pyfuse3.FUSEError(errno.EROFS)`` (behind the kernel's ``ro``, as above)."""
    import pyfuse3

    from rangefs.fs import Filesystem
    from rangefs.tree import Node, Tree

    tree = Tree()
    tree.nodes[2] = Node(2, b"f", pyfuse3.ROOT_INODE, cached=object())  # type: ignore[arg-type]
    fs = Filesystem(tree, None, passthrough=False)  # type: ignore[arg-type]
    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(fs.open, 2, flag, None)  # type: ignore[arg-type]
    assert info.value.errno == errno.EROFS


def test_fault_server_long_206_sends_garbage_past_the_range_it_announces(server: FaultServer) -> None:
    import http.client

    server.put("/f", bytes(1000), long_206=7)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/f", headers={"Range": "bytes=10-19"})
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Range")) == (206, "bytes 10-19/1000")
        assert response.read() == bytes(10) + b"X" * 7
    finally:
        conn.close()
