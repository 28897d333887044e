"""A remote file that changes while mounted: old handles fail, new opens see the new version.

Through real mounts against FaultServer, whose every ``change`` makes a new ETag.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from faultserver import FaultServer

from rangefs.cache import DEFAULT_BLOCK_SIZE

from util import Mounts, pread_random, seeded_bytes, wait_until

pytestmark = pytest.mark.timeout(60)
BLOCK = DEFAULT_BLOCK_SIZE


def read_all(path: Path) -> tuple[int, bytes]:
    """(size from fstat of the open file, its bytes)."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, f.read()


def test_a_change_seen_by_a_read_fails_old_handles_and_the_next_open_reads_the_new_version(
    mounts: Mounts, server: FaultServer
) -> None:
    old, new = seeded_bytes(8 * BLOCK, seed=1), seeded_bytes(11 * BLOCK + 5, seed=2)
    server.put("/f.bin", old)
    m = mounts.mount([server.url("/f.bin")])
    path = m.path / "f.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 1000, 0) == old[:1000]
        server.change("/f.bin", new)
        with pytest.raises(OSError) as failure:
            os.pread(fd, 1000, 5 * BLOCK)  # not cached: the GET's If-Range no longer matches
        assert failure.value.errno == errno.ESTALE
        with pytest.raises(OSError) as again:
            # In our cache (block 0), not in the kernel's page cache: of a version that is gone.
            os.pread(fd, 1000, 100_000)
        assert again.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    size, data = read_all(path)
    assert (size, data) == (len(new), new)
    # No refetch loops: at most the old blocks read, the 200 that answered the stale If-Range
    # (a whole new body pushed into the socket before the daemon dropped it), and the new file.
    assert server.bytes_sent("/f.bin") <= len(old) + 2 * len(new)
    assert "the remote file changed" in (m.cache_dir / "rangefs.log").read_text()


def test_with_interval_zero_every_open_revalidates_and_the_page_cache_is_dropped(
    mounts: Mounts, server: FaultServer
) -> None:
    old, new = seeded_bytes(6 * BLOCK, seed=3), seeded_bytes(6 * BLOCK, seed=4)  # same size
    server.put("/g.bin", old)
    m = mounts.mount([server.url("/g.bin")], "--revalidate-interval", "0")
    path = m.path / "g.bin"
    assert read_all(path)[1] == old  # now in the kernel's page cache too (keep_cache)
    assert read_all(path)[1] == old
    server.change("/g.bin", new)
    mark = server.mark()
    assert read_all(path)[1] == new
    methods = [r.method for r in server.since(mark)]
    assert methods[0] == "HEAD" and "GET" in methods, methods
    assert sum(r.body_bytes_sent for r in server.since(mark)) == len(new)  # the old cache is not reused
    # And the state on disk follows: a remount with the file unchanged fetches nothing.
    assert m.unmount().returncode == 0
    mounts.remount(m)
    mark = server.mark()
    assert read_all(path)[1] == new
    assert sum(r.body_bytes_sent for r in server.since(mark)) == 0


def test_within_the_interval_the_cached_version_is_served_whole(mounts: Mounts, server: FaultServer) -> None:
    old, new = seeded_bytes(4 * BLOCK, seed=5), seeded_bytes(4 * BLOCK, seed=6)
    server.put("/h.bin", old)
    m = mounts.mount([server.url("/h.bin")])  # default interval: 60 s
    path = m.path / "h.bin"
    assert read_all(path)[1] == old
    server.change("/h.bin", new)
    mark = server.mark()
    assert read_all(path)[1] == old  # one version, the cached one; no request
    assert server.since(mark) == []


def test_a_change_seen_in_the_background_is_picked_up_without_an_error_on_reopen(
    mounts: Mounts, server: FaultServer
) -> None:
    old, new = seeded_bytes(8 * BLOCK, seed=7), seeded_bytes(3 * BLOCK, seed=8)
    server.put("/k.bin", old)
    m = mounts.mount([server.url("/k.bin")])
    path = m.path / "k.bin"
    server.change("/k.bin", new)
    with pytest.raises(OSError) as failure:
        pread_random(path, 2 * BLOCK, 100)  # the size probed at mount is gone
    assert failure.value.errno == errno.ESTALE
    # The daemon re-probes on its own; the next open reads the new, shorter file.
    log = m.cache_dir / "rangefs.log"
    assert wait_until(lambda: "dropping its cached blocks" in log.read_text(), timeout=10)
    assert read_all(path) == (len(new), new)


# -- files that grow by appends (the seeds' resume after an append) ------------------------------


def test_an_appended_file_fetches_only_the_new_bytes_after_a_remount(mounts: Mounts, server: FaultServer) -> None:
    old = seeded_bytes(10 * BLOCK + 100, seed=20)
    new = old + seeded_bytes(5 * BLOCK + 7, seed=21)
    server.put("/log.bin", old)
    m = mounts.mount([f"{server.url('/log.bin')} grow=yes"])
    assert read_all(m.path / "log.bin")[1] == old
    assert m.unmount().returncode == 0
    server.change("/log.bin", new)
    mark = server.mark()
    mounts.remount(m)
    assert read_all(m.path / "log.bin") == (len(new), new)
    sent = sum(r.body_bytes_sent for r in server.since(mark))
    # The appended bytes, the old partial tail block again, and the one block fetched to check.
    assert sent == (len(new) - 10 * BLOCK) + BLOCK, sent
    assert "kept 10 cached blocks" in (m.cache_dir / "rangefs.log").read_text()


def test_an_append_seen_while_mounted_keeps_the_prefix(mounts: Mounts, server: FaultServer) -> None:
    old = seeded_bytes(6 * BLOCK, seed=22)
    new = old + seeded_bytes(3 * BLOCK, seed=23)
    server.put("/grow.bin", old)
    m = mounts.mount([server.url("/grow.bin")], "--growing", "--revalidate-interval", "0")
    assert read_all(m.path / "grow.bin")[1] == old
    server.change("/grow.bin", new)
    mark = server.mark()
    assert read_all(m.path / "grow.bin") == (len(new), new)
    sent = sum(r.body_bytes_sent for r in server.since(mark))
    assert sent == 3 * BLOCK + BLOCK, sent  # the new blocks and the check


def test_a_grown_file_whose_old_bytes_changed_is_fetched_again_whole(mounts: Mounts, server: FaultServer) -> None:
    old = seeded_bytes(6 * BLOCK, seed=24)
    changed = bytearray(old)
    changed[5 * BLOCK + 10] ^= 0xFF  # in the last cached block: the check sees it
    new = bytes(changed) + seeded_bytes(2 * BLOCK, seed=25)
    server.put("/nogrow.bin", old)
    m = mounts.mount([f"{server.url('/nogrow.bin')} grow=yes"], "--revalidate-interval", "0")
    assert read_all(m.path / "nogrow.bin")[1] == old
    server.change("/nogrow.bin", new)
    assert read_all(m.path / "nogrow.bin") == (len(new), new)
    assert "not a pure append" in (m.cache_dir / "rangefs.log").read_text()


def test_without_grow_an_appended_file_is_fetched_again_whole(mounts: Mounts, server: FaultServer) -> None:
    old = seeded_bytes(4 * BLOCK, seed=26)
    new = old + seeded_bytes(BLOCK, seed=27)
    server.put("/plain.bin", old)
    m = mounts.mount([server.url("/plain.bin")])
    assert read_all(m.path / "plain.bin")[1] == old
    assert m.unmount().returncode == 0
    server.change("/plain.bin", new)
    mark = server.mark()
    mounts.remount(m)
    assert read_all(m.path / "plain.bin")[1] == new
    assert sum(r.body_bytes_sent for r in server.since(mark)) == len(new)


def test_an_append_seen_with_the_cache_disk_full_is_still_read_whole(
    mounts: Mounts, server: FaultServer, tmp_path: Path
) -> None:
    """Keeping the prefix needs a larger state file; on a full disk that fails, and the open must
    then fall back to an empty cache (or none), not fail with an unexpected error."""
    old = seeded_bytes(6 * BLOCK, seed=28)
    new = old + seeded_bytes(3 * BLOCK, seed=29)
    server.put("/full.bin", old)
    with mounts.small_disk() as small:
        log = tmp_path / "rangefs.log"
        m = mounts.mount([server.url("/full.bin")], "--growing", "--revalidate-interval", "0",
                         "--log-file", str(log), cache_dir=small / "cache")
        assert read_all(m.path / "full.bin")[1] == old
        filler = os.open(small / "filler", os.O_WRONLY | os.O_CREAT, 0o600)  # fill the cache's disk
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(filler, b"\0" * 4096)
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(filler)
        server.change("/full.bin", new)
        assert read_all(m.path / "full.bin") == (len(new), new)
        assert read_all(m.path / "full.bin") == (len(new), new)
        text = log.read_text()
        assert "unexpected error" not in text and "Traceback" not in text, text
        assert m.unmount().returncode == 0
