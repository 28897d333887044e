"""Unit tests of the state file: round trip, atomic replace, and refusing torn or foreign files."""

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


def test_save_replaces_atomically_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "x.state"
    state.save(path, IDENTITY, Bitmap(IDENTITY.nblocks))
    state.save(path, IDENTITY, _bitmap())
    assert state.load(path)[1] == _bitmap()
    assert [p.name for p in tmp_path.iterdir()] == ["x.state"]


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
    assert [p.name for p in tmp_path.iterdir()] == ["f.state"]  # no temp file left behind
    other = tmp_path / "g.state"  # nothing to overwrite: the error stands
    with pytest.raises(OSError):
        state.save(other, IDENTITY, _bitmap())
