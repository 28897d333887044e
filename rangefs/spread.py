"""How many concurrent ranges a sequential reader's prefetch is cut into, for one cached file.

Pure logic with no I/O; imports nothing from rangefs; times are passed in. One ``Spread`` per
cached file, owned by its ``Flights`` and used on the trio thread only:

- ``Flights.progress`` (from ``Filler._mark_written``, on the trio thread, for every run the
  daemon or the helper reports written) feeds ``sample`` with the rate of one prefetch flight so
  far: its blocks since its first report over the time since then, so the rate of one connection.
- ``Flights.wait_for`` sets ``starved`` when a read waits for a block a prefetch is bringing:
  the prefetch delivers less than the reader consumes.
- ``Flights.claim_ahead`` asks ``plan`` how many pieces to cut the next window step into.

The policy, like a congestion window probing for capacity: it starts at one piece (one range per
window step, as for an unthrottled server, where one connection is fastest). When the reader
starved, it tries twice as many pieces; the try is kept if the total rate (pieces times the rate
per connection) rose by ``_GAIN``, as it does for a server that caps each connection, and then
the next doubling may be tried; otherwise it goes back and waits a number of window steps before
trying again, twice as many after each failed try, so a server where more connections do not
help (loopback, a shared bottleneck) pays for a few tries per file only. The number of requests
that really run at once is bounded per origin by ``--max-connections`` (rangefs.limits.Slots);
``most`` is that bound.

Only a connection slower than ``slow_below`` is worth a try: a faster one is not what limits the
reader (the FUSE path and the CPU are), and there more connections only compete with the reader
for the CPU (docs/experiments.md, 'Parallel ranges on an unthrottled server').
"""

from __future__ import annotations

import math

_GAIN = 1.4  # doubling the pieces must raise the total rate this much to be kept (ideal: 2)
_SMOOTHING = 0.3  # weight of a new sample in the per-connection rate of its number of pieces
_MIN_SAMPLE_SECONDS = 0.05  # a flight's rate is sampled once its reports span this long


class Spread:
    """The number of pieces for one file's prefetches, and the rates that chose it."""

    def __init__(self, most: int, slow_below: float = math.inf) -> None:
        """``most``: the most pieces; ``slow_below``: more pieces are tried only while one
        connection brings less than this many blocks per second."""
        self.most = max(1, most)
        self.slow_below = slow_below
        self.pieces = 1
        self.starved = False  # a read waited for a prefetched block since the last plan
        self.rate: dict[int, float] = {}  # pieces -> smoothed blocks/s of one flight claimed with that many
        self._trying_from: int | None = None  # the pieces before the doubling being tried
        self._hold = 0  # window steps to wait before the next try
        self._backoff = 1  # the hold after the next failed try

    def sample(self, pieces: int, delivered: int, seconds: float) -> None:
        """A flight claimed with ``pieces`` pieces delivered ``delivered`` blocks in ``seconds``
        since its first report."""
        if seconds < _MIN_SAMPLE_SECONDS or delivered <= 0:
            return
        rate = delivered / seconds
        old = self.rate.get(pieces)
        self.rate[pieces] = rate if old is None else old + _SMOOTHING * (rate - old)

    def slow(self) -> bool:
        """Whether one connection brings less than ``slow_below``, as last measured."""
        return self.rate.get(self.pieces, math.inf) < self.slow_below

    def plan(self) -> int:
        """The pieces to cut the next window step into; judges a try once it has been measured."""
        pieces, before = self.pieces, self._trying_from
        if before is not None:
            if pieces in self.rate and before in self.rate:
                self._trying_from = None
                if pieces * self.rate[pieces] >= _GAIN * before * self.rate[before]:
                    self._backoff = 1  # more connections brought more blocks: keep them
                else:
                    self.pieces, self._hold = before, self._backoff
                    self._backoff *= 2
        elif self._hold > 0:
            self._hold -= 1
        elif self.starved and pieces < self.most and self.slow():
            self._trying_from = pieces
            self.pieces = min(self.most, 2 * pieces)
            self.rate.pop(self.pieces, None)  # measured afresh: conditions change
        self.starved = False
        return self.pieces
