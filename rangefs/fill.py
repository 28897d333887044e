"""Filling one cached file's data file: bring its missing blocks in, each by one fetch.

Imports rangefs.flights, fetcher, bitmap and errors; sees its cached file (rangefs.cachedfile)
to reach the flights table, the data file, the journal and the version. Runs on the trio thread;
the fetcher writes into the data file from its own threads or process, and tells each whole run
to ``_mark_written`` back on the trio thread. The rules it keeps:

- Between testing a block (``ensure``) and claiming it (``Flights.claim``) there is no
  ``await``: two readers that need the same block start one fetch.
- The bitmap is looked up again on every pass and after every wait: a version switch
  replaces it. A fetch of a version that is gone claims nothing.
- A block's bit is set only after the fetcher wrote it to the data file, and its sum is kept
  before its bit is set (so a save that records the bit has the sum to write first).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import trio

from rangefs.bitmap import Bitmap
from rangefs.errors import (
    CacheError,
    FetchInterrupted,
    RangefsError,
    RangesIgnored,
    RemoteChanged,
    classify_fetch_error,
)
from rangefs.fetcher import WrittenSink
from rangefs.flights import Abandoned, Flight

if TYPE_CHECKING:
    from rangefs.cachedfile import CachedFile

log = logging.getLogger(__name__)

_MAX_INTERRUPTIONS = 3  # a read fetches again after an interrupted fetch at most this often


class Filler:
    """Brings the blocks a read needs into the data file, and runs each fetch (``fetch``)."""

    def __init__(self, file: CachedFile) -> None:
        self._file = file

    async def ensure(self, first: int, stop: int, generation: int | None = None) -> None:
        """Return once blocks ``first <= b < stop`` are all present, fetching what is missing.

        Raises:
            RemoteChanged: the version is no longer ``generation``.
            RangefsError: a fetch this read needed failed.
        """
        file = self._file
        flights, interruptions = file.flights, 0
        while True:
            if file.switching is not None:
                await file.switching.wait()
            if generation is not None:
                file.check_version(generation)
            # Looked up on every pass: a version switch replaces the bitmap while we wait.
            bitmap = file.open_bitmap()
            missing = [b for b in range(first, stop) if b not in bitmap]
            if not missing:
                return
            if file.cache.closing:
                raise CacheError(f"{file.identity.url}: unmounting")
            if not file.remote.accept_ranges:
                await self._stream_for(missing)
                continue
            bringing = {b: flights.flight_of(b) for b in missing}
            waits = {flight for flight in bringing.values() if flight is not None}
            todo = [b for b in missing if bringing[b] is None]
            mine = flights.claim(todo + self._last_block_after(todo[-1], bitmap) if todo else [], file.generation)
            await flights.fetch_all(mine)
            for flight in mine:
                if isinstance(flight.error, FetchInterrupted) and interruptions < _MAX_INTERRUPTIONS:
                    interruptions += 1
                    break  # the next pass sees the new version, or fetches again
                if isinstance(flight.error, RangesIgnored):
                    break  # the next pass streams
                if flight.error is not None:
                    raise flight.error
            else:
                await flights.wait_for(waits, missing, file.open_bitmap)

    async def _stream_for(self, missing: list[int]) -> None:
        """Wait for ``missing`` from the file's stream, starting one if none runs (in the background:
        it serves every reader of the file, and outlives this one)."""
        file = self._file
        flights = file.flights
        running = flights.stream
        if running is not None and any(flights.flight_of(b) is None for b in missing):
            # Present when that stream started and discarded since (a failed check): it will not
            # bring them. Wait for it to end; the next pass starts a stream that will.
            await running.end()
            await trio.lowlevel.checkpoint()
            return
        if running is None:
            await flights.start_stream(file.identity.nblocks, file.open_bitmap().copy(), file.generation)
        await flights.wait_for({flight for b in missing if (flight := flights.flight_of(b)) is not None}, missing,
                               file.open_bitmap)

    def _last_block_after(self, block: int, bitmap: Bitmap) -> list[int]:
        """The file's last block, if it is the one right after ``block`` and missing: a reader that
        got this close to the end nearly always reads on to it (a media prober reading an index at
        the end of a file asks for both in two reads; fetched together they cost one round trip)."""
        last = self._file.identity.nblocks - 1
        return [last] if block == last - 1 and last not in bitmap and last not in self._file.flights else []

    async def fetch(self, flight: Flight) -> None:
        """Fetch a claimed run; never raises (errors go to the flight's waiters), but Cancelled."""
        file = self._file
        error: BaseException | None = Abandoned("fetch abandoned")
        try:
            with flight.scope:
                if flight.stream:
                    bitmap = file.open_bitmap()
                    await file.cache.fetcher.stream_into(
                        file.remote, file.data.fd, bitmap.__contains__, self._mark_written(flight)
                    )
                else:
                    await file.data.reserve_sums(flight.run)
                    await file.cache.fetcher.fetch_into(
                        file.remote, flight.run, file.data.fd, self._mark_written(flight)
                    )
                error = file.last_error = None
        except RangesIgnored as exc:
            error = exc
            self._ranges_ignored()
        except Exception as exc:  # a bug must fail this read, not stop the mount from a background task
            error = classify_fetch_error(file.identity.url, exc, log)  # logs a bug with its traceback
            if isinstance(exc, (RangefsError, OSError)):
                self._log_failure(error)
            if isinstance(error, RemoteChanged):
                file.changed()
        finally:
            file.flights.finish(flight, error)

    def _mark_written(self, flight: Flight) -> WrittenSink:
        file = self._file

        async def mark(first: int, stop: int, sums: list[int]) -> None:
            if flight.generation != file.generation:
                return  # a fetch of a version that is gone (it is being cancelled): claim nothing
            bitmap = file.open_bitmap()
            file.data.sums.set_run(first, sums)
            verified = file.verifier.verified
            for block in range(first, stop):
                bitmap.add(block)
                if verified is not None:
                    verified.add(block)
                flight.delivered(block)  # a stream also passes blocks it did not rewrite: no-op
            file.flights.progress(flight, stop - first)
            file.journal.written(stop - first)
            file.cache.evictor.wrote(file, first, stop)

        return mark

    def _ranges_ignored(self) -> None:
        """The server sent the whole file to a ranged GET: from now on stream it instead."""
        file = self._file
        if file.remote.accept_ranges:
            log.warning("%s: the server ignores Range requests; streaming the file from its start into "
                        "the cache (reads far into it wait for the stream)", file.identity.url)
            file.remote = dataclasses.replace(file.remote, accept_ranges=False)

    def _log_failure(self, exc: RangefsError) -> None:
        url, message = self._file.identity.url, str(exc)
        self._file.last_error = message if message.startswith(url) else f"{url}: {message}"
        log.warning("%s", self._file.last_error)
