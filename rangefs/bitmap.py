"""Which blocks of a cached file are present: a fixed-size bit array; pure logic, no I/O.

Block ``b`` is bit ``b % 8`` of byte ``b // 8`` (little-endian bit order), so the serialized
form is stable across platforms and versions of this module.
"""

from __future__ import annotations

from collections.abc import Iterator


class Bitmap:
    """A set of block numbers in ``range(nblocks)``."""

    __slots__ = ("_bits", "_count", "nblocks")

    def __init__(self, nblocks: int, data: bytes | None = None) -> None:
        """Create an empty bitmap, or one loaded from ``to_bytes()`` output.

        Raises:
            ValueError: ``data`` has the wrong length or sets bits past ``nblocks``.
        """
        if nblocks < 0:
            raise ValueError(f"negative block count {nblocks}")
        self.nblocks = nblocks
        size = (nblocks + 7) // 8
        if data is None:
            self._bits = bytearray(size)
            self._count = 0
            return
        if len(data) != size:
            raise ValueError(f"bitmap of {len(data)} bytes for {nblocks} blocks (want {size})")
        self._bits = bytearray(data)
        if nblocks % 8 and self._bits[-1] >> (nblocks % 8):
            raise ValueError("bitmap sets blocks past the end of the file")
        self._count = sum(b.bit_count() for b in self._bits)

    def __contains__(self, block: int) -> bool:
        return bool(self._bits[block >> 3] & (1 << (block & 7)))

    def __len__(self) -> int:
        """Number of blocks present."""
        return self._count

    def add(self, block: int) -> None:
        """Mark ``block`` present."""
        if not 0 <= block < self.nblocks:
            raise IndexError(f"block {block} out of range 0..{self.nblocks - 1}")
        mask = 1 << (block & 7)
        if not self._bits[block >> 3] & mask:
            self._bits[block >> 3] |= mask
            self._count += 1

    def discard(self, block: int) -> None:
        """Mark ``block`` missing."""
        mask = 1 << (block & 7)
        if 0 <= block < self.nblocks and self._bits[block >> 3] & mask:
            self._bits[block >> 3] &= ~mask
            self._count -= 1

    def add_run(self, start: int, stop: int) -> None:
        """Mark blocks ``start <= b < stop`` present."""
        for block in range(start, stop):
            self.add(block)

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

    def to_bytes(self) -> bytes:
        """Serialize; ``Bitmap(nblocks, b.to_bytes())`` gives an equal bitmap."""
        return bytes(self._bits)

    def copy(self) -> Bitmap:
        """An independent snapshot."""
        return Bitmap(self.nblocks, bytes(self._bits))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self.nblocks == other.nblocks and self._bits == other._bits

    def __repr__(self) -> str:
        return f"Bitmap({self._count}/{self.nblocks} present)"
