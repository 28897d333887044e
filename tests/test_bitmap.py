"""Unit tests of the block bitmap."""

import itertools
import random

import pytest

from rangefs.bitmap import PAGE_BLOCKS, Bitmap


def test_empty_bitmap_has_every_block_missing() -> None:
    bitmap = Bitmap(10)
    assert len(bitmap) == 0
    assert not bitmap.complete()
    assert list(bitmap.missing_runs(0, 10)) == [(0, 10)]
    assert 3 not in bitmap


def test_add_and_test() -> None:
    bitmap = Bitmap(20)
    bitmap.add(0)
    bitmap.add(9)
    bitmap.add(9)  # adding twice counts once
    assert 0 in bitmap and 9 in bitmap
    assert 1 not in bitmap and 8 not in bitmap and 10 not in bitmap
    assert len(bitmap) == 2


def test_add_out_of_range_is_refused() -> None:
    bitmap = Bitmap(5)
    with pytest.raises(IndexError):
        bitmap.add(5)
    with pytest.raises(IndexError):
        bitmap.add(-1)


def test_missing_runs_are_maximal_and_clipped() -> None:
    bitmap = Bitmap(12)
    bitmap.add_run(2, 4)
    bitmap.add(7)
    assert list(bitmap.missing_runs(0, 12)) == [(0, 2), (4, 7), (8, 12)]
    assert list(bitmap.missing_runs(3, 9)) == [(4, 7), (8, 9)]
    assert list(bitmap.missing_runs(5, 100)) == [(5, 7), (8, 12)]
    assert list(bitmap.missing_runs(2, 4)) == []


def test_complete() -> None:
    bitmap = Bitmap(9)
    bitmap.add_run(0, 9)
    assert bitmap.complete()
    assert list(bitmap.missing_runs(0, 9)) == []


@pytest.mark.parametrize("nblocks", [0, 1, 7, 8, 9, 1000, 3 * PAGE_BLOCKS + 5])
def test_round_trip_through_runs(nblocks: int) -> None:
    rng = random.Random(nblocks)
    bitmap = Bitmap(nblocks)
    for block in range(nblocks):
        if rng.random() < 0.3 or 40 <= block < 3000:
            bitmap.add(block)
    runs = list(bitmap.runs())
    assert all(first < stop for first, stop in runs)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(runs))  # maximal: never adjacent
    loaded = Bitmap.from_runs(nblocks, runs)
    assert loaded == bitmap
    assert len(loaded) == len(bitmap)
    assert [b for b in range(nblocks) if b in loaded] == [b for b in range(nblocks) if b in bitmap]


def test_runs_merge_across_pages() -> None:
    bitmap = Bitmap(3 * PAGE_BLOCKS)
    bitmap.add_run(PAGE_BLOCKS - 3, 2 * PAGE_BLOCKS + 2)
    assert list(bitmap.runs()) == [(PAGE_BLOCKS - 3, 2 * PAGE_BLOCKS + 2)]
    assert len(bitmap) == PAGE_BLOCKS + 5
    assert bitmap.last_before(PAGE_BLOCKS) == PAGE_BLOCKS - 1
    assert bitmap.last_before(PAGE_BLOCKS - 3) is None


def test_add_run_counts_blocks_already_present_once() -> None:
    bitmap = Bitmap(100)
    for block in (3, 9, 16, 40):
        bitmap.add(block)
    bitmap.add_run(0, 41)
    assert len(bitmap) == 41 and bitmap == Bitmap.from_runs(100, [(0, 41)])


def test_memory_follows_the_blocks_present_not_the_size() -> None:
    """A server may claim any size: 8 TiB in 64 KiB blocks is 2**27 blocks."""
    nblocks = 2**27
    bitmap = Bitmap(nblocks)
    bitmap.add(nblocks - 1)
    bitmap.add(5)
    assert len(bitmap._pages) == 2
    assert list(bitmap.runs()) == [(5, 6), (nblocks - 1, nblocks)]
    assert bitmap.copy() == bitmap and len(bitmap.copy()._pages) == 2
    assert not bitmap.complete()


def test_from_runs_refuses_bad_runs() -> None:
    for runs in ([(3, 3)], [(5, 4)], [(0, 11)], [(4, 6), (2, 3)], [(-1, 2)]):
        with pytest.raises(ValueError):
            Bitmap.from_runs(10, runs)


def test_the_older_dense_layout_is_read_as_little_endian_bits() -> None:
    bitmap = Bitmap.from_dense(16, bytes([0b00000001, 0b00000010]))
    assert list(bitmap.runs()) == [(0, 1), (9, 10)]
    assert Bitmap.from_dense(20, b"\xff\xff\x0f") == Bitmap.from_runs(20, [(0, 20)])


def test_load_rejects_wrong_length_and_bits_past_the_end() -> None:
    with pytest.raises(ValueError):
        Bitmap.from_dense(9, b"\x00")
    with pytest.raises(ValueError):
        Bitmap.from_dense(9, b"\x00\x02")  # block 9 of a 9-block file


def test_copy_is_independent() -> None:
    bitmap = Bitmap(4)
    snapshot = bitmap.copy()
    bitmap.add(1)
    assert 1 not in snapshot and 1 in bitmap


def test_add_run_equals_adding_each_block() -> None:
    rng = random.Random(7)
    nblocks = 2 * PAGE_BLOCKS + 100
    for _ in range(200):
        one, many = Bitmap(nblocks), Bitmap(nblocks)
        for _ in range(3):
            start = rng.randrange(nblocks)
            stop = min(nblocks, start + rng.choice([1, 7, 8, 9, 70, PAGE_BLOCKS + 3]))
            many.add_run(start, stop)
            for block in range(start, stop):
                one.add(block)
        assert many == one and len(many) == len(one)
    with pytest.raises(IndexError):
        Bitmap(10).add_run(5, 11)
