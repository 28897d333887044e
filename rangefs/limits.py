"""Bounds on requests to origins: how many run at once per origin, and how slow they may be.

``PerOrigin`` gives each origin its own share of requests: a ``trio.CapacityLimiter`` each for
probes (rangefs.origin), ``Slots`` each for range requests (rangefs.fetcher), where urgent
requests (a read waiting for a few blocks) go before queued prefetches when a slot frees.
``LowSpeed`` cuts one attempt that receives too few bytes per second; ``Pace`` holds the
attempts of one fetch to the same limit together. Imports trio only.
"""

from __future__ import annotations

import contextvars
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

_L = TypeVar("_L")
_MOVES_PER_WINDOW = 8  # see LowSpeed: an attempt is cut at most an eighth of a window early

# Set in a task that fetches for nobody waiting (``rangefs prefetch``): its requests, and those
# of the fetch tasks it starts (trio copies a task's context into the tasks it spawns), wait for
# a slot behind every other kind (see Slots).
BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("rangefs_background", default=False)


class PerOrigin(Generic[_L]):
    """One limit per origin, made on first use by ``make``: a slow host uses its own share of
    requests, never another host's. Trio only."""

    def __init__(self, make: Callable[[], _L]) -> None:
        self._make = make
        self._limits: dict[str, _L] = {}

    def of(self, origin: str) -> _L:
        """The limit of ``origin`` (``scheme://host:port``, see rangefs.origin.origin_of)."""
        limit = self._limits.get(origin)
        if limit is None:
            limit = self._limits[origin] = self._make()
        return limit


def background_share(total: int) -> int:
    """The slots of ``total`` that requests in a ``BACKGROUND`` context may hold at once."""
    return max(1, total - 1)


class Slots:
    """At most ``total`` holders at once; when one leaves, an urgent waiter goes before the others.

    The one bound on the range requests of one origin over the whole mount (``--max-connections``),
    whichever process runs them: the daemon's small fetches ask urgently, the helper's prefetch
    pieces (admitted by the daemon) do not. So a read waiting for a few blocks waits for at most one
    running request to end, never behind a queue of prefetches; and ``total == 1`` still works.
    Requests made in a ``BACKGROUND`` context (``rangefs prefetch``) queue behind both, and hold
    at most ``total - 1`` slots (all of them only when ``total == 1``): a prefetch takes large
    runs, and a read arriving while it runs must find a slot free, not wait for one of them to end.
    Trio only.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._urgent: deque[trio.Event] = deque()
        self._others: deque[trio.Event] = deque()
        self._background: deque[trio.Event] = deque()
        self._background_used = 0
        self._background_max = background_share(total)

    @asynccontextmanager
    async def hold(self, urgent: bool) -> AsyncIterator[None]:
        """Hold one slot for the body of the ``async with``."""
        background = BACKGROUND.get()
        # Background waiters while a slot is free are waiting for their share, not for the slot:
        # they do not hold up the others.
        if self.used < self.total and not self._urgent and not self._others and (
            not background or (not self._background and self._background_used < self._background_max)
        ):
            self.used += 1
            self._background_used += background
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                self._release(background)
                raise
        else:
            turn = trio.Event()
            queue = self._background if background else self._urgent if urgent else self._others
            queue.append(turn)
            try:
                await turn.wait()  # set by _release: the slot is handed over, ``used`` unchanged
            except BaseException:
                if turn.is_set():
                    self._release(background)  # handed to us as we were cancelled: pass it on
                else:
                    queue.remove(turn)
                raise
        try:
            yield
        finally:
            self._release(background)

    def _release(self, background: bool) -> None:
        self._background_used -= background
        for queue in (self._urgent, self._others):
            if queue:
                queue.popleft().set()
                return
        if self._background and self._background_used < self._background_max:
            self._background_used += 1
            self._background.popleft().set()
            return
        self.used -= 1


class LowSpeed:
    """Cuts an attempt that receives fewer than ``limit`` bytes/s over ``seconds``.

    The deadline of ``scope`` moves ``seconds`` ahead once a window's worth of bytes has arrived
    since it last moved, at most _MOVES_PER_WINDOW times per window: moving a trio deadline costs
    microseconds, so a fast body costs a clock read per chunk, no timer and no system call.
    """

    def __init__(self, limit: int, seconds: float) -> None:
        self.seconds = seconds
        self.quota = limit * seconds if limit > 0 and seconds > 0 else math.inf
        self.received = 0  # since the deadline last moved
        now = trio.current_time()
        self.next_move = now + seconds / _MOVES_PER_WINDOW
        self.scope = trio.CancelScope(deadline=now + seconds if self.quota < math.inf else math.inf)

    def feed(self, size: int) -> None:
        self.received += size
        if self.received >= self.quota:
            now = trio.current_time()
            if now >= self.next_move:
                self.received = 0
                self.next_move = now + self.seconds / _MOVES_PER_WINDOW
                self.scope.deadline = now + self.seconds

    def describe(self) -> str:
        return f"too slow: {self.received / self.seconds:.0f} B/s over {self.seconds:g} s"


class Pace:
    """The low-speed limit across the attempts of one fetch, so that a server that sends a few
    bytes and closes, again and again, sooner than an attempt is cut, still ends the read.

    A window opens at the start and after each verdict; it is judged only when an attempt fails
    after progress, so a fast body costs nothing here. Once it has brought ``limit * seconds``
    bytes the read is fine: a new window opens and the slow ones are forgiven. Once it has lasted
    ``seconds`` with fewer, it was slow: that failure counts against the retries, and each slow
    window keeps counting until a fine one (a retry after progress does not forgive it).
    """

    def __init__(self, limit: int, seconds: float, position: int) -> None:
        self.seconds = seconds
        self.quota = limit * seconds if limit > 0 and seconds > 0 else math.inf
        self.slow = 0  # slow windows since the last fine one
        self._open(position)

    def _open(self, position: int) -> None:
        self.opened = trio.current_time()
        self.start = position

    def cut(self, position: int) -> None:
        """An attempt that made progress was cut for its own low speed: a slow window."""
        self.slow += 1
        self._open(position)

    def judge(self, position: int) -> str | None:
        """After an attempt failed having made progress: why the failure counts, or None."""
        delivered = position - self.start
        if delivered >= self.quota:
            self.slow = 0
            self._open(position)
            return None
        elapsed = trio.current_time() - self.opened
        if self.quota == math.inf or elapsed < self.seconds:
            return None
        self.cut(position)
        return f"too slow: {delivered / elapsed:.0f} B/s over {elapsed:.1f} s of attempts that broke off"
