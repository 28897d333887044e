"""Unit tests of the single-flight table (rangefs.flights) and the prefetch decision (rangefs.prefetch)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from rangefs.bitmap import Bitmap
from rangefs.errors import RangefsError
from rangefs.fetcher import BlockRun
from rangefs.flights import Abandoned, Flight, Flights
from rangefs.prefetch import Readahead, ahead


class _Host:
    """A task group for the flights' background fetches, or none (``nursery`` None)."""

    def __init__(self, nursery: trio.Nursery | None) -> None:
        self.nursery = nursery

    @property
    def hosting(self) -> bool:
        return self.nursery is not None

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> bool:
        if self.nursery is None:
            return False
        self.nursery.start_soon(fn, *args)
        return True


def _table(nursery: trio.Nursery | None, fetched: list[Flight], error: BaseException | None = None) -> Flights:
    async def fetch(flight: Flight) -> None:
        fetched.append(flight)
        with flight.scope:
            await trio.sleep(0.01)
        for block in flight.blocks:
            flight.delivered(block)
        flights.finish(flight, error)

    flights = Flights(_Host(nursery), fetch, max_blocks=4)
    return flights


def test_claims_coalesce_into_runs_and_each_block_has_one_flight() -> None:
    flights = _table(None, [])
    claimed = flights.claim([5, 0, 1, 2, 3, 4, 9], generation=0)
    assert [(f.run.first, f.run.stop) for f in claimed] == [(0, 4), (4, 6), (9, 10)]
    assert flights.flight_of(1) is claimed[0] and flights.flight_of(5) is claimed[1]
    assert 9 in flights and 7 not in flights and flights.flight_of(7) is None


def test_a_finished_flight_leaves_the_table_and_wakes_its_waiters() -> None:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            fetched: list[Flight] = []
            flights = _table(nursery, fetched)
            present = Bitmap(8)
            (flight,) = flights.claim([2, 3], generation=0)
            await flights.fetch_all([flight])
            assert fetched == [flight] and flight.error is None
            assert 2 not in flights and flight.reads == 0
            for block in (2, 3):
                present.add(block)
            await flights.wait_for({flight}, [2, 3], lambda: present)  # ended: returns at once

    trio.run(run)


def test_a_flight_nobody_wants_is_cancelled_and_one_still_wanted_is_not() -> None:
    async def run() -> None:
        flights = _table(None, [])
        (flight,) = flights.claim([0], generation=0)
        flight.reads, flight.prefetchers = 1, {7}
        flights.forget_prefetcher(7)
        assert not flight.scope.cancel_called  # a read still waits for it
        flight.reads = 0
        flights.unwanted(flight)
        assert flight.scope.cancel_called

    trio.run(run)


def test_a_stream_is_never_unwanted() -> None:
    async def run() -> None:
        flights = _table(None, [])
        stream = Flight(BlockRun(0, 4), 0, stream=True)
        flights.unwanted(stream)
        assert not stream.scope.cancel_called

    trio.run(run)


def test_prefetch_without_a_task_group_abandons_its_claims() -> None:
    flights = _table(None, [])
    flights.claim_ahead(0, 3, Bitmap(8), prefetcher=1, generation=0)
    assert all(flights.flight_of(b) is None for b in range(3))


def test_prefetch_joins_fetches_under_way_and_claims_only_the_missing_rest() -> None:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            flights = _table(nursery, [])
            present = Bitmap(16)
            present.add(5)
            (mine,) = flights.claim([0, 1], generation=0)
            flights.claim_ahead(0, 8, present, prefetcher=42, generation=0)
            assert 42 in mine.prefetchers
            ahead_flights = {flights.flight_of(b) for b in (2, 3, 4, 6, 7)}
            assert None not in ahead_flights and mine not in ahead_flights
            assert flights.flight_of(5) is None  # present: not fetched again
            nursery.start_soon(flights._fetch, mine)  # a claim is always run by its claimer
            await flights.stop()
            assert all(flights.flight_of(b) is None for b in range(8))

    trio.run(run)


def test_stop_cancels_every_fetch_and_waits_until_none_runs() -> None:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            ended: list[BaseException | None] = []
            flights = Flights(_Host(nursery), lambda flight: _forever(flights, flight, ended), max_blocks=4)
            for flight in flights.claim([0, 5, 9], generation=0):
                nursery.start_soon(flights._fetch, flight)
            await trio.sleep(0.01)
            await flights.stop()
            assert len(ended) == 3 and all(isinstance(e, Abandoned) for e in ended)

    trio.run(run)


async def _forever(flights: Flights, flight: Flight, ended: list[BaseException | None]) -> None:
    error: BaseException | None = Abandoned("stopped")
    try:
        with flight.scope:
            await trio.sleep_forever()
    finally:
        ended.append(error)
        flights.finish(flight, error)


def test_a_waiter_gets_the_error_of_the_flight_it_waited_for() -> None:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            flights = _table(nursery, [], error=RangefsError("gone"))
            (flight,) = flights.claim([1], generation=0)
            nursery.start_soon(flights._fetch, flight)
            try:
                await flights.wait_for({flight}, [1], lambda: Bitmap(4))
            except RangefsError as exc:
                assert str(exc) == "gone"
            else:
                raise AssertionError("no error")

    trio.run(run)


def test_prefetch_goes_ahead_in_pieces_of_half_the_window() -> None:
    ra = Readahead(initial=100, maximum=400, tolerance=50)
    assert ahead(ra, 0, 10, 10_000) is None  # one read says nothing yet
    assert ahead(ra, 10, 20, 10_000) == (20, 120)
    assert ra.frontier == 120
    assert ahead(ra, 20, 30, 10_000) is None  # 10 more bytes than issued: less than half the window
    assert ahead(ra, 30, 80, 10_000) == (120, 180)  # half the window past what was issued


def test_prefetch_takes_the_small_rest_up_to_the_end_of_the_file() -> None:
    ra = Readahead(initial=100, maximum=400, tolerance=50)
    ahead(ra, 0, 10, 125)
    assert ahead(ra, 10, 20, 125) == (20, 120)
    assert ahead(ra, 20, 30, 125) == (120, 125)  # short of half the window, but the end
