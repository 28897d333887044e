"""``--direct-io``: files not complete in the cache are opened with direct I/O, and still mmap.

Through real mounts. Whether a handle is direct shows in the page cache of the mounted file:
a direct read leaves none of its pages there, a read through the page cache leaves them
(`fincore`, which maps the file and asks mincore). Each test shows both sides.
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

from util import Mounts, Server, seeded_bytes

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (its mounted file's, not the cache file's)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    return int(out.strip())


def test_reads_of_an_incomplete_file_bypass_the_page_cache_and_mmap_still_works(
    mounts: Mounts, nginx: Server
) -> None:
    data = seeded_bytes(3 * MiB + 555, seed=60)
    direct = mounts.mount([nginx.put("dio/a.bin", data)], "--direct-io")
    assert "direct I/O" in (direct.cache_dir / "rangefs.log").read_text(encoding="utf-8")
    path = direct.path / "a.bin"
    with open(path, "rb", buffering=0) as f:
        assert f.read(MiB) == data[:MiB]  # the file is not complete: this handle is direct
        assert os.pread(f.fileno(), 1000, 2 * MiB + 7) == data[2 * MiB + 7 : 2 * MiB + 1007]
        assert resident_bytes(path) == 0
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:  # shared: ENODEV without the capability
            assert mapped[:] == data
        assert f.read() == data[MiB:]
    assert resident_bytes(path) > 0  # the mapping filled the page cache: fincore can see it

    # The same through a mount without the option: the page cache keeps what was read.
    cached = mounts.mount([nginx.put("dio/b.bin", data)], cache_dir=direct.cache_dir.parent / "cache-b")
    with open(cached.path / "b.bin", "rb", buffering=0) as f:
        assert f.read(MiB) == data[:MiB]
        assert resident_bytes(cached.path / "b.bin") > 0


def test_a_complete_file_is_not_opened_direct(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(MiB + 9, seed=61)
    m = mounts.mount([nginx.put("dio/c.bin", data)], "--direct-io", "--no-passthrough")
    path = m.path / "c.bin"
    assert path.read_bytes() == data  # direct: nothing stays in the page cache
    assert resident_bytes(path) == 0
    with open(path, "rb") as f:  # complete now: through the page cache, kept for rereads
        assert f.read() == data
    assert resident_bytes(path) > 0


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
    switches versions must drop them (it opens without keep_cache; the kernel also drops them on
    seeing the new mtime, libfuse's auto_inval_data, so keep_cache alone cannot fail this)."""
    old, new = seeded_bytes(2 * MiB + 3, seed=62), seeded_bytes(2 * MiB + 3, seed=63)
    server.put("/v.bin", old)
    m = mounts.mount([server.url("/v.bin")], "--direct-io", "--revalidate-interval", "0")
    path = m.path / "v.bin"
    assert mapped_sha(path, MiB) == sha256(old[:MiB])  # part of it: the file stays incomplete, opens direct
    assert resident_bytes(path) > 0
    server.change("/v.bin", new)
    assert mapped_sha(path, len(new)) == sha256(new)
    assert path.read_bytes() == new


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
