"""The per-URL state file: a versioned header plus the runs of blocks present, in two slots.

Imports only the standard library, rangefs.bitmap and rangefs.safefs (which opens its files).
Layout (all integers little-endian):

    0   8 bytes   magic b"RANGEFS\\0"
    8   u32       format version (FORMAT_VERSION)
    12  u32       header length H
    16  u32       flags (SYNCED: every block recorded was flushed to disk before this save)
    20  u32       run count R
    24  u64       sequence number of the save
    32  H bytes   header: UTF-8 JSON {key, url, size, etag, last_modified, block_size}
    ..  16 R      runs of present blocks: u64 first, u64 stop; in order, apart, within the file
    ..  zeros     padding to a multiple of 512 bytes (room for a save in place on a full disk)
    ..  u32       CRC-32 of every byte before it

The file's size follows the blocks cached, not the size the server announces. A file of format 1
(a dense bitmap after the header) is still read: its saves always came after a flush.

A file that is short, long, of an unknown version, or whose CRC does not match is reported as
StateCorrupt and must not be trusted. A state is kept in two slots, ``<name>`` and
``<name>.prev``: each save overwrites, in place, the slot that does not hold the newest good
save, with the next sequence number. A save torn by a crash leaves the slot before it whole,
and ``read`` falls back to it. In place, because a save comes every few MiB of progress and a
rename per save slowed cold sequential reads (docs/experiments.md, 'State saves in two slots').
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from rangefs import safefs
from rangefs.bitmap import Bitmap

MAGIC = b"RANGEFS\0"
FORMAT_VERSION = 2
_DENSE_VERSION = 1
_PREFIX = struct.Struct("<8sIIIIQ")
_DENSE_PREFIX = struct.Struct("<8sII")
_RUN = struct.Struct("<QQ")
_CRC = struct.Struct("<I")
SYNCED = 1
# State files are padded to a multiple of this: on a full disk a save can still overwrite the
# file in place while the run list grows a little.
_SIZE_STEP = 512


class StateCorrupt(ValueError):
    """A state file that cannot be trusted (torn, truncated, foreign or of another version)."""


@dataclass(frozen=True)
class Identity:
    """What a cache is valid for: one version of one remote file, cut into blocks of one size."""

    key: str
    url: str  # redacted: a state file holds no credentials
    size: int
    etag: str | None
    last_modified: str | None
    block_size: int

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.block_size)


@dataclass(frozen=True)
class Saved:
    """What one state file says."""

    identity: Identity
    bitmap: Bitmap
    synced: bool  # the blocks it records were flushed (fdatasync) before it was written
    sequence: int = 0  # higher in each save
    distrusted: str | None = dataclasses.field(default=None, compare=False)  # why the other slot was not used


def previous(path: Path) -> Path:
    """The other slot of the state file ``path``."""
    return path.with_name(path.name + ".prev")


def encode(identity: Identity, bitmap: Bitmap, *, synced: bool = True, sequence: int = 0, size: int = 0) -> bytes:
    """Serialize a state file body, CRC included, padded with zeros to at least ``size`` bytes."""
    if bitmap.nblocks != identity.nblocks:
        raise ValueError(f"bitmap of {bitmap.nblocks} blocks for {identity.nblocks}")
    header = json.dumps(identity.__dict__, sort_keys=True).encode()
    runs = b"".join(_RUN.pack(first, stop) for first, stop in bitmap.runs())
    flags = SYNCED if synced else 0
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), flags, len(runs) // _RUN.size, sequence)
    body = prefix + header + runs
    size = max(size, -(-(len(body) + _CRC.size) // _SIZE_STEP) * _SIZE_STEP)
    body += bytes(size - len(body) - _CRC.size)
    return body + _CRC.pack(zlib.crc32(body))


def decode(blob: bytes) -> Saved:
    """Parse a state file body.

    Raises:
        StateCorrupt: anything about the bytes is wrong.
    """
    if len(blob) < _DENSE_PREFIX.size + _CRC.size:
        raise StateCorrupt(f"state file truncated ({len(blob)} bytes)")
    body, (crc,) = blob[: -_CRC.size], _CRC.unpack(blob[-_CRC.size :])
    if zlib.crc32(body) != crc:
        raise StateCorrupt("state file checksum mismatch (torn or corrupt)")
    magic, version, header_len = _DENSE_PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise StateCorrupt("not a rangefs state file")
    if version == _DENSE_VERSION:
        return _decode_dense(body, header_len)
    if version != FORMAT_VERSION:
        raise StateCorrupt(f"state file format {version}, this rangefs reads {FORMAT_VERSION}")
    if len(body) < _PREFIX.size:
        raise StateCorrupt(f"state file truncated ({len(blob)} bytes)")
    _, _, _, flags, count, sequence = _PREFIX.unpack_from(body)
    identity = _identity(body[_PREFIX.size : _PREFIX.size + header_len])
    start = _PREFIX.size + header_len
    end = start + count * _RUN.size
    if end > len(body) or body[end:].count(0) != len(body) - end:
        raise StateCorrupt("state file runs do not fit its length")
    try:
        bitmap = Bitmap.from_runs(identity.nblocks, _RUN.iter_unpack(body[start:end]))
    except ValueError as exc:
        raise StateCorrupt(str(exc)) from None
    return Saved(identity, bitmap, bool(flags & SYNCED), sequence)


def _decode_dense(body: bytes, header_len: int) -> Saved:
    identity = _identity(body[_DENSE_PREFIX.size : _DENSE_PREFIX.size + header_len])
    try:
        bitmap = Bitmap.from_dense(identity.nblocks, body[_DENSE_PREFIX.size + header_len :])
    except ValueError as exc:
        raise StateCorrupt(str(exc)) from None
    return Saved(identity, bitmap, synced=True)


def _identity(header: bytes) -> Identity:
    try:
        fields = json.loads(header)
        identity = Identity(**fields)
    except (ValueError, TypeError) as exc:
        raise StateCorrupt(f"bad state header: {exc}") from None
    if not isinstance(identity.size, int) or not isinstance(identity.block_size, int):
        raise StateCorrupt("bad state header: size or block size not a number")
    if identity.size < 0 or identity.block_size <= 0:
        raise StateCorrupt("bad state header: size or block size out of range")
    return identity


def read_slot(path: Path) -> Saved:
    """Read and check one slot.

    Raises:
        FileNotFoundError: there is none.
        StateCorrupt: it cannot be trusted.
    """
    return decode(safefs.read_bytes(path))


def read(path: Path) -> Saved:
    """The newest good save of the state file ``path`` (either slot).

    Raises:
        FileNotFoundError: neither slot exists.
        StateCorrupt: no slot can be trusted.
    """
    good: list[Saved] = []
    errors: list[str] = []
    for slot in (path, previous(path)):
        try:
            good.append(read_slot(slot))
        except FileNotFoundError:
            continue
        except (OSError, StateCorrupt) as exc:
            errors.append(f"{slot.name}: {exc}")
    if not good:
        if errors:
            raise StateCorrupt("; ".join(errors))
        raise FileNotFoundError(errno.ENOENT, "no state file", str(path))
    newest = max(good, key=lambda saved: saved.sequence)
    return dataclasses.replace(newest, distrusted="; ".join(errors) or None)


def load(path: Path) -> tuple[Identity, Bitmap]:
    """The identity and bitmap of the newest good save (see ``read``)."""
    saved = read(path)
    return saved.identity, saved.bitmap


def remove(path: Path) -> None:
    """Delete both slots of a state file."""
    safefs.unlink(path)
    safefs.unlink(previous(path))


def save(path: Path, identity: Identity, bitmap: Bitmap, *, synced: bool = True, durable: bool = True) -> None:
    """Save a new generation into the slot that does not hold the newest good one, in place.

    ``synced``: the caller flushed (fdatasync) every block in the bitmap; a later load may
    count them as on disk. ``durable``: fsync it, so that the save outlives a power cut;
    without it a save survives the process being killed, not the machine. Either way a recorded
    block is checked against its sum before use, so a save that records a block whose bytes did
    not reach the disk costs a refetch, never a wrong byte.

    On a full disk (no room to grow the slot) the newest slot, when it is long enough, is
    overwritten in place instead: it needs no new space, and a torn write fails the CRC, so the
    worst case is a cache that is not trusted, never one that lies.
    """
    slots = (path, previous(path))
    sequences = [_sequence(slot) for slot in slots]
    newest = max(range(2), key=lambda i: sequences[i])
    target = slots[1 - newest] if sequences[newest] >= 0 else path
    sequence = max(sequences) + 1
    try:
        _write_slot(target, encode(identity, bitmap, synced=synced, sequence=sequence, size=_size(target)), durable)
    except OSError as exc:
        other = slots[newest]
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or other == target:
            raise
        payload = encode(identity, bitmap, synced=synced, sequence=sequence, size=_size(other))
        if len(payload) > _size(other):
            raise
        _write_slot(other, payload, durable, create=False)


def _sequence(slot: Path) -> int:
    """The sequence number of a good slot; -1 for a missing or untrustworthy one. Checks the
    CRC and prefix only: a save must not cost a parse of what it replaces."""
    try:
        blob = safefs.read_bytes(slot)
    except OSError:
        return -1
    if len(blob) < _PREFIX.size + _CRC.size or zlib.crc32(blob[: -_CRC.size]) != _CRC.unpack(blob[-_CRC.size :])[0]:
        return -1
    magic, version, _, _, _, sequence = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        return -1
    return sequence if version == FORMAT_VERSION else 0 if version == _DENSE_VERSION else -1


def _write_slot(path: Path, payload: bytes, durable: bool, create: bool = True) -> None:
    created = create and not safefs.exists(path)
    fd = safefs.open(path, os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    try:
        view, offset = memoryview(payload), 0
        while offset < len(payload):
            offset += os.pwrite(fd, view[offset:], offset)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable and created:
        _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _size(path: Path) -> int:
    try:
        return safefs.lstat(path).st_size
    except OSError:
        return -1
