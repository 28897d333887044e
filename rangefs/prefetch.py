"""The readahead policy: how far ahead of a sequential reader to fetch, and when to fetch more.

Pure logic with no I/O; imports nothing from rangefs. One ``Readahead`` per open handle, used
on the trio thread only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# The reader's rate is measured over about this many seconds of its stretch: long enough to
# smooth the kernel's readahead bursts, short enough to follow a player that slows down.
RATE_INTERVAL = 2.0
# A stretch younger than this is not timed: its first reads arrive in a burst (the kernel's first
# readahead, a decoder filling its buffers), whose rate means nothing; the bytes rule bounds it.
RATE_SETTLE = 0.25
# How far ahead, in seconds of the reader's own rate, the window reaches (see Readahead).
HORIZON = 1.0


@dataclass
class Readahead:
    """Sequential-access detection for one open handle: how far ahead of a read to prefetch.

    Like mountpoint-s3's prefetcher: a read that starts near where the previous one ended is
    sequential (reads the kernel sends out of order, up to ``tolerance`` apart, still count, and
    so does a forward skip into the window being fetched). Any other read starts a new stretch
    with no window, so random access fetches only the blocks it touches.

    The window follows what the reader proves it wants, by two bounds, from ``initial`` up to
    ``maximum``:

    - bytes: half of what it consumed in this stretch, so a short read after a seek fetches
      little (docs/experiments.md, 'Readahead window');
    - time: ``horizon`` seconds of its consumption rate over the last ``RATE_INTERVAL`` seconds.
      "Consumed" includes the kernel's own readahead, which runs ahead of the reader; by bytes
      alone a media player that reads slowly but for long, or whose kernel readahead ran ahead,
      had its window grow to the maximum and fetched far ahead of what it then played before
      seeking elsewhere (docs/experiments.md, 'Readahead that follows the reader'). Over a
      couple of seconds the kernel's readahead moves at the reader's pace, so the rate is the
      reader's. A fast reader (``cp``, ``dd``) has a rate far above the maximum per second: the
      bytes bound alone governs it, as before, and it keeps its speed. A reader held back by the
      network consumes at the network's rate, so the window stays one horizon of what the link
      delivers: enough to keep it busy.

    A starving reader (``starved``: its file's reads waited lately for fetches over connections
    slower than the parallel-ranges threshold) gets a window of all it consumed, with neither the
    rate bound nor the lead: its rate is the network's, and a window of one second of it kept a
    short read of a server that caps each connection from ever cutting a step into the pieces
    that would add connections (docs/experiments.md, 'Readahead for a starving reader').

    ``clock`` is injectable for tests. ``claimed`` is kept by the cached file (block runs this
    handle's prefetches claimed and the reader has not passed yet: what a seek or a close
    abandons).
    """

    initial: int
    maximum: int
    tolerance: int
    horizon: float = HORIZON
    clock: Callable[[], float] = time.monotonic
    # How far the kernel's own readahead runs ahead of the reader (a handle read through the page
    # cache: the kernel asks for its next window as the reader enters the current one). The
    # window counts from the reader, so it reaches that much less past the kernel's reads.
    lead: int = 0
    window: int = 0
    reach: int = 0  # how far past the latest read the window reaches: less the lead, unless starved
    expected: int | None = None  # where the next sequential read should start
    frontier: int = 0  # prefetch has been issued up to this byte offset
    consumed: int = 0  # bytes read in the current sequential stretch
    stretch: int = 0  # counts the sequential stretches: a read that is not sequential starts the next
    # (time, consumed) at most every RATE_SETTLE seconds of this stretch; the first is the base of
    # the rate, the newest older than RATE_INTERVAL.
    _marks: deque[tuple[float, int]] = field(default_factory=deque, repr=False)
    _last: float = 0.0  # when the last read came
    _burst: bool = True  # the first mark is the stretch's start, before its first burst
    claimed: deque[tuple[int, int]] = field(default_factory=deque, repr=False)

    def advise(self, offset: int, size: int, starved: bool = False) -> int:
        """Record a read; return the offset up to which data should be fetched ahead (0: none).

        ``starved``: reads of the file waited for its prefetches lately; the reader consumes what
        the network brings, as fast as it comes (see the class docstring)."""
        end = offset + size
        expected = self.expected
        now = self.clock()
        ahead = max(self.tolerance, self.window)  # a skip into what is already being fetched is fine
        if expected is not None and expected - self.tolerance <= offset <= expected + ahead:
            if now - self._marks[-1][0] > RATE_INTERVAL and now - self._last > RATE_INTERVAL:
                self._marks = deque([(now, self.consumed)])  # after a pause, what it read before says nothing
            self._last = now
            self.consumed += max(0, end - expected)
            by_rate = int(self.rate(now) * self.horizon)
            if starved:
                self.window = self.reach = min(self.maximum, max(self.initial, self.consumed))
            else:
                self.window = min(self.maximum, max(self.initial, min(self.consumed // 2, by_rate)))
                self.reach = max(0, self.window - self.lead)
            self.expected = max(expected, end)
            return self.expected + self.reach
        self.window, self.reach, self.expected, self.frontier, self.consumed = 0, 0, end, end, size
        self._marks, self._last, self._burst = deque([(now, 0)]), now, True
        self.stretch += 1
        return 0

    def rate(self, now: float) -> float:
        """The stretch's consumption in bytes per second over about the last RATE_INTERVAL seconds
        (over RATE_SETTLE at least: a young stretch's burst counts as spread over that)."""
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= now - RATE_INTERVAL:
            marks.popleft()
        if now - marks[-1][0] >= RATE_SETTLE:
            marks.append((now, self.consumed))
            if self._burst and len(marks) == 3:
                # Once a settled span is timed, the stretch's first burst leaves the rate: spread
                # over a short stretch, it made a player's rate (and window) look twice its own.
                marks.popleft()
                self._burst = False
        since, base = marks[0]
        return (self.consumed - base) / min(max(now - since, RATE_SETTLE), RATE_INTERVAL)


def ahead(readahead: Readahead, offset: int, end: int, file_size: int, starved: bool = False) -> tuple[int, int] | None:
    """Record a read of ``offset .. end``; the byte range to prefetch now, if any (``starved``:
    see ``Readahead.advise``).

    Ahead in pieces of at least half the window (or up to the end of the file): few large
    requests, not one per read. The range counts as issued (``frontier``) once returned.
    """
    target = min(readahead.advise(offset, end - offset, starved), file_size)
    start = max(readahead.frontier, end)
    if target <= start or (target - start < readahead.reach // 2 and target < file_size):
        return None
    readahead.frontier = target
    return start, target
