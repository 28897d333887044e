"""The readahead policy: how far ahead of a sequential reader to fetch, and when to fetch more.

Pure logic with no I/O; imports nothing from rangefs. One ``Readahead`` per open handle, used
on the trio thread only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Readahead:
    """Sequential-access detection for one open handle: how far ahead of a read to prefetch.

    Like mountpoint-s3's prefetcher: a read that starts near where the previous one ended is
    sequential (reads the kernel sends out of order, up to ``tolerance`` apart, still count, and
    so does a forward skip into the window being fetched). The window is half of what the reader
    has consumed in this sequential stretch, from ``initial`` up to ``maximum``: it grows as fast as
    the reader proves it wants the bytes, not per read, so a short read after a seek fetches little
    while a long one keeps its speed (docs/experiments.md, 'Readahead window'). "Consumed"
    includes the kernel's own readahead, which already runs ahead of the reader. Any other read
    shrinks it to nothing, so random access fetches only the blocks it touches.
    """

    initial: int
    maximum: int
    tolerance: int
    window: int = 0
    expected: int | None = None  # where the next sequential read should start
    frontier: int = 0  # prefetch has been issued up to this byte offset
    consumed: int = 0  # bytes read in the current sequential stretch
    stretch: int = 0  # counts the sequential stretches: a read that is not sequential starts the next

    def advise(self, offset: int, size: int) -> int:
        """Record a read; return the offset up to which data should be fetched ahead (0: none)."""
        end = offset + size
        expected = self.expected
        ahead = max(self.tolerance, self.window)  # a skip into what is already being fetched is fine
        if expected is not None and expected - self.tolerance <= offset <= expected + ahead:
            self.consumed += max(0, end - expected)
            self.window = min(self.maximum, max(self.initial, self.consumed // 2))
            self.expected = max(expected, end)
            return self.expected + self.window
        self.window, self.expected, self.frontier, self.consumed = 0, end, end, size
        self.stretch += 1
        return 0


def ahead(readahead: Readahead, offset: int, end: int, file_size: int) -> tuple[int, int] | None:
    """Record a read of ``offset .. end``; the byte range to prefetch now, if any.

    Ahead in pieces of at least half the window (or up to the end of the file): few large
    requests, not one per read. The range counts as issued (``frontier``) once returned.
    """
    target = min(readahead.advise(offset, end - offset), file_size)
    start = max(readahead.frontier, end)
    if target <= start or (target - start < readahead.window // 2 and target < file_size):
        return None
    readahead.frontier = target
    return start, target
