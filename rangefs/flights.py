"""The single-flight table of one cached file: which fetch brings which block, and who wants it.

Imports rangefs.bitmap, errors and fetcher (``BlockRun``, ``plan_runs``); never the cache
modules, pyfuse3 or the origin. Everything here runs on the trio thread; no field is touched by
a worker thread. The rules it keeps:

- Between testing a block and claiming it there is no ``await``: ``claim`` and
  ``claim_ahead`` take the blocks their caller found missing in the same step, so two readers
  that need the same block start one fetch, and the second waits on the first one's flight.
- A fetch runs while someone wants it: a read waiting for it (``Flight.reads``), or an open
  handle prefetching it (``Flight.prefetchers``; a handle that closes or jumps far away goes,
  ``forget_prefetcher``). The last one to go cancels it (``unwanted``);
  a stream serves every reader and runs until the file's last user goes.
- Every fetch is counted from its claim until it ends (``_scopes``), so ``stop`` can cancel
  them all and wait until none runs: no fetch outlives the descriptor it writes to.

A prefetch's window step is cut into as many pieces as the file's ``Spread`` (rangefs.spread)
says, each its own flight and Range request, run concurrently within the origin's bound
(rangefs.limits.Slots); ``progress`` (every run reported written) and ``wait_for`` (a read
waiting for a prefetch) tell the Spread how fast one connection is and whether the reader starved.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from rangefs.bitmap import Bitmap
from rangefs.errors import FetchInterrupted, RangesIgnored
from rangefs.fetcher import BlockRun, plan_runs
from rangefs.spread import Spread

# A read's own fetch this long or longer tells the connection's rate (shorter ones, round trips).
_TIMED_BLOCKS = 4
# Such a fetch counts as slow below a quarter of the spread's threshold: its round trip weighs more
# than a prefetch's, and on a busy loopback a short fetch looks slow.
_OWN_SLOWER = 4


class Abandoned(FetchInterrupted):
    """The reader that was fetching a block went away; whoever needs it fetches it again."""


class Absent:
    """The blocks a stream brings: those neither present nor fetched by another flight when it
    started. Tested, never listed: a stream covers the file's size as claimed, whatever that is."""

    def __init__(self, nblocks: int, present: Bitmap, others: frozenset[int]) -> None:
        self._nblocks, self._present, self._others = nblocks, present, others

    def __contains__(self, block: int) -> bool:
        return 0 <= block < self._nblocks and block not in self._present and block not in self._others


class Flight:
    """One fetch of a block run in progress; waiters are woken per block.

    A waiter's Event is made when someone waits for a block, not for every block: a sequential
    read fetches far more blocks than it waits for, and an Event per block showed in the daemon's
    profile (docs/experiments.md, 'Block events only for waiters').
    """

    def __init__(self, run: BlockRun, generation: int, blocks: list[int] | None = None, stream: bool = False) -> None:
        """``generation``: the file version it fetches; ``blocks``: the ones it delivers, when not
        all of the run; ``stream``: the whole file from a plain GET (a server that ignores Range)."""
        self.run = run
        self.generation = generation
        self.stream = stream
        self.blocks: range | set[int] | Absent = range(run.first, run.stop) if blocks is None else set(blocks)
        self.error: BaseException | None = None
        self.scope = trio.CancelScope()
        # Who wants it: the reads waiting for it, and the open handles that prefetch it (the id of
        # their Readahead, removed when they close). A fetch nobody wants is cancelled (unwanted).
        self.reads = 0
        self.prefetchers: set[int] = set()
        # A prefetch's measure for the Spread: the pieces its window step was cut into (0: not a
        # prefetch), when its first blocks were reported, and the blocks reported since.
        self.pieces = 0
        self.first_report: float | None = None
        self.reported = 0
        self._waiters: dict[int, trio.Event] = {}  # blocks someone waits for, until delivered
        self._ended = trio.Event()

    async def arrival(self, block: int) -> None:
        """Return once ``block`` is delivered or the flight has ended (the caller tells which)."""
        if self._ended.is_set():
            await trio.lowlevel.checkpoint()
            return
        event = self._waiters.get(block)
        if event is None:
            event = self._waiters[block] = trio.Event()
        await event.wait()

    async def end(self) -> None:
        """Return once the flight has ended."""
        await self._ended.wait()

    def delivered(self, block: int) -> None:
        event = self._waiters.pop(block, None)
        if event is not None:
            event.set()

    def finish(self, error: BaseException | None) -> None:
        """Wake everyone still waiting; blocks not delivered carry ``error``."""
        self.error = error
        self._ended.set()
        waiters, self._waiters = self._waiters, {}
        for event in waiters.values():
            event.set()


class Host(Protocol):
    """Where background fetches run (the Cache's task group)."""

    @property
    def hosting(self) -> bool: ...

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> bool: ...


class Flights:
    """The fetches in progress for one cached file, by block, and the waiting for them.

    ``fetch(flight)`` runs one flight to its end and then calls ``finish``; it never raises
    but Cancelled. Fields, all written on the trio thread only:
    ``_inflight`` (block -> its ranged flight), ``stream`` (the whole-file stream, for a server
    that ignores Range), ``_scopes`` (every flight from its claim to its end) and ``_none_running``
    (set, then replaced, whenever ``_scopes`` empties).
    """

    def __init__(
        self, host: Host, fetch: Callable[[Flight], Awaitable[None]], max_blocks: int,
        connections: int = 1, min_piece_blocks: int = 1, spread_below: float = math.inf,
    ) -> None:
        """``max_blocks``: the most blocks one ranged fetch asks for; ``connections``: the most
        pieces a prefetch is cut into, each at least ``min_piece_blocks`` long, tried only while one
        connection brings fewer than ``spread_below`` blocks per second."""
        self._host = host
        self._fetch = fetch
        self._max_blocks = max_blocks
        self._min_piece_blocks = max(1, min_piece_blocks)
        self.spread = Spread(connections, spread_below)
        self.starved_at = -math.inf  # trio time a read last waited for a block a prefetch brings
        self._inflight: dict[int, Flight] = {}
        self.stream: Flight | None = None
        self._scopes: set[trio.CancelScope] = set()
        self._none_running = trio.Event()

    @property
    def busy(self) -> bool:
        """Whether any fetch runs (or is claimed and about to)."""
        return bool(self._scopes)

    def __contains__(self, block: int) -> bool:
        """Whether a ranged fetch brings ``block``."""
        return block in self._inflight

    def flight_of(self, block: int) -> Flight | None:
        """The fetch that brings ``block``: a ranged one, or the stream."""
        flight = self._inflight.get(block)
        if flight is None and self.stream is not None and block in self.stream.blocks:
            return self.stream
        return flight

    def claim(self, blocks: list[int], generation: int, max_blocks: int | None = None) -> list[Flight]:
        """Flights for ``blocks`` (none of them brought by a fetch yet), in runs of at most
        ``max_blocks`` (by default the longest request)."""
        flights = [Flight(run, generation) for run in plan_runs(blocks, max_blocks or self._max_blocks)]
        for flight in flights:
            self._scopes.add(flight.scope)  # from the claim on, so stop waits for it
            for block in range(flight.run.first, flight.run.stop):
                self._inflight[block] = flight
        return flights

    def claim_ahead(self, first: int, stop: int, bitmap: Bitmap, prefetcher: int, generation: int) -> list[Flight]:
        """Prefetch blocks ``first .. stop`` for the handle ``prefetcher`` in the background: the
        missing ones not brought yet are claimed and started (returned); fetches under way for the
        others are wanted by this handle too."""
        blocks = [b for b in range(first, stop) if b not in bitmap and b not in self._inflight]
        for block in range(first, stop):
            if block in self._inflight:
                self._inflight[block].prefetchers.add(prefetcher)
        pieces = self.spread.plan()
        # Cut for several connections: pieces of the smallest size, as many as the step holds (the
        # origin's slots bound how many run at once), so a server that caps each request (nginx's
        # limit_rate lets a request's first second go at full speed) sees short ones.
        piece = self._min_piece_blocks
        if pieces == 1:
            piece = min(self._max_blocks, max(piece, len(blocks)))
        started = self.claim(blocks, generation, piece)
        for flight in started:
            flight.pieces = pieces
            flight.prefetchers.add(prefetcher)
            if not self._host.spawn(self._fetch, flight):
                self._scopes.discard(flight.scope)
                self.forget(flight)
                flight.finish(Abandoned("no task group for prefetching"))
        return started

    async def start_stream(self, nblocks: int, present: Bitmap, generation: int) -> Flight:
        """Start the stream of the whole file, bringing the blocks not in ``present`` (a copy)
        that no ranged fetch brings; in the background when possible, else before returning."""
        running = self.stream = Flight(BlockRun(0, nblocks), generation, stream=True)
        running.blocks = Absent(nblocks, present, frozenset(self._inflight))
        self._scopes.add(running.scope)
        if not self._host.spawn(self._fetch, running):
            await self._fetch(running)
        return running

    def progress(self, flight: Flight, blocks: int) -> None:
        """``flight`` reported ``blocks`` more blocks written: a prefetch samples its rate."""
        if not flight.pieces:
            return
        now = trio.current_time()
        if flight.first_report is None:
            flight.first_report = now  # from here on: the rate of the body, not of the round trip
            return
        flight.reported += blocks
        self.spread.sample(flight.pieces, flight.reported, now - flight.first_report)

    def forget(self, flight: Flight) -> None:
        """Take ``flight`` out of the table: its blocks are no longer being brought by it."""
        if isinstance(flight.blocks, Absent):  # a stream: never in _inflight
            if self.stream is flight:
                self.stream = None
            return
        for block in flight.blocks:
            if self._inflight.get(block) is flight:
                del self._inflight[block]

    def finish(self, flight: Flight, error: BaseException | None) -> None:
        """``flight`` ended (with ``error`` for the blocks it did not deliver): wake its waiters."""
        self.forget(flight)
        flight.finish(error)
        self._scopes.discard(flight.scope)
        if not self._scopes:
            self._none_running.set()
            self._none_running = trio.Event()

    def unwanted(self, flight: Flight) -> None:
        """Cancel ``flight`` if no read waits for it and no open handle prefetches it.

        Not a stream: it serves every reader of the file, and ends with the file's last user.
        """
        if not flight.reads and not flight.prefetchers and not flight.stream:
            flight.scope.cancel()

    def forget_prefetcher(self, prefetcher: int, keep: tuple[int, int] | None = None) -> None:
        """A handle closed, or jumped away from all but blocks ``keep`` (``first, stop``): the
        fetches only it prefetched (outside ``keep``) are cancelled."""
        for flight in {flight for flight in self._inflight.values() if prefetcher in flight.prefetchers
                       and (keep is None or not (flight.run.first < keep[1] and keep[0] < flight.run.stop))}:
            flight.prefetchers.discard(prefetcher)
            self.unwanted(flight)

    def abort(self) -> None:
        """Cancel every fetch in flight (their readers get an error)."""
        for scope in self._scopes:
            scope.cancel()

    async def stop(self) -> None:
        """Cancel every fetch and wait until none runs (so none can write any more)."""
        while self._scopes:
            self.abort()
            await self._none_running.wait()

    async def fetch_all(self, flights: list[Flight]) -> None:
        """Run ``flights`` for a read and wait until they end.

        In the background task group when there is one, so that a read that is cancelled (its
        reader went away) leaves running the fetches that others still want, and only those.
        """
        if not self._host.hosting:
            async with trio.open_nursery() as nursery:
                for flight in flights:
                    nursery.start_soon(self._fetch, flight)
            return
        for flight in flights:
            flight.reads += 1
            self._host.spawn(self._fetch, flight)
        try:
            for flight in flights:
                await flight.end()
        finally:
            for flight in flights:
                flight.reads -= 1
                self.unwanted(flight)

    def fetched_for_a_read(self, flights: list[Flight], seconds: float) -> None:
        """A read waited ``seconds`` for the fetches it made itself: a slow connection starves it too
        (a cold reader's first reads wait for their own fetches, before any prefetch runs)."""
        blocks = sum(flight.run.stop - flight.run.first for flight in flights if flight.error is None)
        if blocks >= _TIMED_BLOCKS and seconds > 0 and blocks / seconds < self.spread.slow_below / _OWN_SLOWER:
            self.starved_at = trio.current_time()

    async def wait_for(self, flights: set[Flight], blocks: list[int], bitmap: Callable[[], Bitmap]) -> None:
        """Wait for other readers' fetches of ``blocks``; re-raise their errors, not abandonment.

        ``bitmap()`` is looked up after every wait: a version switch replaces it. This read wants
        each of ``flights`` until it is done with all of them, so that a fetch only it still wants
        goes on between the blocks it waits for."""
        for flight in flights:
            flight.reads += 1
            if flight.prefetchers:
                self.spread.starved = True  # the prefetch delivers less than the reader consumes
                if self.spread.slow():
                    self.starved_at = trio.current_time()
        try:
            for flight in flights:
                for block in blocks:
                    if block in flight.blocks and block not in bitmap():
                        await flight.arrival(block)
                        if block not in bitmap() and not isinstance(
                            flight.error, (FetchInterrupted, RangesIgnored, type(None))
                        ):
                            raise flight.error
        finally:
            for flight in flights:
                flight.reads -= 1
                self.unwanted(flight)
