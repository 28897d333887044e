"""The sums of a file's cached blocks: sparse in memory and on disk; no trio, no network.

Imports only the standard library. The sums file holds ``block_sum`` of block ``b`` as a native
u32 at offset ``4 * b`` (a cache never leaves its machine). It is written piece by piece at the
blocks fetched and never allocated whole, so its disk use, like this object's memory, follows
the blocks cached rather than the size a server announces. A sum never written reads as 0 (a hole
or past the end), which no block is trusted with: ``block_sum`` of a block of zeros is not 0,
so a block whose bytes never reached the disk fails its check even when its sum is lost too.
"""

from __future__ import annotations

import array
import os
from collections.abc import Iterable
from pathlib import Path

from rangefs import safefs

_PAGE = 1024  # sums per page in memory: 4 KiB, the blocks of 64 MiB of data at 64 KiB blocks
MISSING = 0


class BlockSums:
    """Sums by block number, with the ones not yet written to the sums file."""

    def __init__(self) -> None:
        self._pages: dict[int, array.array[int]] = {}
        self._unwritten: dict[int, tuple[int, int]] = {}  # page -> (lo, hi) offsets within it
        self._reserved: set[int] = set()  # pages whose room in the sums file is allocated

    def __getitem__(self, block: int) -> int:
        page = self._pages.get(block // _PAGE)
        return MISSING if page is None else page[block % _PAGE]

    def set_run(self, first: int, sums: list[int]) -> None:
        """Record the sums of blocks ``first .. first + len(sums)``, to be written."""
        block, done = first, 0
        while done < len(sums):
            number, offset = divmod(block, _PAGE)
            take = min(len(sums) - done, _PAGE - offset)
            page = self._pages.get(number)
            if page is None:
                page = self._pages[number] = array.array("I", bytes(4 * _PAGE))
            page[offset : offset + take] = array.array("I", sums[done : done + take])
            lo, hi = self._unwritten.get(number, (offset, offset + take))
            self._unwritten[number] = (min(lo, offset), max(hi, offset + take))
            block, done = block + take, done + take

    def take_unwritten(self) -> list[tuple[int, bytes]]:
        """``(first block, sums)`` pieces not written yet; they count as written from now on."""
        pieces = [
            (number * _PAGE + lo, self._pages[number][lo:hi].tobytes())
            for number, (lo, hi) in sorted(self._unwritten.items())
        ]
        self._unwritten = {}
        return pieces

    def unwritten_again(self, pieces: list[tuple[int, bytes]]) -> None:
        """A write of ``pieces`` failed: they wait for the next one (unless rewritten since)."""
        for first, raw in pieces:
            number, lo = divmod(first, _PAGE)
            hi = lo + len(raw) // 4
            old_lo, old_hi = self._unwritten.get(number, (lo, hi))
            self._unwritten[number] = (min(lo, old_lo), max(hi, old_hi))

    def missing(self, runs: Iterable[tuple[int, int]]) -> list[int]:
        """The blocks of ``runs`` whose sum is missing."""
        found: list[int] = []
        for first, stop in runs:
            block = first
            while block < stop:
                number, offset = divmod(block, _PAGE)
                count = min(stop - block, _PAGE - offset)
                page = self._pages.get(number)
                if page is None:
                    found.extend(range(block, block + count))
                elif page[offset : offset + count].count(MISSING):
                    found.extend(b for b in range(block, block + count) if page[b - number * _PAGE] == MISSING)
                block += count
        return found

    def unreserved(self, first: int, stop: int) -> list[int]:
        """The pages of blocks ``first .. stop`` whose room in the sums file is not allocated yet."""
        return [n for n in range(first // _PAGE, (stop - 1) // _PAGE + 1) if n not in self._reserved]

    def reserved(self, pages: list[int]) -> None:
        self._reserved.update(pages)

    def pages(self) -> int:
        """Pages held in memory (for tests of what memory follows)."""
        return len(self._pages)


def load(fd: int, runs: Iterable[tuple[int, int]]) -> BlockSums:
    """The sums of the blocks in ``runs`` from the sums file ``fd``; other blocks read as missing."""
    sums = BlockSums()
    for first, stop in runs:
        block = first
        while block < stop:
            count = min(stop - block, _PAGE - block % _PAGE)
            raw = os.pread(fd, 4 * count, 4 * block)
            values = array.array("I")
            values.frombytes(raw[: len(raw) - len(raw) % 4])
            values.extend(array.array("I", bytes(4 * (count - len(values)))))
            sums.set_run(block, values.tolist())
            block += count
    sums.take_unwritten()  # as read: nothing to write back
    return sums


def read(path: Path, runs: Iterable[tuple[int, int]]) -> BlockSums:
    """``load`` from the file at ``path``; no file: every sum missing."""
    try:
        fd = safefs.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return BlockSums()
    try:
        return load(fd, runs)
    finally:
        os.close(fd)


def reserve(path: Path, pages: list[int]) -> None:
    """Allocate the room of ``pages`` in the sums file before their blocks are fetched: their sums
    can then be saved even once the disk is full (the data of a fetch fills it first).

    Raises:
        OSError: no room (or the file cannot be written).
    """
    fd = safefs.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for number in pages:
            os.posix_fallocate(fd, 4 * _PAGE * number, 4 * _PAGE)
    finally:
        os.close(fd)


def write(path: Path, pieces: list[tuple[int, bytes]], *, sync: bool) -> None:
    """Write ``pieces`` (from ``take_unwritten``) at their blocks; ``sync``: fdatasync after."""
    fd = safefs.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for first, raw in pieces:
            os.pwrite(fd, raw, 4 * first)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
