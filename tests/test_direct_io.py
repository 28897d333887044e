"""``--direct-io``: files not complete in the cache are opened with direct I/O, and still mmap.

Through real mounts. Whether a handle is direct shows in the page cache of the mounted file:
a direct read leaves none of its pages there, a read through the page cache leaves them. Counted
with cachestat(2) on the reader's own descriptor: `fincore` would open the file again (itself a
direct open while the file is incomplete) and map it, and mapping a direct-I/O file makes the
kernel drop the file's page cache, so it would see nothing whatever the reader's handle was.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faultserver import FaultServer

from util import Mounts, Server, cached_pages, resident_pages, seeded_bytes

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


def test_reads_of_an_incomplete_file_bypass_the_page_cache_and_mmap_still_works(
    mounts: Mounts, nginx: Server
) -> None:
    data = seeded_bytes(3 * MiB + 555, seed=60)
    direct = mounts.mount([nginx.put("dio/a.bin", data)], "--direct-io")
    log = (direct.cache_dir / "rangefs.log").read_text(encoding="utf-8")
    assert "files not complete in the cache are opened with direct I/O" in log
    path = direct.path / "a.bin"
    with open(path, "rb", buffering=0) as f:
        assert f.read(MiB) == data[:MiB]  # the file is not complete: this handle is direct
        assert os.pread(f.fileno(), 1000, 2 * MiB + 7) == data[2 * MiB + 7 : 2 * MiB + 1007]
        assert cached_pages(f.fileno()) == 0
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:  # shared: ENODEV without the capability
            assert mapped[:] == data
            assert cached_pages(f.fileno()) > 0  # the mapping's pages: cachestat sees them
        assert f.read() == data[MiB:]

    # The same through a mount without the option: the page cache keeps what was read.
    cached = mounts.mount([nginx.put("dio/b.bin", data)], cache_dir=direct.cache_dir.parent / "cache-b")
    with open(cached.path / "b.bin", "rb", buffering=0) as f:
        assert f.read(MiB) == data[:MiB]
        assert cached_pages(f.fileno()) > 0


def test_a_complete_file_is_not_opened_direct(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(MiB + 9, seed=61)
    m = mounts.mount([nginx.put("dio/c.bin", data)], "--direct-io", "--no-passthrough")
    path = m.path / "c.bin"
    with open(path, "rb") as f:
        assert f.read() == data  # direct: nothing stays in the page cache
        assert cached_pages(f.fileno()) == 0
    with open(path, "rb") as f:  # complete now: through the page cache, kept for rereads
        assert f.read() == data
    assert resident_pages(path) > 0


# Prints the sha256 of the first SIZE bytes of a shared mapping of PATH. In a child process: a page
# fault of the mapping waits for rangefs, which waits for the FaultServer's threads, which need
# the GIL that this process's faulting thread would hold.
_MAPPED_SHA = """
import hashlib, mmap, sys
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
    print(hashlib.sha256(mapped[: int(sys.argv[2])]).hexdigest())
"""


def mapped_sha(path: Path, size: int) -> str:
    return subprocess.run([sys.executable, "-c", _MAPPED_SHA, str(path), str(size)], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def test_a_mapping_of_a_direct_file_shows_the_new_version_after_a_change(
    mounts: Mounts, server: FaultServer
) -> None:
    """Mapped pages of a direct-I/O file live in the page cache like any other: an open that
    switches versions must drop them. A smoke test of the whole: keep_cache=False at the switch
    is not what it pins (the kernel also drops them on seeing the new mtime, libfuse's
    auto_inval_data, and when a direct-I/O file is mapped)."""
    old, new = seeded_bytes(2 * MiB + 3, seed=62), seeded_bytes(2 * MiB + 3, seed=63)
    server.put("/v.bin", old)
    m = mounts.mount([server.url("/v.bin")], "--direct-io", "--revalidate-interval", "0")
    path = m.path / "v.bin"
    assert mapped_sha(path, MiB) == sha256(old[:MiB])  # (prefetch may complete the file meanwhile)
    server.change("/v.bin", new)
    assert mapped_sha(path, len(new)) == sha256(new)
    assert path.read_bytes() == new


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
