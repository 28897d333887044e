"""The cache of one remote file: open and close it, read from it, and switch it to a new version.

Imports rangefs.flights, datafile, journal, verifier, prefetch, fetcher, origin, state, bitmap,
kernel and errors; sees rangefs.cache (its registry) only for typing; never pyfuse3. One trio
thread; blocking disk I/O goes to worker threads (rangefs.datafile). Its parts:
``flights`` (the single-flight table, rangefs.flights), ``data`` (the files on disk,
rangefs.datafile), ``journal`` (saves and checkpoints, rangefs.journal), ``verifier`` (checks
against sums, rangefs.verifier).

Concurrency rules (each part's module states its own):

- ``_lock`` serializes users arriving and leaving (acquire, release, close) and version
  switches. Lock order: ``_lock``, then the journal's ``checkpoint_lock``, then its
  ``_save_lock``; whoever opens, replaces or closes the files holds both journal locks.
- Between testing a block and claiming it there is no ``await`` (``ensure``, ``_read_ahead``):
  two readers that need the same block start one fetch.
- No fetch outlives the descriptor it writes to: a version switch and the last close stop every
  fetch (``flights.stop``) before they touch the files.
- A version switch replaces ``bitmap``: code that waits looks it up again (``open_bitmap``) on
  every pass, and every read checks the version after its last ``await``.
- Fields written off the trio thread, all while both journal locks are held, by the worker
  threads of ``_open_files``, ``_reset``, ``_grow`` and ``_close_files``: ``bitmap``,
  ``_grown_from``, and the parts' fields named in their modules (``data.fd``, ``data.sums``,
  ``journal.persisted``, ``journal.dirty``/``unsaved``, ``verifier.verified``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from rangefs import kernel, prefetch, state
from rangefs.bitmap import Bitmap
from rangefs.datafile import DataFile, cache_key
from rangefs.errors import (
    CacheError,
    CacheUnwritable,
    FetchInterrupted,
    RangefsError,
    RangesIgnored,
    RemoteChanged,
)
from rangefs.fetcher import WrittenSink
from rangefs.flights import Abandoned, Flight, Flights
from rangefs.journal import Journal
from rangefs.origin import RemoteFile
from rangefs.prefetch import Readahead
from rangefs.redact import redact_url
from rangefs.verifier import Verifier

if TYPE_CHECKING:
    from pathlib import Path

    from rangefs.cache import Cache

log = logging.getLogger(__name__)

# ``(fd, offset, size)``: bytes of a data file, for pyfuse3 to reply with. libfuse then splices
# them from the page cache into the reply (FUSE_CAP_SPLICE_WRITE): the kernel copies each byte
# once, from the cache file's pages into the FUSE file's, where a reply of bytes costs a
# zero-filled buffer, a copy into it and a copy out of it (measured: docs/experiments.md,
# 'Splice replies'). Valid only until the next await: a version switch or the last close may
# close ``fd``. Only ranges found in the page cache are answered this way, since libfuse reads
# them on the FUSE thread.
FileSlice = tuple[int, int, int]
_PAGE_CACHE = kernel.PageCacheProbe()  # used on the trio thread only

_MAX_INTERRUPTIONS = 3  # a read fetches again after an interrupted fetch at most this often
_UNWRITABLE_RETRY = 30.0  # seconds between attempts to write into a cache that failed a write
_MAX_CLOSE_ROUNDS = 3  # flushes a last close makes outside the file's lock before it closes (see release)


class CachedFile:
    """The cache of one remote file. Opened lazily, closed when its last user is done."""

    def __init__(self, cache: Cache, url: str, remote: RemoteFile, growing: bool = False) -> None:
        """``growing``: the file may grow by appends; a bigger new version keeps the cached prefix
        once its last cached block is fetched again and found unchanged."""
        self.cache = cache
        self.growing = growing
        self._grown_from: tuple[state.Identity, Bitmap] | None = None  # set by _load_bitmap, for acquire
        self._switching: trio.Event | None = None  # set while revalidate moves to a new version
        self.url = url  # as listed, credentials included: re-probed to revalidate; never logged
        self.key = cache_key(url)
        self._set_version(remote)
        # Bumped when the remote changed and the cache moved to the new version: handles
        # opened before then must not read on (their version is gone).
        self.generation = 0
        self.stale = False  # a fetch was told the remote changed; the next open re-probes
        self._unwritable_until = 0.0  # until then, missing blocks are read past the cache
        self._warned_unwritable = False
        self._validated = time.monotonic()  # when the server last confirmed the version
        self.data = DataFile(cache.files_dir, self.key)
        self.journal = Journal(self)
        self.verifier = Verifier(self)
        self.flights = Flights(cache, self._fetch, cache.config.max_request_blocks)
        self.bitmap: Bitmap | None = None
        self._peeked = False
        self._users = 0
        self._lock = trio.Lock()
        # Handles the kernel serves from the data file itself (FUSE passthrough, counted by fs.py).
        # While there are any, the data file must not change: a new version waits until they close.
        self._passthrough_handles = 0

    def _set_version(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.identity = state.Identity(
            key=self.key,
            url=redact_url(self.url),
            size=remote.size,
            etag=remote.etag,
            last_modified=remote.last_modified,
            block_size=self.cache.config.block_size,
        )

    @property
    def passthrough_handles(self) -> int:
        """Open handles the kernel serves from the data file itself."""
        return self._passthrough_handles

    @passthrough_handles.setter
    def passthrough_handles(self, count: int) -> None:
        # Transitional: fs.py on this branch still counts by assignment; once it calls
        # passthrough_opened/passthrough_closed (the fs helper's branch), this setter goes.
        self._passthrough_handles = count

    def passthrough_opened(self) -> None:
        self._passthrough_handles += 1

    def passthrough_closed(self) -> None:
        self._passthrough_handles -= 1

    def passthrough_ready(self) -> bool:
        """Every block is cached, on disk (the state file claims it: a checkpoint flushed it) and
        was checked in this session, and the file may not grow: the kernel may read the data file
        itself, as it stands, for as long as a handle is open (a later failed flush would drop
        pages the kernel reads). Never without a validator: every revalidation of such a file
        looks like a change."""
        persisted, verified = self.journal.persisted, self.verifier.verified
        return (self.data.fd >= 0 and bool(self.remote.if_range) and not self.growing and not self.stale
                and self._switching is None and not self.journal.dirty
                and persisted is not None and persisted.complete()
                and self.bitmap is not None and self.bitmap.complete()
                and verified is not None and verified.complete())

    @property
    def block_size(self) -> int:
        return self.identity.block_size

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def data_path(self) -> Path:
        return self.data.path

    @property
    def state_path(self) -> Path:
        return self.data.state_path

    def cached_bytes(self) -> int:
        """Bytes present in the cache; for a file not opened yet, as its state file says."""
        if self.bitmap is None and not self._peeked:
            self._peeked = True
            self.bitmap = self.data.peek(self.identity) if self.remote.if_range else None
        return self._bytes_in(self.bitmap)

    def saved_bytes(self) -> int:
        """Bytes flushed and claimed by the state file: what a crash now would keep."""
        if self.journal.persisted is None:  # not opened in this session: as its state file says
            return self.cached_bytes()
        return self._bytes_in(self.journal.persisted)

    def _bytes_in(self, bitmap: Bitmap | None) -> int:
        if bitmap is None or self.identity.nblocks == 0:
            return 0
        last = self.identity.nblocks - 1
        tail_short = self.block_size * self.identity.nblocks - self.size
        return len(bitmap) * self.block_size - (tail_short if last in bitmap else 0)

    def open_bitmap(self) -> Bitmap:
        """The bitmap of the open files (replaced by a version switch: look it up again after an await).

        Raises:
            CacheError: the files are closed.
        """
        if self.bitmap is None or self.data.fd < 0:
            raise CacheError(f"{self.identity.url}: cache file used while closed")
        return self.bitmap

    # -- users: open, close ---------------------------------------------------------------

    async def acquire(self) -> None:
        """Open the cache files for one more user (the one that finds them closed loads or creates them)."""
        async with self._lock:
            if self.data.fd < 0:  # else open for other users, or still open while the last one's release flushes
                async with self.journal.files_locked():  # a checkpoint must not see a half-opened file
                    await trio.to_thread.run_sync(self._open_files)
                if self.journal.dirty:  # a state written without a flush: the next checkpoint flushes
                    self.cache.dirtied(self)
                if self._grown_from is not None:
                    old, self._grown_from = self._grown_from, None
                    try:
                        self.bitmap = await self._adopt(*old)
                    except BaseException:
                        await trio.to_thread.run_sync(self._close_files)
                        raise
            self._users += 1

    async def release(self, readahead: Readahead | None = None) -> None:
        """Drop one user; the last one stops prefetching, checkpoints and closes the files.

        ``readahead``: the user's prefetch state; its prefetches that no other user prefetches
        and no read waits for are cancelled.

        The checkpoint runs without the lock: after a large read its flush takes long, and the
        next open would wait for it. An open meanwhile joins the files as they are, and they
        stay open.
        """
        if readahead is not None and self.remote.accept_ranges:
            # (Streamed files have no prefetches, and a stream claims every block: a long walk.)
            self.flights.forget_prefetcher(id(readahead))
        async with self._lock:
            self._users -= 1
            if self._users:
                return
            await self.flights.stop()
        rounds = 0
        while True:
            await self.checkpoint()
            rounds += 1
            async with self._lock:
                if self._users or self.data.fd < 0:
                    return  # someone came meanwhile (and still uses the files, or closed them)
                # Close once nothing is left to flush, so that _shut's checkpoint holds no open up
                # (someone may have come, written and gone meanwhile), or after a few rounds.
                if rounds >= _MAX_CLOSE_ROUNDS or not (self.journal.dirty or self.journal.checkpoint_lock.locked()):
                    await self._shut()
                    return

    async def close(self) -> None:
        """Stop prefetching, checkpoint and close the files whatever the number of users (at unmount)."""
        async with self._lock:
            if self.data.fd >= 0:
                await self._shut()
            self._users = 0

    async def _shut(self) -> None:
        # No fetch may outlive the descriptor it writes to.
        await self.flights.stop()
        await self.checkpoint()
        async with self.journal.files_locked():
            await trio.to_thread.run_sync(self._close_files)

    async def save(self) -> None:
        """Claim every block written so far in the state file (see Journal.save)."""
        await self.journal.save()

    async def checkpoint(self) -> None:
        """Claim the present blocks at once, then flush them and save the state as flushed."""
        await self.journal.checkpoint()

    def abort_fetches(self) -> None:
        """Cancel every fetch in flight for this file (their readers get an error)."""
        self.flights.abort()

    # -- versions -------------------------------------------------------------------------

    async def revalidate(self, *, force: bool = False) -> bool:
        """Ask the server whether the file changed, if due; switch to a new version. True if it did.

        Due when ``force``, when a fetch saw a change, or when ``revalidate_interval`` has
        passed since the last confirmation. A new version discards every cached block (the
        data file is replaced by an empty one, the state file rewritten) and bumps ``generation``.

        Raises:
            RemoteChanged: it changed, but passthrough handles still read the data file, so the
                cache stays on the old version until they close (``stale`` makes opens ask again).
            OriginError: the server could not be asked (the cached version stays).
            CacheError: unmounting (the probe is cancelled, see Cache.network).
        """
        due = self._validated + self.cache.config.revalidate_interval
        if not (force or self.stale or time.monotonic() >= due) or self.cache.probe is None:
            return False
        remote = await self.cache.network(self.identity.url, self.cache.probe, self.url)
        self._validated = time.monotonic()
        if self._same_version(remote):
            self.stale = False
            return False
        async with self._lock:
            if self._same_version(remote):
                return False  # another open switched while we waited for the lock
            if self._passthrough_handles:
                # The kernel reads the data file for them: emptying it would serve them zeros.
                # They keep the old version, whole; the switch happens at the first open after.
                self.stale = True  # so every open asks again until then
                raise RemoteChanged(f"{self.identity.url}: the remote file changed while {self._passthrough_handles} "
                                    f"open handle(s) read the cached version; open it again once they are closed")
            log.warning("%s: the remote file changed (size %d -> %d); dropping its cached blocks",
                        self.identity.url, self.remote.size, remote.size)
            self._switching = trio.Event()  # readers wait for it instead of claiming fetches
            try:
                await self.flights.stop()
                async with self.journal.files_locked():
                    old_identity, old_bitmap = self.identity, self.bitmap
                    self._set_version(remote)
                    self.generation += 1
                    self.stale = False
                    self.journal.dirty = self.journal.unsaved = False
                    if self.data.fd >= 0 and old_bitmap is not None:
                        # Never the old bitmap under the new version, even if what follows fails.
                        self.bitmap = Bitmap(self.identity.nblocks)
                        self.journal.persisted = Bitmap(self.identity.nblocks)
                        self.bitmap = await self._adopt(old_identity, old_bitmap)
                    else:  # the next open finds the old state and resets
                        self.bitmap, self._peeked, self.journal.persisted = None, False, None
            finally:
                self._switching.set()
                self._switching = None
        return True

    async def _adopt(self, old: state.Identity, old_bitmap: Bitmap) -> Bitmap:
        """The bitmap for the new version (open files): the old one's whole blocks if the file only
        grew (checked by fetching the last cached whole block again), else an empty cache."""
        keep = old.size // self.block_size  # whole blocks of the old version; its partial tail goes
        check = old_bitmap.last_before(keep)
        if (self.growing and check is not None and self.cache.direct is not None
                and old.block_size == self.block_size and old.size < self.size):
            start = check * self.block_size
            try:
                fresh = await self.cache.network(self.identity.url, self.cache.direct, self.remote, start,
                                                 start + self.block_size)
                kept = await trio.to_thread.run_sync(os.pread, self.data.fd, self.block_size, start)
            except (RangefsError, OSError) as exc:
                log.info("%s: cannot check the cached prefix (%s)", self.identity.url, exc)
            else:
                if fresh == kept:
                    runs = ((first, min(stop, keep)) for first, stop in old_bitmap.runs() if first < keep)
                    bitmap = Bitmap.from_runs(self.identity.nblocks, runs)
                    try:
                        await trio.to_thread.run_sync(self._grow, bitmap)
                    except OSError as exc:  # e.g. no room for the larger state file: start afresh
                        log.warning("%s: cannot keep the cached blocks of the file that grew (%s); dropping them",
                                    self.identity.url, exc.strerror)
                    else:
                        log.info("%s: grew from %d to %d bytes; kept %d cached blocks", self.identity.url,
                                 old.size, self.size, len(bitmap))
                        return bitmap
                else:
                    log.info("%s: not a pure append (block %d differs); dropping the cached blocks",
                             self.identity.url, check)
        try:
            return await trio.to_thread.run_sync(self._reset)
        except OSError as exc:
            log.warning("%s: cannot empty the cache file (%s); its old blocks are not used", self.identity.url,
                        exc.strerror)
            self.journal.persisted = Bitmap(self.identity.nblocks)
            self._unwritable()  # not into the old file for now: the kernel may still read it
            return Bitmap(self.identity.nblocks)

    def _same_version(self, remote: RemoteFile) -> bool:
        # Without a validator no version can be told apart; such a cache is never reused anyway.
        return remote.size == self.remote.size and remote.if_range == self.remote.if_range and bool(remote.if_range)

    def _changed(self) -> None:
        """A fetch learned that the remote changed: fail the reads of this version from now on,
        and move the cache to the new version in the background (an open would do it too)."""
        if self.stale:
            return
        self.stale = True
        self.cache.spawn(self._revalidate_quietly)

    async def _revalidate_quietly(self) -> None:
        try:
            await self.revalidate(force=True)
        except RangefsError as exc:
            log.warning("%s: cannot learn the new version: %s", self.identity.url, exc)

    def _check_version(self, generation: int) -> None:
        if self.stale or generation != self.generation:
            raise RemoteChanged(f"{self.identity.url}: the remote file changed; reopen it to read the new version")

    # -- the read path --------------------------------------------------------------------

    async def read(
        self,
        offset: int,
        size: int,
        readahead: Readahead | None = None,
        generation: int | None = None,
        *,
        slices: bool = False,
    ) -> bytes | bytearray | FileSlice:
        """Bytes ``offset .. offset+size`` (clipped at the end), fetching missing blocks first.

        With ``readahead``, a sequential reader also gets the blocks ahead of it fetched in the
        background, in large requests, so later reads find them present or in flight.
        ``generation`` is the version the reader opened; bytes of another one are never returned.
        With ``slices``, bytes that are in the page cache come as ``(fd, offset, size)`` of the
        data file instead (see FileSlice), unless the read had to read them anyway.

        Raises:
            RemoteChanged: the remote changed since the reader opened the file.
        """
        generation = self.generation if generation is None else generation
        self._check_version(generation)
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        first, stop = offset // self.block_size, (end - 1) // self.block_size + 1
        if time.monotonic() < self._unwritable_until and self.cache.direct is not None:
            if any(b not in self.open_bitmap() for b in range(first, stop)):
                return await self._read_past_cache(offset, end, generation)
        elif readahead is not None and self.remote.accept_ranges:
            self._read_ahead(readahead, offset, end)
        try:
            await self.ensure(first, stop, generation)
            damaged, checked = await self.verifier.verify(first, stop)
            if damaged:
                await self.ensure(first, stop, generation)  # fetch again what failed its check
            elif checked is not None:  # the check read every byte this read needs: no second read
                self._check_version(generation)
                base = first * self.block_size
                return memoryview(checked)[offset - base : end - base]  # type: ignore[return-value]
        except CacheUnwritable:
            if self.cache.direct is None:
                raise
            self._unwritable()
            return await self._read_past_cache(offset, end, generation)
        fd = self.data.fd
        if slices and _PAGE_CACHE.cached(fd, offset, end - offset):
            self._check_version(generation)
            return fd, offset, end - offset
        try:
            data = await self.data.pread(end - offset, offset)
        except OSError:
            self._check_version(generation)  # a switch closed the descriptor it was reading
            raise
        self._check_version(generation)  # the version may have switched while we waited
        return data

    def _unwritable(self) -> None:
        """The cache could not take a block: serve from the network for a while, and say so once."""
        if not self._warned_unwritable:
            self._warned_unwritable = True
            log.warning("%s: the cache cannot be written (disk full?); reading from the network without "
                        "caching, and trying the cache again every %.0fs", self.identity.url, _UNWRITABLE_RETRY)
        self._unwritable_until = time.monotonic() + _UNWRITABLE_RETRY

    async def _read_past_cache(self, offset: int, end: int, generation: int) -> bytes:
        assert self.cache.direct is not None
        try:
            data = await self.cache.network(self.identity.url, self.cache.direct, self.remote, offset, end)
        except RemoteChanged:
            self._changed()
            raise
        self._check_version(generation)
        return data

    def _read_ahead(self, readahead: Readahead, offset: int, end: int) -> None:
        wanted = prefetch.ahead(readahead, offset, end, self.size)
        if wanted is None or self._switching is not None:
            return
        start, target = wanted
        first, stop = start // self.block_size, -(-target // self.block_size)
        self.flights.claim_ahead(first, stop, self.open_bitmap(), id(readahead), self.generation)

    async def ensure(self, first: int, stop: int, generation: int | None = None) -> None:
        """Return once blocks ``first <= b < stop`` are all present, fetching what is missing.

        Raises:
            RemoteChanged: the version is no longer ``generation``.
            RangefsError: a fetch this read needed failed.
        """
        flights, interruptions = self.flights, 0
        while True:
            if self._switching is not None:
                await self._switching.wait()
            if generation is not None:
                self._check_version(generation)
            # Looked up on every pass: a version switch replaces the bitmap while we wait.
            bitmap = self.open_bitmap()
            missing = [b for b in range(first, stop) if b not in bitmap]
            if not missing:
                return
            if self.cache.closing:
                raise CacheError(f"{self.identity.url}: unmounting")
            if not self.remote.accept_ranges:
                await self._stream_for(missing)
                continue
            bringing = {b: flights.flight_of(b) for b in missing}
            waits = {flight for flight in bringing.values() if flight is not None}
            todo = [b for b in missing if bringing[b] is None]
            mine = flights.claim(todo + self._last_block_after(todo[-1], bitmap) if todo else [], self.generation)
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
                await flights.wait_for(waits, missing, self.open_bitmap)

    async def _stream_for(self, missing: list[int]) -> None:
        """Wait for ``missing`` from the file's stream, starting one if none runs (in the background:
        it serves every reader of the file, and outlives this one)."""
        flights = self.flights
        running = flights.stream
        if running is not None and any(flights.flight_of(b) is None for b in missing):
            # Present when that stream started and discarded since (a failed check): it will not
            # bring them. Wait for it to end; the next pass starts a stream that will.
            await running.end()
            await trio.lowlevel.checkpoint()
            return
        if running is None:
            await flights.start_stream(self.identity.nblocks, self.open_bitmap().copy(), self.generation)
        await flights.wait_for({flight for b in missing if (flight := flights.flight_of(b)) is not None}, missing,
                               self.open_bitmap)

    def _last_block_after(self, block: int, bitmap: Bitmap) -> list[int]:
        """The file's last block, if it is the one right after ``block`` and missing: a reader that
        got this close to the end nearly always reads on to it (a media prober reading an index at
        the end of a file asks for both in two reads; fetched together they cost one round trip)."""
        last = self.identity.nblocks - 1
        return [last] if block == last - 1 and last not in bitmap and last not in self.flights else []

    # -- the fetch task -------------------------------------------------------------------

    async def _fetch(self, flight: Flight) -> None:
        """Fetch a claimed run; never raises (errors go to the flight's waiters), but Cancelled."""
        error: BaseException | None = Abandoned("fetch abandoned")
        try:
            with flight.scope:
                if flight.stream:
                    bitmap = self.open_bitmap()
                    await self.cache.fetcher.stream_into(
                        self.remote, self.data.fd, bitmap.__contains__, self._mark_written(flight)
                    )
                else:
                    await self.data.reserve_sums(flight.run)
                    await self.cache.fetcher.fetch_into(
                        self.remote, flight.run, self.data.fd, self._mark_written(flight)
                    )
                error = None
        except RangesIgnored as exc:
            error = exc
            self._ranges_ignored()
        except RemoteChanged as exc:
            error = exc
            self._log_failure(exc)
            self._changed()
        except RangefsError as exc:
            error = exc
            self._log_failure(exc)
        except OSError as exc:
            error = CacheUnwritable(f"{self.identity.url}: cannot write the cache file: {exc.strerror}")
            log.warning("%s", error)
        except Exception as exc:  # a bug must fail this read, not stop the mount from a background task
            error = CacheError(f"{self.identity.url}: unexpected error: {exc!r}")
            log.exception("%s: unexpected error while fetching", self.identity.url)
        finally:
            self.flights.finish(flight, error)

    def _mark_written(self, flight: Flight) -> WrittenSink:
        async def mark(first: int, stop: int, sums: list[int]) -> None:
            if flight.generation != self.generation:
                return  # a fetch of a version that is gone (it is being cancelled): claim nothing
            bitmap = self.open_bitmap()
            self.data.sums.set_run(first, sums)
            verified = self.verifier.verified
            for block in range(first, stop):
                bitmap.add(block)
                if verified is not None:
                    verified.add(block)
                flight.delivered(block)  # a stream also passes blocks it did not rewrite: no-op
            self.journal.written(stop - first)

        return mark

    def _ranges_ignored(self) -> None:
        """The server sent the whole file to a ranged GET: from now on stream it instead."""
        if self.remote.accept_ranges:
            log.warning("%s: the server ignores Range requests; streaming the file from its start into "
                        "the cache (reads far into it wait for the stream)", self.identity.url)
            self.remote = dataclasses.replace(self.remote, accept_ranges=False)

    def _log_failure(self, exc: RangefsError) -> None:
        message = str(exc)
        log.warning("%s", message if message.startswith(self.identity.url) else f"{self.identity.url}: {message}")

    # -- blocking work on the files, run in worker threads with both journal locks held ----

    def _open_files(self) -> None:
        with self.data.opened(self.identity.url) as existed:
            self.bitmap = self._load_bitmap(existed)  # may replace data.fd
            self.data.reserve_first_sums()
            self.verifier.reopened(self.data.unchanged_since_close(), self.identity.nblocks)

    def _load_bitmap(self, existed: bool) -> Bitmap:
        """The saved bitmap if it is for this version and the data file is whole; else a fresh cache."""
        loaded = self.data.load(self.identity, existed, self.growing, bool(self.remote.if_range))
        if loaded is None:
            return self._reset()
        if loaded.grown_from is not None:
            self._grown_from = (loaded.grown_from, loaded.bitmap)  # acquire checks it over the network
            return loaded.bitmap
        # Only a synced save's blocks are known to be on disk (what passthrough relies on);
        # the others are flushed and saved as synced by the next checkpoint.
        bitmap, journal = loaded.bitmap, self.journal
        journal.persisted = bitmap.copy() if loaded.synced else Bitmap(bitmap.nblocks)
        journal.dirty = journal.unsaved = not loaded.synced or loaded.lost
        return bitmap

    def _reset(self) -> Bitmap:
        """An empty cache in a new data file (see DataFile.reset)."""
        self.verifier.verified = Bitmap(self.identity.nblocks)
        bitmap = self.data.reset(self.identity)
        self.journal.persisted = bitmap.copy()
        return bitmap

    def _grow(self, bitmap: Bitmap) -> None:
        """Keep ``bitmap`` for the new, larger version (see DataFile.grow)."""
        self.verifier.narrow(bitmap)
        self.data.grow(self.identity, bitmap)
        self.journal.persisted = bitmap.copy()

    def _close_files(self) -> None:
        if self.data.fd >= 0:
            self.data.close()
            self.journal.dirty = self.journal.unsaved = False
