"""Replies to reads spliced from the cache file, and the page-cache probe that decides it.

Through real mounts. Whether the daemon copied a reply's bytes through its own memory shows in
its /proc/PID/io: ``rchar`` and ``wchar`` count the bytes of its read and write system calls
(``preadv`` of the cache file, ``writev`` to /dev/fuse), while splice(2) moves page references
and counts nothing. Copied replies add twice the bytes read; spliced ones almost nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rangefs.cache import cache_key
from rangefs.kernel import PageCacheProbe

from util import Mounts, Server, resident_pages, seeded_bytes

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


def copied_by(pid: int) -> int:
    """Bytes the process has passed through read and write system calls so far."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def read_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return b"".join(iter(lambda: f.read(MiB), b""))


def drop_page_cache(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (dirty ones are written first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_replies_are_spliced_from_the_cache_file_not_copied_through_the_daemon(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(32 * MiB + 999, seed=71)
    m = mounts.mount([nginx.put("splice/a.bin", data)], "--tune-system")  # pipes of 2 MiB
    log = (m.cache_dir / "rangefs.log").read_text(encoding="utf-8")
    assert "replies to reads are spliced from the cache files" in log
    pid = m.pid()
    before = copied_by(pid)
    assert read_all(m.path / "a.bin") == data  # cold: fetched, written, then served
    moved = copied_by(pid) - before
    # Copied replies: each byte read from the cache file and written to /dev/fuse, 64 MiB here.
    # What remains is the daemon's own small fetches and its state files.
    assert moved < len(data) // 4, f"the daemon passed {moved} bytes through its memory"


def test_bytes_gone_from_the_page_cache_are_read_for_the_reply_not_spliced(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(16 * MiB, seed=72)
    url = nginx.put("splice/b.bin", data)
    m = mounts.mount([url], "--no-passthrough", "--tune-system")
    log = (m.cache_dir / "rangefs.log").read_text(encoding="utf-8")
    assert "replies to reads are spliced from the cache files" in log  # else this tests nothing
    path = m.path / "b.bin"
    assert read_all(path) == data
    cache_file = m.cache_dir / "files" / f"{cache_key(url)}.data"
    drop_page_cache(cache_file)
    drop_page_cache(path)  # the mounted file's own page cache, so the kernel asks the daemon again
    assert resident_pages(cache_file) == 0, "the cache file's pages stayed (a tmpfs cache dir?)"
    pid = m.pid()
    before = copied_by(pid)
    assert read_all(path) == data
    # Splicing would read the cache file on the FUSE thread, stalling every other request on
    # the disk: the first replies were read in a worker thread and copied instead (1 MiB each).
    # Those reads start the disk's readahead of the cache file, so later replies find their
    # bytes in the page cache and are spliced again.
    assert copied_by(pid) - before >= MiB


def test_the_page_cache_probe_sees_which_ranges_are_cached(tmp_path: Path) -> None:
    probe = PageCacheProbe()
    path = tmp_path / "f"
    path.write_bytes(seeded_bytes(4 * MiB + 100, seed=73))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert probe.resident(fd, 0, 4 * MiB + 100)
        assert probe.resident(fd, 4 * MiB + 50, 50)  # the last, partial page
        drop_page_cache(path)
        assert not probe.resident(fd, 0, 4 * MiB + 100), "the file's pages stayed (tmp_path on tmpfs?)"
        os.pread(fd, 8192, MiB + 10)  # pages 256 and 257 come back (with what readahead adds)
        assert probe.resident(fd, MiB + 10, 8000)
        assert not probe.resident(fd, 0, 4 * MiB + 100)
        assert probe.works
    finally:
        os.close(fd)
