"""The per-URL state file: a versioned header plus the block bitmap, saved atomically.

Imports only the standard library, rangefs.bitmap and rangefs.safefs (which opens its files).
Layout (all integers little-endian):

    0   8 bytes   magic b"RANGEFS\\0"
    8   u32       format version (FORMAT_VERSION)
    12  u32       header length H
    16  H bytes   header: UTF-8 JSON {key, url, size, etag, last_modified, block_size}
    ..  N bytes   bitmap, N = ceil(size / block_size / 8)
    ..  u32       CRC-32 of every byte before it

A file that is short, long, of another version, or whose CRC does not match is reported as
StateCorrupt and must not be trusted: the caller starts that file's cache afresh.
"""

from __future__ import annotations

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
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_CRC = struct.Struct("<I")


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


def encode(identity: Identity, bitmap: Bitmap) -> bytes:
    """Serialize a state file body, CRC included."""
    if bitmap.nblocks != identity.nblocks:
        raise ValueError(f"bitmap of {bitmap.nblocks} blocks for {identity.nblocks}")
    header = json.dumps(identity.__dict__, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + bitmap.to_bytes()
    return body + _CRC.pack(zlib.crc32(body))


def decode(blob: bytes) -> tuple[Identity, Bitmap]:
    """Parse a state file body.

    Raises:
        StateCorrupt: anything about the bytes is wrong.
    """
    if len(blob) < _PREFIX.size + _CRC.size:
        raise StateCorrupt(f"state file truncated ({len(blob)} bytes)")
    body, (crc,) = blob[: -_CRC.size], _CRC.unpack(blob[-_CRC.size :])
    if zlib.crc32(body) != crc:
        raise StateCorrupt("state file checksum mismatch (torn or corrupt)")
    magic, version, header_len = _PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise StateCorrupt("not a rangefs state file")
    if version != FORMAT_VERSION:
        raise StateCorrupt(f"state file format {version}, this rangefs reads {FORMAT_VERSION}")
    identity = _identity(body[_PREFIX.size : _PREFIX.size + header_len])
    try:
        bitmap = Bitmap(identity.nblocks, body[_PREFIX.size + header_len :])
    except ValueError as exc:
        raise StateCorrupt(str(exc)) from None
    return identity, bitmap


def _identity(header: bytes) -> Identity:
    try:
        fields = json.loads(header)
        identity = Identity(**fields)
    except (ValueError, TypeError) as exc:
        raise StateCorrupt(f"bad state header: {exc}") from None
    if identity.size < 0 or identity.block_size <= 0:
        raise StateCorrupt("bad state header: size or block size out of range")
    return identity


def load(path: Path) -> tuple[Identity, Bitmap]:
    """Read and check a state file.

    Raises:
        FileNotFoundError: there is none.
        StateCorrupt: it cannot be trusted.
    """
    return decode(safefs.read_bytes(path))


def save(path: Path, identity: Identity, bitmap: Bitmap) -> None:
    """Replace the state file atomically: temp file, fsync, rename, fsync of the directory.

    On a full disk (no room for the temp file) the existing state file, when it has the same
    size, is overwritten in place instead: it needs no new space, and a torn write fails the
    CRC, so the worst case is a cache that is not trusted, never one that lies.
    The caller must have made the data the bitmap claims durable (fdatasync) before this.
    """
    payload = encode(identity, bitmap)
    tmp = safefs.temp_path(path)
    try:
        _write_file(tmp, payload, os.O_CREAT | os.O_EXCL)
    except OSError as exc:
        safefs.unlink(tmp)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or _size(path) != len(payload):
            raise
        _write_file(path, payload, 0)
        return
    safefs.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_file(path: Path, payload: bytes, flags: int) -> None:
    fd = safefs.open(path, os.O_WRONLY | flags, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    try:
        return safefs.lstat(path).st_size
    except OSError:
        return -1
