"""Unit tests of the state file: round trip, atomic replace, and refusing torn or foreign files."""

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import pytest

from rangefs import state
from rangefs.bitmap import Bitmap

IDENTITY = state.Identity(
    key="k" * 32,
    url="http://127.0.0.1/x.bin",
    size=10 * 4096 + 5,
    etag='"abc-123"',
    last_modified="Mon, 23 Nov 2026 08:00:00 GMT",
    block_size=4096,
)


def _bitmap() -> Bitmap:
    bitmap = Bitmap(IDENTITY.nblocks)
    for block in (0, 3, 10):
        bitmap.add(block)
    return bitmap


def test_nblocks_rounds_up() -> None:
    assert IDENTITY.nblocks == 11


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.state"
    state.save(path, IDENTITY, _bitmap())
    identity, bitmap = state.load(path)
    assert identity == IDENTITY
    assert bitmap == _bitmap()


def test_saves_alternate_between_two_slots(tmp_path: Path) -> None:
    path = tmp_path / "x.state"
    state.save(path, IDENTITY, Bitmap(IDENTITY.nblocks))
    state.save(path, IDENTITY, _bitmap())
    assert state.load(path)[1] == _bitmap()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.state", "x.state.prev"]
    assert state.read_slot(state.previous(path)).bitmap == _bitmap()  # the newer one
    assert state.read_slot(path).bitmap == Bitmap(IDENTITY.nblocks)  # the one before


def test_every_truncation_is_detected() -> None:
    blob = state.encode(IDENTITY, _bitmap())
    for length in range(len(blob)):
        with pytest.raises(state.StateCorrupt):
            state.decode(blob[:length])


def test_every_flipped_byte_is_detected() -> None:
    blob = state.encode(IDENTITY, _bitmap())
    for index in range(len(blob)):
        torn = bytearray(blob)
        torn[index] ^= 0x40
        with pytest.raises(state.StateCorrupt):
            state.decode(bytes(torn))


def test_appended_garbage_is_detected() -> None:
    with pytest.raises(state.StateCorrupt):
        state.decode(state.encode(IDENTITY, _bitmap()) + b"\0")


def test_other_format_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "FORMAT_VERSION", 99)
    blob = state.encode(IDENTITY, _bitmap())
    monkeypatch.undo()
    with pytest.raises(state.StateCorrupt, match="format 99"):
        state.decode(blob)


def test_bitmap_must_match_the_size() -> None:
    with pytest.raises(ValueError):
        state.encode(IDENTITY, Bitmap(3))


def test_missing_file_is_not_corruption(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        state.load(tmp_path / "none.state")


def test_a_full_disk_overwrites_the_state_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    path = tmp_path / "f.state"
    state.save(path, IDENTITY, Bitmap(IDENTITY.nblocks))
    real_open = os.open

    def no_room_for_new_files(file: str | Path, flags: int, *args: int, **kwargs: int) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_room_for_new_files)
    state.save(path, IDENTITY, _bitmap())
    assert state.load(path) == (IDENTITY, _bitmap())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.state"]  # no temp file left behind
    other = tmp_path / "g.state"  # nothing to overwrite: the error stands
    with pytest.raises(OSError):
        state.save(other, IDENTITY, _bitmap())


def test_the_size_follows_the_runs_cached_not_the_size_claimed() -> None:
    huge = dataclasses.replace(IDENTITY, size=8 * 2**40, block_size=64 * 1024)  # 2**27 blocks
    bitmap = Bitmap(huge.nblocks)
    bitmap.add_run(0, 2)
    bitmap.add(huge.nblocks - 1)
    blob = state.encode(huge, bitmap)
    assert len(blob) <= 1024
    assert state.decode(blob) == state.Saved(huge, bitmap, synced=True)


def test_the_synced_mark_round_trips() -> None:
    assert not state.decode(state.encode(IDENTITY, _bitmap(), synced=False)).synced
    assert state.decode(state.encode(IDENTITY, _bitmap())).synced


def test_runs_out_of_order_or_past_the_end_are_refused() -> None:
    blob = bytearray(state.encode(IDENTITY, _bitmap()))
    header_len = struct.unpack_from("<I", blob, 12)[0]
    struct.pack_into("<QQ", blob, 32 + header_len, 10, 12)  # past the 11 blocks
    blob[-4:] = struct.pack("<I", zlib.crc32(blob[:-4]))
    with pytest.raises(state.StateCorrupt, match="past"):
        state.decode(bytes(blob))


def test_format_1_dense_state_files_are_still_read() -> None:
    """The older layout: the dense bitmap after the header; its saves always followed a flush."""
    header = json.dumps(IDENTITY.__dict__, sort_keys=True).encode()
    dense = bytes([0b00001001, 0b00000100])  # blocks 0, 3, 10
    body = struct.pack("<8sII", state.MAGIC, 1, len(header)) + header + dense
    saved = state.decode(body + struct.pack("<I", zlib.crc32(body)))
    assert saved == state.Saved(IDENTITY, _bitmap(), synced=True)


def test_a_torn_save_falls_back_to_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "x.state"
    first = Bitmap(IDENTITY.nblocks)
    first.add(1)
    state.save(path, IDENTITY, first)
    state.save(path, IDENTITY, _bitmap(), synced=False, durable=False)
    assert state.read(path) == state.Saved(IDENTITY, _bitmap(), synced=False, sequence=1)
    newest = state.previous(path)
    newest.write_bytes(newest.read_bytes()[:-3])  # torn
    saved = state.read(path)
    assert saved == state.Saved(IDENTITY, first, synced=True, sequence=0)
    assert saved.distrusted is not None and "x.state.prev" in saved.distrusted
    state.save(path, IDENTITY, _bitmap())  # into the torn slot: the good one stays
    assert state.read_slot(newest).sequence == 1 and state.read_slot(path).bitmap == first
    path.write_bytes(b"garbage")
    with pytest.raises(state.StateCorrupt):
        state.read_slot(path)
    assert state.read(path).bitmap == _bitmap()
    newest.write_bytes(b"garbage")
    with pytest.raises(state.StateCorrupt):
        state.read(path)
    state.remove(path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        state.read(path)
