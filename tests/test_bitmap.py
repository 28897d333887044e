"""Unit tests of the block bitmap."""

import random

import pytest

from rangefs.bitmap import Bitmap


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


@pytest.mark.parametrize("nblocks", [0, 1, 7, 8, 9, 1000])
def test_round_trip(nblocks: int) -> None:
    rng = random.Random(nblocks)
    bitmap = Bitmap(nblocks)
    for block in range(nblocks):
        if rng.random() < 0.3:
            bitmap.add(block)
    loaded = Bitmap(nblocks, bitmap.to_bytes())
    assert loaded == bitmap
    assert len(loaded) == len(bitmap)
    assert [b for b in range(nblocks) if b in loaded] == [b for b in range(nblocks) if b in bitmap]


def test_serialized_layout_is_little_endian_bits() -> None:
    bitmap = Bitmap(16)
    bitmap.add(0)
    bitmap.add(9)
    assert bitmap.to_bytes() == bytes([0b00000001, 0b00000010])


def test_load_rejects_wrong_length_and_bits_past_the_end() -> None:
    with pytest.raises(ValueError):
        Bitmap(9, b"\x00")
    with pytest.raises(ValueError):
        Bitmap(9, b"\x00\x02")  # block 9 of a 9-block file


def test_copy_is_independent() -> None:
    bitmap = Bitmap(4)
    snapshot = bitmap.copy()
    bitmap.add(1)
    assert 1 not in snapshot and 1 in bitmap
