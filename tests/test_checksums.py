"""Unit tests of the sparse block sums, and of the order a save writes sums and state in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from fakeorigin import FakeOrigin
from test_cache import BLOCK, DATA, with_cache

from rangefs import checksums, state
from rangefs.cache import DEFAULT_BLOCK_SIZE, Cache, CachedFile
from rangefs.checksums import BlockSums
from rangefs.fetcher import block_sum


def test_no_block_of_zeros_sums_to_the_value_of_a_missing_sum() -> None:
    """A claimed block whose bytes and sum were both lost (a power cut) reads as zeros with a sum
    of 0: it must fail its check, whatever the length of the file's last block."""
    zeros = memoryview(bytes(DEFAULT_BLOCK_SIZE))
    assert all(block_sum(zeros[:length]) != checksums.MISSING for length in range(1, DEFAULT_BLOCK_SIZE + 1))


def test_sums_are_sparse_and_written_where_they_belong(tmp_path: Path) -> None:
    sums = BlockSums()
    far = 2**27 - 3  # the last blocks of an 8 TiB file
    sums.set_run(1, [11, 12])
    sums.set_run(far, [21, 22, 23])
    sums.set_run(1023, [31, 32])  # across a page boundary
    assert sums.pages() == 3
    assert [sums[b] for b in (0, 1, 2, 1023, 1024, far, far + 2, 5000)] == [0, 11, 12, 31, 32, 21, 23, 0]
    path = tmp_path / "f.xxh"
    checksums.write(path, sums.take_unwritten(), sync=False)
    assert sums.take_unwritten() == []
    assert os.stat(path).st_blocks * 512 <= 64 * 1024  # sparse: the far sums leave a hole
    loaded = checksums.read(path, [(0, 3), (1023, 1025), (far, far + 3)])
    assert [loaded[b] for b in (0, 1, 2, 1023, 1024, far, far + 1, far + 2)] == [0, 11, 12, 31, 32, 21, 22, 23]
    assert loaded.missing([(0, 3), (1023, 1026), (far, far + 3)]) == [0, 1025]
    assert checksums.read(tmp_path / "none.xxh", [(0, 3)]).missing([(0, 3)]) == [0, 1, 2]


def test_a_failed_write_keeps_the_sums_for_the_next(tmp_path: Path) -> None:
    sums = BlockSums()
    sums.set_run(5, [1, 2, 3])
    pieces = sums.take_unwritten()
    sums.unwritten_again(pieces)
    assert sums.take_unwritten() == pieces


def test_a_save_writes_the_sums_of_every_block_it_claims_before_the_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = state.save
    checked: list[int] = []

    def save_after_sums(path: Path, identity: state.Identity, bitmap: state.Bitmap, **kwargs: bool) -> None:
        on_disk = checksums.read(path.with_suffix(".xxh"), bitmap.runs())
        assert on_disk.missing(bitmap.runs()) == [], "the state would claim blocks whose sum is not written"
        checked.append(len(bitmap))
        real_save(path, identity, bitmap, **kwargs)

    monkeypatch.setattr(state, "save", save_after_sums)

    async def body(cache: Cache, cached: CachedFile) -> None:
        await cached.read(0, 3 * BLOCK)
        await cached.save()
        await cached.read(10 * BLOCK, len(DATA))
        await trio.sleep(0.5)  # the save after a write
        await cached.checkpoint()

    with_cache(tmp_path, FakeOrigin(DATA), body)
    assert max(checked) == 14  # blocks 0-2 and 10-20
