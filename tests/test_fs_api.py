"""Filesystem's operations called directly, without a kernel: what the FUSE adapter answers.

Like s3ql's tests/t3_fs_api.py: the operations run in trio over a real cache directory and an
in-memory origin (one FakeOrigin per path, behind one httpx.MockTransport), with the cache's
background task running as in a mount. No /dev/fuse, no root, no nginx, no subprocess: these
run under `make unit`. What needs a kernel (passthrough, spliced replies, drop-behind, the
kernel's INIT) is left to the real-mount tests.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pyfuse3
import pytest
import trio
from fakeorigin import FakeOrigin

from rangefs.cache import Cache, CacheConfig
from rangefs.fetcher import Fetcher
from rangefs.fs import Filesystem
from rangefs.origin import Origin, OriginConfig
from rangefs.tree import Tree
from rangefs.urllist import Entry

BLOCK = 64 * 1024
HOST = "http://user:secret@origin.test"
QUERY = "?sig=secret"  # a signed URL's secret: redacted like the userinfo
BIG = os.urandom(6 * BLOCK + 1234)
FILES = {  # path in the mount -> content
    "big.bin": BIG,
    "dir/sub/hello.txt": b"hello, world\n",
    "dir/small.bin": os.urandom(3000),
    "empty": b"",
}


class Origins:
    """Several FakeOrigins behind one transport, by URL path; a path not listed answers 404."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.fakes = {"/" + path: FakeOrigin(data) for path, data in files.items()}
        self.gone: set[str] = set()  # paths that answer 404 from now on

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        fake = self.fakes.get(request.url.path)
        if fake is None or request.url.path in self.gone:
            return httpx.Response(404)
        return fake.handle(request)

    def requests(self, path: str) -> list[tuple[str, str]]:
        return self.fakes["/" + path].requests

    def gets(self, path: str) -> list[str]:
        return [r for method, r in self.requests(path) if method == "GET"]


@dataclass
class Mount:
    """A Filesystem as mount builds it (see rangefs.mount._serve_files), without the kernel."""

    fs: Filesystem
    cache: Cache
    origins: Origins
    nursery: trio.Nursery
    ctx: pyfuse3.RequestContext = field(default_factory=pyfuse3.RequestContext)

    async def inode(self, path: str) -> pyfuse3.InodeT:
        """The inode of ``path``, looked up one name at a time from the root."""
        inode = pyfuse3.ROOT_INODE
        for name in path.split("/"):
            inode = (await self.fs.lookup(inode, os.fsencode(name), self.ctx)).st_ino
        return inode

    async def open(self, path: str, flags: int = os.O_RDONLY) -> pyfuse3.FileHandleT:
        return (await self.fs.open(await self.inode(path), flags, self.ctx)).fh

    async def read(self, fh: pyfuse3.FileHandleT, offset: int, size: int) -> bytes:
        data = await self.fs.read(fh, offset, size)
        # splice_replies is off without a kernel: never a FileSlice (fd, offset, size)
        assert isinstance(data, bytes | bytearray | memoryview), data
        return bytes(data)


def run_mount(tmp_path: Path, body: Callable[[Mount], Awaitable[None]], origins: Origins | None = None) -> Origins:
    """Run ``body`` against a Filesystem over FILES, with the cache's task group running."""
    origins = origins or Origins(FILES)

    async def run() -> None:
        Cache.prepare(tmp_path)
        config = OriginConfig(retries=0)  # an origin error reaches the reader at once
        async with Origin(config, transport=origins.transport()) as origin:
            cache = Cache(CacheConfig(tmp_path, block_size=BLOCK), Fetcher(origin, BLOCK), probe=origin.probe)
            files = []
            for line, path in enumerate(FILES, start=1):
                entry = Entry(f"{HOST}/{path}{QUERY}", tuple(path.split("/")), line)
                files.append((entry, cache.file(entry.url, await origin.probe(entry.url))))
            fs = Filesystem(Tree.build(files), cache, passthrough=False)
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    await nursery.start(cache.serve)
                    await body(Mount(fs, cache, origins, nursery))
                    nursery.cancel_scope.cancel()
            for cached in cache:  # as mount's _shutdown
                await cached.checkpoint()
                await cached.close()

    trio.run(run)
    return origins


def fuse_errno(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return excinfo.value.errno


@pytest.fixture(autouse=True)
def expected_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Fail a test on any WARNING or worse from rangefs whose message holds none of the strings
    the test adds here (as s3ql's tests do): a quiet path must stay quiet."""
    expected: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="rangefs"):
        yield expected
    unexpected = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.WARNING
                  and r.name.startswith("rangefs") and not any(e in r.getMessage() for e in expected)]
    assert unexpected == []


@pytest.fixture
def replies(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[bytes, int, int]]]:
    """What readdir hands to pyfuse3.readdir_reply: (name, inode, next id); the token is ignored."""
    entries: list[tuple[bytes, int, int]] = []

    def reply(token: Any, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        entries.append((name, attrs.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    yield entries


# --- the tree: lookup, getattr, readdir ---


def test_lookup_finds_names_and_nested_directories_and_answers_enoent(tmp_path: Path) -> None:
    async def body(m: Mount) -> None:
        fs, ctx = m.fs, m.ctx
        root = pyfuse3.ROOT_INODE
        dir_ = (await fs.lookup(root, b"dir", ctx)).st_ino
        sub = (await fs.lookup(dir_, b"sub", ctx)).st_ino
        hello = (await fs.lookup(sub, b"hello.txt", ctx)).st_ino
        assert len({root, dir_, sub, hello}) == 4
        assert await m.inode("dir/sub/hello.txt") == hello
        assert (await fs.lookup(sub, b".", ctx)).st_ino == sub
        assert (await fs.lookup(sub, b"..", ctx)).st_ino == dir_
        assert (await fs.lookup(root, b"..", ctx)).st_ino == root
        for parent, name in ((root, b"missing"), (dir_, b"hello.txt"), (sub, b"sub")):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await fs.lookup(parent, name, ctx)
            assert fuse_errno(excinfo) == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await fs.lookup(hello, b"x", ctx)  # a file has no names under it
        assert fuse_errno(excinfo) == errno.ENOTDIR
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await fs.getattr(pyfuse3.InodeT(10_000), ctx)
        assert fuse_errno(excinfo) == errno.ENOENT

    run_mount(tmp_path, body)


def test_getattr_gives_sizes_read_only_modes_and_the_cached_bytes_as_blocks(tmp_path: Path) -> None:
    async def body(m: Mount) -> None:
        fs, ctx = m.fs, m.ctx
        for path, data in FILES.items():
            attrs = await fs.getattr(await m.inode(path), ctx)
            assert stat.S_ISREG(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o444, path
            assert attrs.st_size == len(data) and attrs.st_nlink == 1
            assert attrs.st_blocks == 0  # nothing cached yet
            assert attrs.st_blksize == BLOCK
            assert (attrs.st_uid, attrs.st_gid) == (os.getuid(), os.getgid())
        for inode in (pyfuse3.ROOT_INODE, await m.inode("dir"), await m.inode("dir/sub")):
            attrs = await fs.getattr(inode, ctx)
            assert stat.S_ISDIR(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o555
            assert attrs.st_nlink == 2
        # The file's Last-Modified is its mtime.
        modified = parsedate_to_datetime(m.origins.fakes["/big.bin"].last_modified or "")
        assert (await fs.getattr(await m.inode("big.bin"), ctx)).st_mtime_ns == int(modified.timestamp()) * 10**9

        # One random read of 10 bytes fetches its one block: `du` sees one block cached.
        fh = await m.open("big.bin")
        assert await m.read(fh, 2 * BLOCK + 5, 10) == BIG[2 * BLOCK + 5 : 2 * BLOCK + 15]
        attrs = await fs.getattr(await m.inode("big.bin"), ctx)
        assert attrs.st_blocks == BLOCK // 512
        assert attrs.st_size == len(BIG)
        await fs.release(fh)

    origins = run_mount(tmp_path, body)
    assert origins.gets("big.bin") == [f"bytes={2 * BLOCK}-{3 * BLOCK - 1}"]


def test_readdir_lists_every_entry_and_resumes_from_a_start_id(
    tmp_path: Path, replies: list[tuple[bytes, int, int]]
) -> None:
    async def body(m: Mount) -> None:
        fs, ctx = m.fs, m.ctx
        root = await fs.opendir(pyfuse3.ROOT_INODE, ctx)
        await fs.readdir(root, 0, pyfuse3.ReaddirToken())
        listed = [(name, inode) for name, inode, _ in replies]
        assert listed == [(b"big.bin", await m.inode("big.bin")), (b"dir", await m.inode("dir")),
                          (b"empty", await m.inode("empty"))]
        ids = [next_id for _, _, next_id in replies]
        assert len(set(ids)) == len(ids)

        # The kernel asks again from the id after the first entry: the rest, none twice.
        replies.clear()
        await fs.readdir(root, ids[0], pyfuse3.ReaddirToken())
        assert [name for name, _, _ in replies] == [b"dir", b"empty"]
        replies.clear()
        await fs.readdir(root, ids[-1], pyfuse3.ReaddirToken())
        assert replies == []
        await fs.releasedir(root)

        sub = await fs.opendir(await m.inode("dir"), ctx)
        await fs.readdir(sub, 0, pyfuse3.ReaddirToken())
        assert [(name, inode) for name, inode, _ in replies] == [
            (b"small.bin", await m.inode("dir/small.bin")), (b"sub", await m.inode("dir/sub"))]
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await fs.opendir(await m.inode("dir/small.bin"), ctx)
        assert fuse_errno(excinfo) == errno.ENOTDIR

    run_mount(tmp_path, body)


def test_readdir_stops_when_the_reply_is_full_and_the_next_call_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[tuple[bytes, int]] = []
    room = [2]  # entries the reply buffer takes before it is full

    def reply(token: Any, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if room[0] == 0:
            return False  # not taken: the kernel asks for it again
        room[0] -= 1
        taken.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def body(m: Mount) -> None:
        root = await m.fs.opendir(pyfuse3.ROOT_INODE, m.ctx)
        await m.fs.readdir(root, 0, pyfuse3.ReaddirToken())
        assert [name for name, _ in taken] == [b"big.bin", b"dir"]
        room[0] = 10
        await m.fs.readdir(root, taken[-1][1], pyfuse3.ReaddirToken())
        assert [name for name, _ in taken] == [b"big.bin", b"dir", b"empty"]

    run_mount(tmp_path, body)


# --- open, read, flush, release ---


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND],
                         ids=["O_WRONLY", "O_RDWR", "O_TRUNC", "O_APPEND"])
def test_an_open_for_writing_answers_erofs(tmp_path: Path, flags: int) -> None:
    async def body(m: Mount) -> None:
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await m.open("big.bin", flags)
        assert fuse_errno(excinfo) == errno.EROFS
        fh = await m.open("big.bin")  # the refused open left nothing behind
        await m.fs.release(fh)

    origins = run_mount(tmp_path, body)
    assert origins.gets("big.bin") == []


def test_operations_that_would_change_the_tree_answer_erofs(tmp_path: Path) -> None:
    async def body(m: Mount) -> None:
        fs, ctx = m.fs, m.ctx
        root = pyfuse3.ROOT_INODE
        calls: list[Awaitable[Any]] = [
            fs.mkdir(root, b"new", 0o755, ctx),
            fs.create(root, b"new", 0o644, os.O_WRONLY, ctx),
            fs.unlink(root, b"big.bin", ctx),
            fs.rmdir(root, b"dir", ctx),
            fs.rename(root, b"big.bin", root, b"other", 0, ctx),
            fs.setxattr(await m.inode("big.bin"), b"user.x", b"1", ctx),
            fs.setattr(await m.inode("big.bin"), pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, ctx),
            fs.write(pyfuse3.FileHandleT(1), 0, b"x"),
            fs.symlink(root, b"link", b"big.bin", ctx),
        ]
        for call in calls:
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await call
            assert fuse_errno(excinfo) == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await m.open("dir")
        assert fuse_errno(excinfo) == errno.EISDIR

    run_mount(tmp_path, body)


def test_reads_give_the_bytes_at_odd_offsets_across_blocks_and_past_the_end(tmp_path: Path) -> None:
    async def body(m: Mount) -> None:
        fh = await m.open("big.bin")
        for offset, size in ((1, 1), (BLOCK - 3, 7), (BLOCK * 3 - 1, 2 * BLOCK + 2), (12345, 4097),
                             (len(BIG) - 10, 4096), (0, len(BIG) + BLOCK)):
            assert await m.read(fh, offset, size) == BIG[offset : offset + size], (offset, size)
        assert await m.read(fh, len(BIG), 4096) == b""
        assert await m.read(fh, len(BIG) + 10 * BLOCK, 1) == b""
        await m.fs.flush(fh)
        await m.fs.release(fh)

        for path in ("dir/sub/hello.txt", "empty"):
            fh = await m.open(path)
            assert await m.read(fh, 0, 128 * 1024) == FILES[path]
            await m.fs.release(fh)

    origins = run_mount(tmp_path, body)
    # Each block came once, whatever the reads' shapes.
    fetched: list[int] = []
    for range_ in origins.gets("big.bin"):
        start, _, end = range_.removeprefix("bytes=").partition("-")
        fetched += range(int(start) // BLOCK, int(end) // BLOCK + 1)
    assert sorted(fetched) == list(range(7))
    assert origins.gets("empty") == []


def test_a_released_file_is_read_again_from_the_cache_without_a_request(tmp_path: Path) -> None:
    async def body(m: Mount) -> None:
        fh = await m.open("big.bin")
        assert await m.read(fh, BLOCK + 100, 2 * BLOCK) == BIG[BLOCK + 100 : 3 * BLOCK + 100]
        await m.fs.release(fh)
        asked = len(m.origins.requests("big.bin"))

        fh = await m.open("big.bin")
        assert await m.read(fh, BLOCK, 3 * BLOCK) == BIG[BLOCK : 4 * BLOCK]
        await m.fs.release(fh)
        assert len(m.origins.requests("big.bin")) == asked  # no GET, and no probe either

    run_mount(tmp_path, body)


def test_a_new_mount_shows_and_serves_what_the_last_one_cached(tmp_path: Path) -> None:
    async def first(m: Mount) -> None:
        fh = await m.open("big.bin")
        assert await m.read(fh, 3 * BLOCK, 10) == BIG[3 * BLOCK : 3 * BLOCK + 10]
        await m.fs.release(fh)

    async def second(m: Mount) -> None:
        inode = await m.inode("big.bin")
        # Before any open: `du` and the xattrs already count the block (from the state file).
        assert (await m.fs.getattr(inode, m.ctx)).st_blocks == BLOCK // 512
        assert await m.fs.getxattr(inode, b"user.rangefs.cached_bytes", m.ctx) == str(BLOCK).encode()
        fh = await m.open("big.bin")
        assert await m.read(fh, 3 * BLOCK + 1, BLOCK - 1) == BIG[3 * BLOCK + 1 : 4 * BLOCK]
        await m.fs.release(fh)

    run_mount(tmp_path, first)
    origins = run_mount(tmp_path, second)
    assert origins.gets("big.bin") == []


def test_a_read_of_a_released_or_unknown_handle_answers_ebadf(tmp_path: Path) -> None:
    async def body(m: Mount) -> None:
        fh = await m.open("dir/small.bin")
        await m.fs.release(fh)
        await m.fs.release(fh)  # a second RELEASE of it is harmless
        for handle in (fh, pyfuse3.FileHandleT(999)):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await m.fs.read(handle, 0, 10)
            assert fuse_errno(excinfo) == errno.EBADF

    run_mount(tmp_path, body)


def test_a_read_still_waiting_after_a_flush_is_cancelled_once_no_process_holds_the_file(tmp_path: Path) -> None:
    """flush marks the handle; watch_readers then finds no holder (the mount point is not known
    here, so no process can hold the file) and cancels the read, which answers EINTR."""
    origins = Origins(FILES)
    origins.fakes["/big.bin"].chunk_delay = 60.0  # the read waits for its block

    async def body(m: Mount) -> None:
        fh = await m.open("big.bin")
        outcome: list[int] = []

        async def reader() -> None:
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await m.fs.read(fh, 0, 4096)
            outcome.append(fuse_errno(excinfo))

        m.nursery.start_soon(m.fs.watch_readers)
        m.nursery.start_soon(reader)
        await trio.sleep(1.2)
        assert outcome == []  # unflushed, a slow read whose opener is not known waits on
        await m.fs.flush(fh)
        with trio.fail_after(5):
            while not outcome:
                await trio.sleep(0.05)
        assert outcome == [errno.EINTR]
        await m.fs.release(fh)

    run_mount(tmp_path, body, origins)


# --- errno mapping ---


def test_a_remote_change_answers_estale_to_handles_opened_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected_logs: list[str]
) -> None:
    expected_logs += ["If-Range", "the remote file changed"]
    invalidated: list[tuple[int, bool]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda inode, attr_only=False: invalidated.append(
        (inode, attr_only)))
    new = os.urandom(len(BIG) + 10)

    async def body(m: Mount) -> None:
        inode = await m.inode("big.bin")
        fh = await m.open("big.bin")
        assert await m.read(fh, 0, 100) == BIG[:100]
        fake = m.origins.fakes["/big.bin"]
        fake.data, fake.etag = new, '"v2"'
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await m.fs.read(fh, 4 * BLOCK, 100)  # a block not cached: its fetch sees the change
        assert fuse_errno(excinfo) == errno.ESTALE

        # The next open asks the server and moves to the new version; the kernel is told to
        # forget the old size and pages. The old handle never reads the new version.
        fresh = await m.fs.open(inode, os.O_RDONLY, m.ctx)
        assert not fresh.keep_cache
        assert invalidated == [(inode, True)]
        assert (await m.fs.getattr(inode, m.ctx)).st_size == len(new)
        assert await m.read(fresh.fh, 0, 100) == new[:100]
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await m.fs.read(fh, 0, 100)  # cached, but of the old version
        assert fuse_errno(excinfo) == errno.ESTALE
        await m.fs.release(fh)
        await m.fs.release(fresh.fh)

    run_mount(tmp_path, body)


def test_an_origin_error_answers_eio_and_the_next_read_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, expected_logs: list[str]
) -> None:
    expected_logs.append("404 Not Found")

    async def body(m: Mount) -> None:
        fh = await m.open("big.bin")
        m.origins.gone.add("/big.bin")
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await m.fs.read(fh, 0, 100)
        assert fuse_errno(excinfo) == errno.EIO
        m.origins.gone.clear()
        assert await m.read(fh, 0, 100) == BIG[:100]
        await m.fs.release(fh)

    run_mount(tmp_path, body)
    assert any(r.name == "rangefs.fs" and "404" in r.getMessage() and r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize("op", ["getattr", "read", "getxattr"])
def test_an_unexpected_exception_answers_eio_and_the_mount_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, expected_logs: list[str], op: str
) -> None:
    """pyfuse3 stops its main loop on any exception but FUSEError: each op must turn one into EIO."""
    expected_logs.append(f"unexpected error in {op}")

    async def body(m: Mount) -> None:
        inode = await m.inode("dir/small.bin")
        fh = await m.open("dir/small.bin")
        cached = m.fs.tree.nodes[inode].cached
        assert cached is not None
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "getattr": lambda: m.fs.getattr(inode, m.ctx),
            "read": lambda: m.fs.read(fh, 0, 10),
            "getxattr": lambda: m.fs.getxattr(inode, b"user.rangefs.cached_bytes", m.ctx),
        }
        broken = "read" if op == "read" else "cached_bytes"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cached, broken, _boom)
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await calls[op]()
            assert fuse_errno(excinfo) == errno.EIO
        await calls[op]()  # the same op works again
        assert await m.read(fh, 0, 10) == FILES["dir/small.bin"][:10]
        await m.fs.release(fh)

    run_mount(tmp_path, body)
    [record] = [r for r in caplog.records if r.exc_info]
    assert f"unexpected error in {op}" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ZeroDivisionError)


def _boom(*args: object, **kwargs: object) -> Any:
    raise ZeroDivisionError("a bug")


def test_a_bug_in_a_fetch_answers_eio_and_the_next_read_fetches_again(
    tmp_path: Path, expected_logs: list[str]
) -> None:
    """An exception no layer expects, raised under the cache (in the HTTP transport), ends that
    read only: the cache's task group and the file's later fetches carry on."""
    expected_logs += ["transport bug", "unexpected error while fetching"]
    origins = Origins(FILES)
    broken = [True]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and broken[0]:
            raise RuntimeError("transport bug")
        return Origins.handle(origins, request)

    origins.handle = handle  # type: ignore[method-assign]

    async def body(m: Mount) -> None:
        fh = await m.open("big.bin")
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await m.fs.read(fh, 0, 100)
        assert fuse_errno(excinfo) == errno.EIO
        broken[0] = False
        assert await m.read(fh, 0, 100) == BIG[:100]
        await m.fs.release(fh)

    run_mount(tmp_path, body, origins)


# --- xattrs and statfs ---


def test_xattrs_show_the_redacted_url_and_what_is_cached(tmp_path: Path) -> None:
    async def body(m: Mount) -> None:
        fs, ctx = m.fs, m.ctx
        inode = await m.inode("big.bin")
        names = await fs.listxattr(inode, ctx)
        assert set(names) == {b"user.rangefs.url", b"user.rangefs.cached_bytes", b"user.rangefs.saved_bytes",
                              b"user.rangefs.block_size", b"user.rangefs.passthrough_handles",
                              b"user.rangefs.prefetch_unused_bytes"}
        url = await fs.getxattr(inode, b"user.rangefs.url", ctx)
        assert url == b"http://***@origin.test/big.bin?sig=***"
        assert b"secret" not in b"".join([await fs.getxattr(inode, n, ctx) for n in names])
        assert await fs.getxattr(inode, b"user.rangefs.block_size", ctx) == str(BLOCK).encode()
        assert await fs.getxattr(inode, b"user.rangefs.cached_bytes", ctx) == b"0"

        fh = await m.open("big.bin")
        await m.read(fh, len(BIG) - 1, 1)  # the last block, which is short
        assert await fs.getxattr(inode, b"user.rangefs.cached_bytes", ctx) == str(len(BIG) % BLOCK).encode()
        assert await fs.getxattr(inode, b"user.rangefs.passthrough_handles", ctx) == b"0"
        await fs.release(fh)
        assert await fs.getxattr(inode, b"user.rangefs.prefetch_unused_bytes", ctx) == b"0"  # one read: no prefetch
        assert await fs.getxattr(inode, b"user.rangefs.saved_bytes", ctx) == str(len(BIG) % BLOCK).encode()

        for where, name in ((inode, b"user.other"), (pyfuse3.ROOT_INODE, b"user.rangefs.url")):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await fs.getxattr(where, name, ctx)
            assert fuse_errno(excinfo) == pyfuse3.ENOATTR
        # The root names only the cache directory (how `rangefs status` finds the daemon's socket).
        assert await fs.listxattr(pyfuse3.ROOT_INODE, ctx) == [b"user.rangefs.cache_dir"]
        assert await fs.getxattr(pyfuse3.ROOT_INODE, b"user.rangefs.cache_dir", ctx) == os.fsencode(
            fs.cache.config.cache_dir)

    run_mount(tmp_path, body)


def test_statfs_counts_the_files_blocks_and_inodes_with_nothing_free(tmp_path: Path) -> None:
    async def body(m: Mount) -> None:
        data = await m.fs.statfs(m.ctx)
        assert data.f_bsize == data.f_frsize == 4096
        assert data.f_blocks == sum(-(-len(d) // 4096) for d in FILES.values())
        assert data.f_bfree == data.f_bavail == 0
        assert data.f_files == 1 + len(FILES) + 2  # the root, the files, dir and dir/sub
        assert data.f_ffree == data.f_favail == 0
        assert data.f_namemax == 255

    run_mount(tmp_path, body)
