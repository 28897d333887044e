"""Drop-behind: the kernel's pages of a file far behind a sequential reader are dropped.

Through real mounts. A cold read through the mount fills two page caches with the same bytes,
the cache file's and the mounted file's; rangefs drops the second far behind a sequential reader
(rangefs.dropbehind._DROP_BEHIND). cachestat(2) on the reader's own descriptor counts the mounted
file's pages without touching them.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from rangefs.cache import cache_key

from util import Mounts, Server, alive, cached_pages, fstype, resident_pages, seeded_bytes, wait_until

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
SIZE = 160 * MiB
PAGE = os.sysconf("SC_PAGESIZE")
HALF_OF_64_MIB = 32 * MiB // PAGE  # pages kept: at least half (not all: memory may be short)


def read_through(fd: int, data: bytes) -> None:
    """Read the whole file sequentially, 1 MiB at a time, checking every byte."""
    offset = 0
    while chunk := os.read(fd, MiB):
        assert chunk == data[offset : offset + len(chunk)], f"wrong bytes at {offset}"
        offset += len(chunk)
    assert offset == len(data)


def first_pages_cached(fd: int, settle: float) -> int:
    """Pages of the first 64 MiB of ``fd`` in the kernel's cache, once drops under way are done
    (waiting up to ``settle`` seconds for the count to reach 0)."""
    deadline = time.monotonic() + settle
    while (pages := cached_pages(fd, 0, 64 * MiB)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pages


@pytest.fixture
def big(nginx: Server) -> tuple[str, bytes]:
    data = seeded_bytes(SIZE, seed=81)
    return nginx.put("drop/big.bin", data), data


def test_pages_far_behind_a_sequential_reader_are_dropped(mounts: Mounts, big: tuple[str, bytes]) -> None:
    url, data = big
    m = mounts.mount([url])
    log = (m.cache_dir / "rangefs.log").read_text(encoding="utf-8")
    assert "far behind a sequential reader are dropped" in log
    fd = os.open(m.path / "big.bin", os.O_RDONLY)
    try:
        read_through(fd, data)
        assert first_pages_cached(fd, settle=5.0) == 0
        # The last 32 MiB, within the margin behind the reader, stay.
        assert cached_pages(fd, SIZE - 32 * MiB, 32 * MiB) > (32 * MiB // PAGE) // 2
        # A second pass, the file complete now, keeps the kernel's copy (the fast one).
        os.lseek(fd, 0, os.SEEK_SET)
        read_through(fd, data)
        assert first_pages_cached(fd, settle=0.5) > HALF_OF_64_MIB
    finally:
        os.close(fd)
    # The cache file keeps every byte (a later open passes through to it).
    cache_file = m.cache_dir / "files" / f"{cache_key(url)}.data"
    assert resident_pages(cache_file) >= SIZE // PAGE * 9 // 10
    assert (m.path / "big.bin").read_bytes() == data


def test_with_a_second_handle_open_nothing_is_dropped(mounts: Mounts, big: tuple[str, bytes]) -> None:
    """Another reader of the file may still want the pages: they stay. This also shows that the
    first test would see pages that were not dropped."""
    url, data = big
    m = mounts.mount([url])
    other = os.open(m.path / "big.bin", os.O_RDONLY)
    fd = os.open(m.path / "big.bin", os.O_RDONLY)
    try:
        read_through(fd, data)
        assert first_pages_cached(fd, settle=0.5) > HALF_OF_64_MIB
    finally:
        os.close(fd)
        os.close(other)


def test_a_complete_file_read_through_the_kernels_cache_keeps_it(mounts: Mounts, big: tuple[str, bytes]) -> None:
    """Without passthrough a complete file is read through the kernel's cache, which is then the
    fast copy for a reader that comes back: nothing is dropped."""
    url, data = big
    m = mounts.mount([url], "--no-passthrough")
    for expect_dropped in (True, False):  # cold (the file fills up), then complete
        fd = os.open(m.path / "big.bin", os.O_RDONLY)
        try:
            read_through(fd, data)
            pages = first_pages_cached(fd, settle=5.0 if expect_dropped else 0.5)
        finally:
            os.close(fd)
        assert (pages == 0) if expect_dropped else pages > HALF_OF_64_MIB


def test_a_stop_signal_while_pages_are_being_dropped_ends_the_daemon(mounts: Mounts, big: tuple[str, bytes]) -> None:
    """SIGTERM in the middle of a sequential read that drops pages: the daemon waits for the drop
    under way (Filesystem.stop_drops), unmounts and exits; the reader gets the bytes or an error."""
    url, data = big
    m = mounts.mount([url])
    pid = m.pid()
    fd = os.open(m.path / "big.bin", os.O_RDONLY)
    read, errors = [0], []

    def reader() -> None:
        try:
            while chunk := os.read(fd, MiB):
                assert chunk == data[read[0] : read[0] + len(chunk)]
                read[0] += len(chunk)
                if read[0] >= 112 * MiB:
                    time.sleep(0.01)  # from here on slowly, so that the signal comes mid-read
        except OSError as exc:  # the mount went away under it
            errors.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: read[0] >= 112 * MiB or not thread.is_alive(), timeout=60)
        assert read[0] < SIZE, "the read ended before the signal: this tests nothing"
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not alive(pid), timeout=20), "the daemon did not exit"
        assert fstype(m.path) is None
        thread.join(timeout=20)
        assert not thread.is_alive()
        assert read[0] == SIZE or errors
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone
