"""Which blocks of a cached file are present: a sparse bit array; pure logic, no I/O.

Memory grows with the blocks present, never with the size a server announces: bits live in pages
allocated on first use (a file announced as 8 TiB, read once, holds one page). Block ``b`` is
bit ``b % 8`` of byte ``(b % PAGE_BLOCKS) // 8`` of page ``b // PAGE_BLOCKS``. The serialized
form is a list of runs of present blocks (``runs``), as long as the cached part is fragmented.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

PAGE_BYTES = 4096
PAGE_BLOCKS = 8 * PAGE_BYTES  # 2 GiB of data per page at 64 KiB blocks
_PAGE_SHIFT = PAGE_BLOCKS.bit_length() - 1
_BYTE_MASK = PAGE_BYTES - 1
# Stretches of whole bytes present, or one partly present byte: a run scan visits each full
# stretch once, so a long cached run costs one regex match, not one step per block.
_SET_BYTES = re.compile(rb"\xff+|[^\x00\xff]")


class Bitmap:
    """A set of block numbers in ``range(nblocks)``."""

    __slots__ = ("_count", "_pages", "nblocks")

    def __init__(self, nblocks: int) -> None:
        """Create an empty bitmap."""
        if nblocks < 0:
            raise ValueError(f"negative block count {nblocks}")
        self.nblocks = nblocks
        self._pages: dict[int, bytearray] = {}
        self._count = 0

    @classmethod
    def from_runs(cls, nblocks: int, runs: Iterable[tuple[int, int]]) -> Bitmap:
        """A bitmap of the blocks ``first <= b < stop`` of each run.

        Raises:
            ValueError: a run is empty, out of range, or not after the one before it.
        """
        bitmap, last = cls(nblocks), 0
        for first, stop in runs:
            if not last <= first < stop <= nblocks:
                raise ValueError(f"run {first}..{stop} out of order or past {nblocks} blocks")
            bitmap.add_run(first, stop)
            last = stop
        return bitmap

    @classmethod
    def from_dense(cls, nblocks: int, data: bytes) -> Bitmap:
        """Load the older dense layout: bit ``b % 8`` of byte ``b // 8`` (little-endian bits).

        Raises:
            ValueError: ``data`` has the wrong length or sets bits past ``nblocks``.
        """
        size = (nblocks + 7) // 8
        if len(data) != size:
            raise ValueError(f"bitmap of {len(data)} bytes for {nblocks} blocks (want {size})")
        if nblocks % 8 and data[-1] >> (nblocks % 8):
            raise ValueError("bitmap sets blocks past the end of the file")
        bitmap = cls(nblocks)
        for first, stop in _byte_runs(data, 0):
            bitmap.add_run(first, stop)
        return bitmap

    def __contains__(self, block: int) -> bool:
        page = self._pages.get(block >> _PAGE_SHIFT)
        return page is not None and bool(page[(block >> 3) & _BYTE_MASK] & (1 << (block & 7)))

    def __len__(self) -> int:
        """Number of blocks present."""
        return self._count

    def add(self, block: int) -> None:
        """Mark ``block`` present."""
        if not 0 <= block < self.nblocks:
            raise IndexError(f"block {block} out of range 0..{self.nblocks - 1}")
        page = self._pages.get(block >> _PAGE_SHIFT)
        if page is None:
            page = self._pages[block >> _PAGE_SHIFT] = bytearray(PAGE_BYTES)
        index, mask = (block >> 3) & _BYTE_MASK, 1 << (block & 7)
        if not page[index] & mask:
            page[index] |= mask
            self._count += 1

    def discard(self, block: int) -> None:
        """Mark ``block`` missing."""
        page = self._pages.get(block >> _PAGE_SHIFT)
        index, mask = (block >> 3) & _BYTE_MASK, 1 << (block & 7)
        if page is not None and page[index] & mask:
            page[index] &= ~mask
            self._count -= 1

    def add_run(self, start: int, stop: int) -> None:
        """Mark blocks ``start <= b < stop`` present (whole bytes at a time)."""
        if start < stop and not (0 <= start and stop <= self.nblocks):
            raise IndexError(f"run {start}..{stop} out of range 0..{self.nblocks}")
        block = start
        while block < stop:
            end = min(stop, ((block >> _PAGE_SHIFT) + 1) << _PAGE_SHIFT) & ~7  # whole bytes within the page
            if block & 7 or end <= block:
                self.add(block)
                block += 1
                continue
            page = self._pages.get(block >> _PAGE_SHIFT)
            if page is None:
                page = self._pages[block >> _PAGE_SHIFT] = bytearray(PAGE_BYTES)
            low, high = (block >> 3) & _BYTE_MASK, ((end - 1) >> 3 & _BYTE_MASK) + 1
            self._count += 8 * (high - low) - int.from_bytes(page[low:high], "little").bit_count()
            page[low:high] = b"\xff" * (high - low)
            block = end

    def complete(self) -> bool:
        """True when every block is present."""
        return self._count == self.nblocks

    def missing_runs(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Yield maximal ``(first, stop)`` runs of absent blocks within ``start <= b < stop``."""
        stop = min(stop, self.nblocks)
        block = max(start, 0)
        while block < stop:
            if block in self:
                block += 1
                continue
            first = block
            while block < stop and block not in self:
                block += 1
            yield first, block

    def runs(self) -> Iterator[tuple[int, int]]:
        """Yield maximal ``(first, stop)`` runs of present blocks, in order; costs what is present."""
        first = stop = -1
        for number in sorted(self._pages):
            for run_first, run_stop in _byte_runs(self._pages[number], number * PAGE_BLOCKS):
                if run_first == stop:
                    stop = run_stop
                    continue
                if stop > first:
                    yield first, stop
                first, stop = run_first, run_stop
        if stop > first:
            yield first, stop

    def last_before(self, stop: int) -> int | None:
        """The highest present block below ``stop``, if any."""
        found = None
        for first, run_stop in self.runs():
            if first >= stop:
                break
            found = min(run_stop, stop) - 1
        return found

    def copy(self) -> Bitmap:
        """An independent snapshot."""
        twin = Bitmap(self.nblocks)
        twin._pages = {number: bytearray(page) for number, page in self._pages.items()}
        twin._count = self._count
        return twin

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self.nblocks == other.nblocks and list(self.runs()) == list(other.runs())

    def __repr__(self) -> str:
        return f"Bitmap({self._count}/{self.nblocks} present)"


def _byte_runs(data: bytes | bytearray, base: int) -> Iterator[tuple[int, int]]:
    """Runs of set bits in ``data`` (bit ``b % 8`` of byte ``b // 8``), numbered from ``base``;
    adjacent runs may come apart (the caller merges them)."""
    for match in _SET_BYTES.finditer(data):
        start = base + 8 * match.start()
        if data[match.start()] == 0xFF:
            yield start, base + 8 * match.end()
            continue
        byte = data[match.start()]
        for bit in range(8):
            if byte >> bit & 1:
                yield start + bit, start + bit + 1
