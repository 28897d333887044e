"""The cache of one remote file: its users, its read path, and the wiring of its parts.

Imports the parts (rangefs.flights, fill, datafile, journal, verifier, versions), prefetch,
kernel, state, bitmap, origin and errors; sees rangefs.cache (its registry) only for typing;
never pyfuse3. The parts: ``flights`` (the single-flight table), ``filler`` (brings missing
blocks in and runs each fetch), ``data`` (the files on disk; blocking work in worker threads),
``journal`` (saves and checkpoints), ``verifier`` (checks against sums), ``versions``
(revalidation and the switch to a new version). Each part's module states its own rules.

Concurrency rules (one trio thread; blocking disk I/O goes to worker threads):

- ``lock`` serializes users arriving and leaving (acquire, release, close) and version
  switches. Lock order: ``lock``, then the journal's ``checkpoint_lock``, then its
  ``_save_lock``; whoever opens, replaces or closes the files holds both journal locks
  (``Journal.files_locked``).
- Between testing a block and claiming it there is no ``await`` (``Filler.ensure``,
  ``_prefetch``): two readers that need the same block start one fetch.
- A fetch runs while someone wants it: a read waiting for it, or an open handle prefetching
  it; the last one to go cancels it (``Flights.unwanted``). A handle stops wanting its
  prefetches when it closes, and those far from where it jumped to (``_abandon``).
- No fetch outlives the descriptor it writes to: a version switch and the last close stop every
  fetch (``Flights.stop``) before they touch the files.
- A version switch replaces ``bitmap``: code that waits looks it up again (``open_bitmap``) on
  every pass, and every read checks the version (``check_version``) after its last ``await``.
- A read holds its blocks (``reading``) from before it makes sure they are present until it
  returns: eviction (rangefs.evict) never frees them, nor any block of a file passed through.
- Fields written off the trio thread, by the worker threads of ``_open_files``, ``reset``,
  ``Versions._grow`` and ``_close_files``, with no fetch running: ``bitmap``, ``_grown_from``,
  and the parts' fields named in their modules (``data.fd``, ``data.sums``,
  ``journal.persisted``, ``journal.dirty`` and ``unsaved``, ``verifier.verified``). They hold
  both journal locks, except in ``acquire`` after the files are opened, where the checks of a
  file that grew (``Versions.adopt``) and their cleanup hold ``lock`` before the first user
  comes, with nothing to save: no save or checkpoint touches the files then, and holding the
  journal locks across a network check would hold up the checkpoint loop.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from rangefs import kernel, prefetch, state
from rangefs.bitmap import Bitmap
from rangefs.datafile import DataFile, cache_key
from rangefs.errors import (
    CacheError,
    CacheUnwritable,
    RemoteChanged,
)
from rangefs.evict import Reading
from rangefs.fill import Filler
from rangefs.flights import Flights
from rangefs.journal import Journal
from rangefs.origin import RemoteFile
from rangefs.prefetch import Readahead
from rangefs.redact import redact_url
from rangefs.verifier import Verifier
from rangefs.versions import Versions

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
        self.switching: trio.Event | None = None  # set while revalidate moves to a new version
        self.url = url  # as listed, credentials included: re-probed to revalidate; never logged
        self.key = cache_key(url)
        self.set_version(remote)
        # Bumped when the remote changed and the cache moved to the new version: handles
        # opened before then must not read on (their version is gone).
        self.generation = 0
        self.stale = False  # a fetch was told the remote changed; the next open re-probes
        self._unwritable_until = 0.0  # until then, missing blocks are read past the cache
        self._warned_unwritable = False
        self.data = DataFile(cache.files_dir, self.key)
        self.journal = Journal(self)
        self.verifier = Verifier(self)
        self.versions = Versions(self)
        self.filler = Filler(self)
        config = cache.config
        self.flights = Flights(cache, self.filler.fetch, config.max_request_blocks, config.max_connections,
                               config.min_piece_bytes // config.block_size,
                               config.spread_below_rate / config.block_size)
        self.bitmap: Bitmap | None = None
        self._peeked = False
        self._users = 0
        self.lock = trio.Lock()
        # Handles the kernel serves from the data file itself (FUSE passthrough, counted by fs.py).
        # While there are any, the data file must not change: a new version waits until they close.
        self._passthrough_handles = 0
        # Once passed through, a mapping may read the data file for as long as it lives: never evicted.
        self.passed_through = False
        self.reading = Reading()  # the blocks reads are using right now: never evicted
        # Bytes that prefetches brought and their handle abandoned unread (it closed or jumped far
        # away): what the readahead fetched for nothing, as seen by the handle that asked for it.
        # "Read" means asked for by a FUSE read, the kernel's readahead included.
        self.prefetch_unused_bytes = 0
        # The last fetch's failure (redacted, as logged), until a fetch succeeds: `rangefs status`.
        self.last_error: str | None = None

    @property
    def passthrough_handles(self) -> int:
        """Open handles the kernel serves from the data file itself."""
        return self._passthrough_handles

    def passthrough_opened(self) -> None:
        self._passthrough_handles += 1
        self.passed_through = True

    def passthrough_closed(self) -> None:
        self._passthrough_handles -= 1

    def passthrough_ready(self) -> bool:
        """Every block is cached, on disk (the state file records it: a checkpoint flushed it) and
        was checked in this session, and the file may not grow: the kernel may read the data file
        itself, as it stands, for as long as a handle is open (a later failed flush would lose
        pages the kernel reads). Never without a validator: every revalidation of such a file
        looks like a change."""
        persisted, verified = self.journal.persisted, self.verifier.verified
        return (self.data.fd >= 0 and bool(self.remote.if_range) and not self.growing and not self.stale
                and self.switching is None and not self.journal.dirty
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
        """Bytes flushed and recorded by the state file: what a crash now would keep."""
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
        async with self.lock:
            if self.data.fd < 0:  # else open for other users, or still open while the last one's release flushes
                async with self.journal.files_locked():  # a checkpoint must not see a half-opened file
                    await trio.to_thread.run_sync(self._open_files)
                if self.journal.dirty:  # a state written without a flush: the next checkpoint flushes
                    self.cache.dirtied(self)
                if self._grown_from is not None:
                    old, self._grown_from = self._grown_from, None
                    try:
                        self.bitmap = await self.versions.adopt(*old)
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
            self._abandon(readahead, readahead.expected or 0)
        async with self.lock:
            self._users -= 1
            if self._users:
                return
            await self.flights.stop()
        rounds = 0
        while True:
            await self.checkpoint()
            rounds += 1
            async with self.lock:
                if self._users or self.data.fd < 0:
                    return  # someone came meanwhile (and still uses the files, or closed them)
                # Close once nothing is left to flush, so that _shut's checkpoint holds no open up
                # (someone may have come, written and gone meanwhile), or after a few rounds.
                if rounds >= _MAX_CLOSE_ROUNDS or not (self.journal.dirty or self.journal.checkpoint_lock.locked()):
                    await self._shut()
                    return

    async def close(self) -> None:
        """Stop prefetching, checkpoint and close the files whatever the number of users (at unmount)."""
        async with self.lock:
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
        """Record every block written so far in the state file (see Journal.save)."""
        await self.journal.save()

    async def checkpoint(self) -> None:
        """Record the present blocks at once, then flush them and save the state as flushed."""
        await self.journal.checkpoint()

    def abort_fetches(self) -> None:
        """Cancel every fetch in flight for this file (their readers get an error)."""
        self.flights.abort()

    # -- versions -------------------------------------------------------------------------

    async def revalidate(self, *, force: bool = False) -> bool:
        """Ask the server whether the file changed, if due; switch to a new version (see Versions)."""
        return await self.versions.revalidate(force=force)

    def set_version(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.identity = state.Identity(
            key=self.key,
            url=redact_url(self.url),
            size=remote.size,
            etag=remote.etag,
            last_modified=remote.last_modified,
            block_size=self.cache.config.block_size,
        )

    def unload(self) -> None:
        """Closed files under a new version: the next open finds the old state and resets it, and
        the next look at what is cached reads the state file again."""
        self.bitmap, self._peeked, self.journal.persisted = None, False, None

    def changed(self) -> None:
        """A fetch learned that the remote changed (see Versions.changed)."""
        self.versions.changed()

    def check_version(self, generation: int) -> None:
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
        """``_read``, with its blocks held from eviction until it returns (see rangefs.evict)."""
        first, stop = offset // self.block_size, -(-(offset + size) // self.block_size)
        self.cache.evictor.used(self, first, stop)
        with self.reading.hold(first, stop):
            return await self._read(offset, size, readahead, generation, slices=slices)

    async def _read(
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
        self.check_version(generation)
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        first, stop = offset // self.block_size, (end - 1) // self.block_size + 1
        if time.monotonic() < self._unwritable_until and self.cache.direct is not None:
            if any(b not in self.open_bitmap() for b in range(first, stop)):
                return await self._read_past_cache(offset, end, generation)
        elif readahead is not None and self.remote.accept_ranges:
            self._prefetch(readahead, offset, end)
        try:
            await self.filler.ensure(first, stop, generation)
            damaged, checked = await self.verifier.verify(first, stop)
            if damaged:
                await self.filler.ensure(first, stop, generation)  # fetch again what failed its check
            elif checked is not None:  # the check read every byte this read needs: no second read
                self.check_version(generation)
                base = first * self.block_size
                return memoryview(checked)[offset - base : end - base]  # type: ignore[return-value]
        except CacheUnwritable:
            if self.cache.direct is None:
                raise
            self.unwritable()
            return await self._read_past_cache(offset, end, generation)
        fd = self.data.fd
        if slices and _PAGE_CACHE.resident(fd, offset, end - offset):
            self.check_version(generation)
            return fd, offset, end - offset
        try:
            data = await self.data.pread(end - offset, offset)
        except OSError:
            self.check_version(generation)  # a switch closed the descriptor it was reading
            raise
        self.check_version(generation)  # the version may have switched while we waited
        return data

    def unwritable(self) -> None:
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
            self.changed()
            raise
        self.check_version(generation)
        return data

    def _prefetch(self, readahead: Readahead, offset: int, end: int) -> None:
        stretch, was = readahead.stretch, readahead.expected
        wanted = prefetch.ahead(readahead, offset, end, self.size)
        if readahead.stretch != stretch and was is not None:
            # A jump. Prefetches far from the new position (more than a full window away: reads the
            # kernel sends out of order land closer) are abandoned; nearer ones may still be read.
            block, far = self.block_size, readahead.maximum
            self._abandon(readahead, was, (max(0, offset - far) // block, -(-(end + far) // block)))
        else:
            passed = readahead.expected or 0
            while readahead.claimed and readahead.claimed[0][1] * self.block_size <= passed:
                readahead.claimed.popleft()
        if wanted is None or self.switching is not None or self.cache.evictor.full():
            return  # (full: eviction lags behind the fetches; reads fetch what they need meanwhile)
        start, target = wanted
        first, stop = start // self.block_size, -(-target // self.block_size)
        for flight in self.flights.claim_ahead(first, stop, self.open_bitmap(), id(readahead), self.generation):
            readahead.claimed.append((flight.run.first, flight.run.stop))

    def _abandon(self, readahead: Readahead, read_to: int, keep: tuple[int, int] | None = None) -> None:
        """The handle of ``readahead`` no longer wants its prefetches outside blocks ``keep``
        (all of them: None); cancel those nobody else wants, and count in ``prefetch_unused_bytes``
        the blocks they brought past ``read_to`` (where its reader got to)."""
        self.flights.forget_prefetcher(id(readahead), keep)
        bitmap, block = self.bitmap, self.block_size
        unread, unused = -(-read_to // block), 0
        for first, stop in readahead.claimed:
            if bitmap is not None and (keep is None or not (first < keep[1] and keep[0] < stop)):
                present = [b for b in range(max(first, unread), stop) if b in bitmap]
                unused += sum(min(block, self.size - b * block) for b in present)
        readahead.claimed.clear()
        if unused:
            self.prefetch_unused_bytes += unused
            log.debug("%s: %d prefetched bytes abandoned unread (%s)", self.identity.url, unused,
                      "closed" if keep is None else "jumped away")

    async def ensure(self, first: int, stop: int, generation: int | None = None) -> None:
        """Return once blocks ``first <= b < stop`` are all present (see Filler.ensure)."""
        await self.filler.ensure(first, stop, generation)

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
            return self.reset()
        if loaded.grown_from is not None:
            self._grown_from = (loaded.grown_from, loaded.bitmap)  # acquire checks it over the network
            return loaded.bitmap
        # Only a synced save's blocks are known to be on disk (what passthrough relies on);
        # the others are flushed and saved as synced by the next checkpoint.
        bitmap, journal = loaded.bitmap, self.journal
        journal.persisted = bitmap.copy() if loaded.synced else Bitmap(bitmap.nblocks)
        journal.dirty = journal.unsaved = not loaded.synced or loaded.lost
        return bitmap

    def reset(self) -> Bitmap:
        """An empty cache in a new data file (see DataFile.reset)."""
        self.verifier.verified = Bitmap(self.identity.nblocks)
        bitmap = self.data.reset(self.identity)
        self.journal.persisted = bitmap.copy()
        return bitmap

    def _close_files(self) -> None:
        if self.data.fd >= 0:
            self.data.close()
            self.journal.dirty = self.journal.unsaved = False
