"""Checking cached blocks against their sums before their first use in a session.

Imports rangefs.bitmap and fetcher (``block_sum``); sees its cached file (rangefs.cachedfile)
to reach the data file, the bitmap and the journal. ``verified`` is written on the trio thread,
and by the cached file's open, grow and reset in a worker thread while it holds both journal
locks; a check that finds it replaced when its read returns (a version switch, or a failed flush
that distrusts every block) discards its result.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from rangefs.bitmap import Bitmap
from rangefs.fetcher import block_sum

if TYPE_CHECKING:
    from rangefs.cachedfile import CachedFile

log = logging.getLogger(__name__)


class Verifier:
    """Which blocks were checked in this session, and the check of the others."""

    def __init__(self, file: CachedFile) -> None:
        self._file = file
        self.verified: Bitmap | None = None  # blocks checked against their sum in this session

    def reopened(self, unchanged: bool, nblocks: int) -> None:
        """The data file was opened: none is verified yet, unless the file is as this session left
        it at its last close (``unchanged``); the blocks checked then need no new check, so a
        read after the last close does not hash the whole file again."""
        kept = self.verified if unchanged else None
        self.verified = kept if kept is not None and kept.nblocks == nblocks else Bitmap(nblocks)

    def narrow(self, bitmap: Bitmap) -> None:
        """The file grew and keeps ``bitmap``: of the blocks verified, those it keeps stay so."""
        old_verified = self.verified
        self.verified = Bitmap(bitmap.nblocks)
        if old_verified is not None:
            for first, stop in bitmap.runs():
                for block in range(first, min(stop, old_verified.nblocks)):
                    if block in old_verified:
                        self.verified.add(block)

    async def verify(self, first: int, stop: int) -> tuple[bool, bytes | bytearray | None]:
        """Check the blocks not checked yet this session against their sum; discard those that fail.

        Returns whether any was discarded, and the bytes of blocks ``first .. stop`` when all of
        them were read for the check. A block fails when the data file was damaged or written
        behind our back, or when its sum was never saved (a sums file lost or cut short).
        """
        file = self._file
        verified, generation = self.verified, file.generation
        if verified is None:
            return False, None
        todo = [b for b in range(first, stop) if b not in verified]
        if not todo:
            return False, None
        block_size = file.block_size
        start = todo[0] * block_size
        size = min((todo[-1] + 1) * block_size, file.size) - start
        resident = file.data.read_if_in_page_cache(size, start)
        if resident is not None:  # in the page cache: checking here beats a hop to a worker thread
            data: bytes | bytearray = resident
            bad = self._check_blocks(todo, data)
        else:  # from the disk: read and check in a worker thread

            def read_and_check() -> tuple[bytes, set[int]]:
                read = os.pread(file.data.fd, size, start)
                return read, self._check_blocks(todo, read)

            data, bad = await trio.to_thread.run_sync(read_and_check)
        if self.verified is not verified:
            if file.generation == generation and self.verified is not None:
                return await self.verify(first, stop)  # distrusted meanwhile (a failed flush): check again
            return False, None  # the version switched meanwhile: the caller's version check decides
        bitmap = file.open_bitmap()
        for block in todo:
            if block in bad:
                bitmap.discard(block)
            elif block in bitmap:
                verified.add(block)
        if bad:
            file.journal.discarded(bad)
            log.warning("%s: %d cached block(s) from %d failed their checksum; fetching them again",
                        file.identity.url, len(bad), min(bad))
        whole = not bad and todo[0] == first and todo[-1] == stop - 1
        return bool(bad), data if whole else None

    def _check_blocks(self, blocks: list[int], data: bytes | bytearray) -> set[int]:
        """The blocks whose bytes in ``data`` (blocks[0] .. blocks[-1] of the file) do not match their sum."""
        file, disk = self._file, self._file.data
        size, start, file_size = file.block_size, blocks[0] * file.block_size, file.size
        view = memoryview(data)
        return {
            block
            for block in blocks
            if block_sum(view[block * size - start : min((block + 1) * size, file_size) - start]) != disk.sums[block]
        }
