"""Fleets (docs/fleet.md): rangefs mounts on many machines behind one nginx slice cache, so the
origin sends each byte about once; a file changed under cached slices is never read mixed."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from random import Random

import pytest
from slicecache import SLICE_SIZE, SliceCache, has_slice_module

from util import Mounts, Server, seeded_bytes

MiB = 1024 * 1024
READ_SIZE = MiB
# nginx counts validity in whole seconds and an entry stays fresh through its last one: a "1s"
# slice may be used for up to 2 s.
EXPIRY = 2.5


@pytest.fixture
def slice_module() -> None:
    """Without the slice module nginx refuses the config; fail loudly rather than skip, as a
    machine without FUSE does (tests/conftest.py)."""
    if not has_slice_module():
        pytest.fail("nginx lacks the slice module (built without --with-http_slice_module): the fleet tests need it")


@pytest.fixture
def slice_cache(tmp_path: Path, nginx: Server, slice_module: None) -> Iterator[SliceCache]:
    with SliceCache(tmp_path / "slicecache", nginx.nginx.port) as cache:
        yield cache


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def describe(got: bytes, old: bytes, new: bytes) -> str:
    """What a read returned, in terms of the two versions (for assertion messages)."""
    same = [
        "old" if got[i : i + MiB] == old[i : i + MiB] else "new" if got[i : i + MiB] == new[i : i + MiB] else "?"
        for i in range(0, len(got), MiB)
    ]
    return f"read {len(got)} of {len(new)} bytes, MiB by MiB: {' '.join(same)}"


def write_seeded(path: Path, size: int, seed: int) -> str:
    """Write ``size`` seeded random bytes in chunks (randbytes is limited to 256 MiB); their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    random, digest = Random(seed), hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(0, size, 16 * MiB):
            chunk = random.randbytes(16 * MiB)
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def read_until_error(path: Path) -> bytes:
    """What a reader gets before its first error (the whole file when there is none)."""
    got = bytearray()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_SIZE):
                got += chunk
    except OSError:
        pass
    return bytes(got)


@pytest.mark.timeout(180)
def test_two_mounts_behind_a_slice_cache_get_each_byte_from_the_origin_about_once(
    mounts: Mounts, nginx: Server, slice_cache: SliceCache, tmp_path: Path
) -> None:
    size = 256 * MiB
    want = write_seeded(nginx.www / "fleet" / "big.bin", size, seed=2020)
    url = slice_cache.url("fleet/big.bin")
    origin_mark, cache_mark = nginx.mark(), slice_cache.mark()
    machines = [mounts.mount([url], cache_dir=tmp_path / f"machine{i}") for i in range(2)]

    digests: dict[int, str] = {}
    errors: list[BaseException] = []

    def copy(index: int) -> None:
        try:
            digests[index] = sha256_of(machines[index].path / "big.bin")
        except Exception as error:  # reported by the main thread
            errors.append(error)

    readers = [threading.Thread(target=copy, args=(i,)) for i in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(150)
    assert not errors, errors
    assert digests == {0: want, 1: want}

    origin = [r for r in nginx.nginx.requests(origin_mark) if r.path == "/fleet/big.bin"]
    sent = sum(r.body_bytes for r in origin)
    served = slice_cache.bytes_sent("fleet/big.bin", since=cache_mark)
    print(f"origin sent {sent / MiB:.1f} MiB in {len(origin)} requests; the cache served {served / MiB:.1f} MiB")
    assert served >= 2 * size  # both machines read the whole file through the cache
    assert sent <= 1.1 * size
    assert all(r.range.startswith("bytes=") and r.if_range == "" for r in origin)  # slices, never whole files
    (nginx.www / "fleet" / "big.bin").unlink()  # the session's origin outlives this test


@pytest.mark.timeout(120)
def test_a_file_changed_under_cached_slices_is_never_read_mixed(
    mounts: Mounts, nginx: Server, slice_cache: SliceCache, tmp_path: Path
) -> None:
    size = 16 * SLICE_SIZE
    old, new = seeded_bytes(size, seed=1), seeded_bytes(size, seed=2)
    path = nginx.www / "fleet" / "changing.bin"
    url = slice_cache.url("fleet/changing.bin")
    nginx.put("fleet/changing.bin", old)
    first = mounts.mount([url], cache_dir=tmp_path / "first")
    assert sha256_of(first.path / "changing.bin") == hashlib.sha256(old).hexdigest()  # every slice cached

    stat = path.stat()
    nginx.put("fleet/changing.bin", new)  # the same size, a new mtime: a new ETag
    os.utime(path, (stat.st_atime, stat.st_mtime + 100))
    for start in range(SLICE_SIZE, size, 2 * SLICE_SIZE):  # an LRU evicts some slices; slice 0 stays old
        slice_cache.slice_path("/fleet/changing.bin", start).unlink()

    second = mounts.mount([url], cache_dir=tmp_path / "second")
    got = read_until_error(second.path / "changing.bin")
    print(f"read {len(got)} of {size} bytes before the first error")
    whole = got in (old[: len(got)], new[: len(got)])  # bytes of one version, whichever
    assert whole, f"the {len(got)} bytes read mix the two versions"
    assert len(got) == size or "etag mismatch in slice response" in slice_cache.error_log.read_text()


@pytest.mark.timeout(120)
def test_with_a_short_validity_a_change_reaches_the_fleet_whole_and_an_unchanged_file_costs_304s(
    mounts: Mounts, nginx: Server, tmp_path: Path, slice_module: None
) -> None:
    size = 8 * SLICE_SIZE
    old, new = seeded_bytes(size, seed=3), seeded_bytes(size, seed=4)
    path = nginx.www / "fleet" / "revalidated.bin"
    with SliceCache(tmp_path / "slicecache", nginx.nginx.port, valid="1s") as cache:
        url = cache.url("fleet/revalidated.bin")
        nginx.put("fleet/revalidated.bin", old)
        m = mounts.mount([url], "--revalidate-interval", "0", cache_dir=tmp_path / "machine")
        assert read_until_error(m.path / "revalidated.bin") == old

        time.sleep(EXPIRY)  # every slice expired: the next use asks the origin
        other = mounts.mount([url], cache_dir=tmp_path / "other")
        mark = nginx.mark()
        assert read_until_error(other.path / "revalidated.bin") == old
        asked = [r for r in nginx.nginx.requests(mark) if r.path == "/fleet/revalidated.bin"]
        assert asked and all(r.status == 304 and r.body_bytes == 0 for r in asked)  # revalidated, not sent again

        stat = path.stat()
        nginx.put("fleet/revalidated.bin", new)
        os.utime(path, (stat.st_atime, stat.st_mtime + 100))
        time.sleep(EXPIRY)
        got = read_until_error(m.path / "revalidated.bin")
        assert got == new, describe(got, old, new)  # the reopen sees the change, reads it whole
