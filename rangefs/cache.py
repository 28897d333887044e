"""The block cache: per URL a sparse data file and a persisted bitmap; single-flight fetches.

Imports rangefs.fetcher, origin, state, checksums, bitmap, safefs (every file it opens goes
through it) and kernel; never pyfuse3. Concurrency rules (one trio thread; blocking disk I/O
goes to worker threads):

- A block's bit is set only after its data is written to the data file.
- A saved bitmap never claims a block whose sum is not written before it: a save (``save``,
  every few MiB or a fraction of a second of progress) writes the new sums, then the state, in
  place, into the slot that does not hold the newest save (rangefs.state), without waiting for
  the data to reach the disk. A block claimed but lost to a power cut fails its check before
  first use (``_verify``) and is fetched again.
- A checkpoint (``checkpoint``, every ``checkpoint_interval``) also flushes: it snapshots the
  bitmap, fdatasyncs the data file, then saves a state marked synced when nothing was added
  meanwhile; only flushed blocks count as ``_persisted`` (what passthrough may rely on).
- Locks: ``_checkpoint_lock`` before ``_save_lock``; whoever replaces or closes the files
  holds both (``_files_locked``).
- Between testing a block and claiming it (``_claim``) there is no ``await``, so two readers
  that need the same block start one fetch; the second waits on the first one's event.
- A fetch runs while someone wants it: a read waiting for it, or an open handle prefetching
  it. The last one to go (a read cancelled, a handle closed) cancels it (``_unwanted``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from rangefs import checksums, kernel, safefs, state
from rangefs.bitmap import Bitmap
from rangefs.errors import (
    CacheError,
    CacheUnwritable,
    FetchInterrupted,
    RangefsError,
    RangesIgnored,
    RemoteChanged,
)
from rangefs.fetcher import BlockFetcher, BlockRun, Readahead, WrittenSink, block_sum, plan_runs
from rangefs.origin import RemoteFile
from rangefs.redact import redact_url

log = logging.getLogger(__name__)

# 64 KiB, chosen with `make bench` and a sweep of cold random 4 KiB preads through the mount
# (docs/performance.md): the server reads and sends less per miss. A random read or
# `tail -c 1000` fetches one small block, while sequential reads are unaffected: their request
# size is set separately (max_request_bytes).
DEFAULT_BLOCK_SIZE = 64 * 1024

_T = TypeVar("_T")


@dataclass(frozen=True)
class CacheConfig:
    """Where the cache lives and how often progress is made durable."""

    cache_dir: Path
    block_size: int = DEFAULT_BLOCK_SIZE
    # Seconds from the first unflushed write to the checkpoint that flushes it (or to the end of
    # one running then, whichever is later): what a power cut can cost (a kill -9 costs at most
    # what the last save missed: see SAVE_BYTES). By time only, not also by volume: a checkpoint
    # flushes the data file, and flushing every 64 MiB
    # made a cold 1 GiB read pay for writing it to disk while it ran (in `make bench`, 218-303
    # MB/s against 379-415 MB/s without, 4 runs each taking turns). The kernel writes back dirty
    # pages on its own; a read that lasts longer pays one flush per interval.
    checkpoint_interval: float = 5.0
    max_request_bytes: int = 16 * 1024 * 1024  # longest Range request (a prefetch of a sequential reader)
    # Prefetch window of a sequential reader: mountpoint-s3's first request, 1 MiB + 128 KiB,
    # covers the kernel's readahead; doubling to 32 MiB keeps two 16 MiB requests in flight.
    readahead_initial: int = 1024 * 1024 + 128 * 1024
    readahead_max: int = 32 * 1024 * 1024
    # Kernel readahead sends concurrent reads slightly out of order; this much disorder (one
    # kernel read) is still sequential, while random reads rarely land this close.
    readahead_tolerance: int = 1024 * 1024
    # An open asks the server again whether the file changed once this long has passed since
    # the last answer (0: at every open); a change seen by a fetch forces it at the next open.
    revalidate_interval: float = 60.0

    @property
    def max_request_blocks(self) -> int:
        return max(1, self.max_request_bytes // self.block_size)

    def readahead(self) -> Readahead:
        """A fresh sequential-access detector for one open handle."""
        return Readahead(self.readahead_initial, self.readahead_max, self.readahead_tolerance)


# ``(fd, offset, size)``: bytes of a data file, for pyfuse3 to reply with. libfuse then splices
# them from the page cache into the reply (FUSE_CAP_SPLICE_WRITE): the kernel copies each byte
# once, from the cache file's pages into the FUSE file's, where a reply of bytes costs a
# zero-filled buffer, a copy into it and a copy out of it. A cold `dd bs=1M` of 1 GiB took
# 0.33 s less daemon CPU (1.24 against 1.57 s, median of 4 runs each, taking turns) and ran
# ~10% faster (473 against 428 MB/s). Valid only until the next await: a version switch or the
# last close may close ``fd``. Only ranges found in the page cache are answered this way, since
# libfuse reads them on the FUSE thread.
FileSlice = tuple[int, int, int]
_PAGE_CACHE = kernel.PageCacheProbe()  # used on the trio thread only

_MAX_INTERRUPTIONS = 3  # a read fetches again after an interrupted fetch at most this often
_UNWRITABLE_RETRY = 30.0  # seconds between attempts to write into a cache that failed a write
# A temp file unchanged this long is a crash's leftover, not another mount's write in progress.
_STALE_TEMP_AGE = 3600.0
_MAX_CLOSE_ROUNDS = 3  # flushes a last close makes outside the file's lock before it closes (see release)
# A save claims the blocks written so far at most this long after the first unclaimed one, or
# once this much is unclaimed: what a kill -9 can lose. A save writes a few sums and a state
# file the size of the run list, and waits for no flush, so it can come this often.
SAVE_DELAY = 0.2
SAVE_BYTES = 8 * 1024 * 1024


class _Abandoned(FetchInterrupted):
    """The reader that was fetching a block went away; whoever needs it fetches it again."""


class _Flight:
    """One fetch of a block run in progress; waiters are woken per block.

    A waiter's Event is made when someone waits for a block, not for every block: a 1 GiB
    sequential read fetches 16384 blocks and waits for a few hundred of them, and one Event per
    block cost ~9% of the daemon's samples (py-spy, cold read at +20 ms RTT).
    """

    def __init__(self, run: BlockRun, generation: int, blocks: list[int] | None = None, stream: bool = False) -> None:
        """``generation``: the file version it fetches; ``blocks``: the ones it delivers, when not
        all of the run; ``stream``: the whole file from a plain GET (a server that ignores Range)."""
        self.run = run
        self.generation = generation
        self.stream = stream
        self.blocks: range | set[int] | _Absent = range(run.first, run.stop) if blocks is None else set(blocks)
        self.error: BaseException | None = None
        self.scope = trio.CancelScope()
        # Who wants it: the reads waiting for it, and the open handles that prefetch it (the id of
        # their Readahead, dropped when they close). A fetch nobody wants is cancelled (_unwanted).
        self.readers = 0
        self.prefetchers: set[int] = set()
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


class _Absent:
    """The blocks a stream brings: those neither present nor fetched by another flight when it
    started. Tested, never listed: a stream covers the file's size as claimed, whatever that is."""

    def __init__(self, nblocks: int, present: Bitmap, others: frozenset[int]) -> None:
        self._nblocks, self._present, self._others = nblocks, present, others

    def __contains__(self, block: int) -> bool:
        return 0 <= block < self._nblocks and block not in self._present and block not in self._others


def cache_key(url: str) -> str:
    """The name of a URL's cache files: a hash, so no credential or odd character reaches a path."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


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
        base = cache.files_dir / self.key
        self.data_path = base.with_suffix(".data")
        self.state_path = base.with_suffix(".state")
        # block_sum() of each block as received (see rangefs.checksums). Written at saves before
        # the state file, so a block the state claims has its sum. (".sums" held CRC-32s before;
        # such a file is deleted and its blocks refetched.)
        self.sums_path = base.with_suffix(".xxh")
        self._legacy_sums_path = base.with_suffix(".sums")
        self._sums = checksums.BlockSums()
        self._verified: Bitmap | None = None  # blocks checked against their sum in this session
        self._closed_as: tuple[int, ...] | None = None  # the data file's _stamp when this session last closed it
        self.bitmap: Bitmap | None = None
        self._peeked = False
        self._fd = -1
        self._users = 0
        self._lock = trio.Lock()
        self._inflight: dict[int, _Flight] = {}  # block -> the ranged fetch bringing it
        self._stream: _Flight | None = None  # the stream of the whole file, for a server that ignores Range
        self._dirty = False  # blocks written (or dropped) since the last flush and save
        self._unsaved = False  # the state file does not claim everything written yet
        self._unsaved_blocks = 0  # blocks written since the last save
        self._save_spawned = False  # a save is started in the background and waits for _save_lock
        self._added = 0  # blocks written this session: a checkpoint tells whether any came during its flush
        self._checkpoint_lock = trio.Lock()
        self._save_lock = trio.Lock()  # held while the state and sums files are written
        self._fetches: set[trio.CancelScope] = set()  # every fetch writing to the data file
        self._fetches_done = trio.Event()
        self._persisted: Bitmap | None = None  # blocks the state file claims, flushed (less any found damaged)
        self._dropped: set[int] = set()  # blocks found damaged since the running checkpoint's snapshot
        # Handles the kernel serves from the data file itself (FUSE passthrough, set by fs.py).
        # While there are any, the data file must not change: a new version waits until they close.
        self.passthrough_handles = 0

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

    def passthrough_ready(self) -> bool:
        """Every block is cached, on disk (the state file claims it: a checkpoint flushed it) and
        was checked in this session, and the file may not grow: the kernel may read the data file
        itself, as it stands, for as long as a handle is open (a later failed flush would drop
        pages the kernel reads). Never without a validator: every revalidation of such a file
        looks like a change."""
        return (self._fd >= 0 and bool(self.remote.if_range) and not self.growing and not self.stale
                and self._switching is None and not self._dirty
                and self._persisted is not None and self._persisted.complete()
                and self.bitmap is not None and self.bitmap.complete()
                and self._verified is not None and self._verified.complete())

    def passthrough_opened(self) -> None:
        """The kernel serves one more handle from the data file itself (FUSE passthrough)."""
        self.passthrough_handles += 1

    def passthrough_closed(self) -> None:
        """One handle the kernel served from the data file itself was released."""
        self.passthrough_handles -= 1

    @property
    def block_size(self) -> int:
        return self.identity.block_size

    @property
    def size(self) -> int:
        return self.identity.size

    def cached_bytes(self) -> int:
        """Bytes present in the cache; for a file not opened yet, as its state file says."""
        if self.bitmap is None and not self._peeked:
            self._peeked = True
            self.bitmap = self._peek_bitmap()
        return self._bytes_in(self.bitmap)

    def saved_bytes(self) -> int:
        """Bytes flushed and claimed by the state file: what a crash now would keep."""
        if self._persisted is None:  # not opened in this session: as its state file says
            return self.cached_bytes()
        return self._bytes_in(self._persisted)

    def _bytes_in(self, bitmap: Bitmap | None) -> int:
        if bitmap is None or self.identity.nblocks == 0:
            return 0
        last = self.identity.nblocks - 1
        tail_short = self.block_size * self.identity.nblocks - self.size
        return len(bitmap) * self.block_size - (tail_short if last in bitmap else 0)

    async def acquire(self) -> None:
        """Open the cache files for one more user (the one that finds them closed loads or creates them)."""
        async with self._lock:
            if self._fd < 0:  # else open for other users, or still open while the last one's release flushes
                async with self._files_locked():  # a checkpoint must not see a half-opened file
                    await trio.to_thread.run_sync(self._open_files)
                if self._dirty:  # a state written without a flush: the next checkpoint flushes
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

        The checkpoint runs without the lock: after a large read it flushes for seconds (1 GiB
        took 1.7 s here), and the next open would wait for it. An open meanwhile joins the
        files as they are, and they stay open.
        """
        if readahead is not None:
            self._forget_prefetcher(readahead)
        async with self._lock:
            self._users -= 1
            if self._users:
                return
            await self._stop_fetches()
        rounds = 0
        while True:
            await self.checkpoint()
            rounds += 1
            async with self._lock:
                if self._users or self._fd < 0:
                    return  # someone came meanwhile (and still uses the files, or closed them)
                # Close once nothing is left to flush, so that _shut's checkpoint holds no open up
                # (someone may have come, written and gone meanwhile), or after a few rounds.
                if rounds >= _MAX_CLOSE_ROUNDS or not (self._dirty or self._checkpoint_lock.locked()):
                    await self._shut()
                    return

    async def close(self) -> None:
        """Stop prefetching, checkpoint and close the files whatever the number of users (at unmount)."""
        async with self._lock:
            if self._fd >= 0:
                await self._shut()
            self._users = 0

    async def _shut(self) -> None:
        # No fetch may outlive the descriptor it writes to.
        await self._stop_fetches()
        await self.checkpoint()
        async with self._files_locked():
            await trio.to_thread.run_sync(self._close_files)

    @asynccontextmanager
    async def _files_locked(self) -> AsyncIterator[None]:
        """Hold off checkpoints and saves (to open, close or replace the files)."""
        async with self._checkpoint_lock, self._save_lock:
            yield

    async def revalidate(self, *, force: bool = False) -> bool:
        """Ask the server whether the file changed, if due; switch to a new version. True if it did.

        Due when ``force``, when a fetch saw a change, or when ``revalidate_interval`` has
        passed since the last confirmation. A new version drops every cached block (the
        data file is emptied, the state file rewritten) and bumps ``generation``.

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
            if self.passthrough_handles:
                # The kernel reads the data file for them: emptying it would serve them zeros.
                # They keep the old version, whole; the switch happens at the first open after.
                self.stale = True  # so every open asks again until then
                raise RemoteChanged(f"{self.identity.url}: the remote file changed while {self.passthrough_handles} "
                                    f"open handle(s) read the cached version; open it again once they are closed")
            log.warning("%s: the remote file changed (size %d -> %d); dropping its cached blocks",
                        self.identity.url, self.remote.size, remote.size)
            self._switching = trio.Event()  # readers wait for it instead of claiming fetches
            try:
                await self._stop_fetches()
                async with self._files_locked():
                    old_identity, old_bitmap = self.identity, self.bitmap
                    self._set_version(remote)
                    self.generation += 1
                    self.stale = False
                    self._dirty = self._unsaved = False
                    if self._fd >= 0 and old_bitmap is not None:
                        # Never the old bitmap under the new version, even if what follows fails.
                        self.bitmap = Bitmap(self.identity.nblocks)
                        self._persisted = Bitmap(self.identity.nblocks)
                        self.bitmap = await self._adopt(old_identity, old_bitmap)
                    else:  # the next open finds the old state and resets
                        self.bitmap, self._peeked, self._persisted = None, False, None
            finally:
                self._switching.set()
                self._switching = None
        return True

    async def _stop_fetches(self) -> None:
        """Cancel every fetch of this file and wait until none runs (so none can write any more)."""
        while self._fetches:
            self.abort_fetches()
            await self._fetches_done.wait()

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
                cached = await trio.to_thread.run_sync(os.pread, self._fd, self.block_size, start)
            except (RangefsError, OSError) as exc:
                log.info("%s: cannot check the cached prefix (%s)", self.identity.url, exc)
            else:
                if fresh == cached:
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
            self._persisted = Bitmap(self.identity.nblocks)
            self._unwritable()  # not into the old file for now: the kernel may still read it
            return Bitmap(self.identity.nblocks)

    def _grow(self, bitmap: Bitmap) -> None:
        os.ftruncate(self._fd, self.size)
        old_verified = self._verified
        self._verified = Bitmap(bitmap.nblocks)
        if old_verified is not None:
            for first, stop in bitmap.runs():
                for block in range(first, min(stop, old_verified.nblocks)):
                    if block in old_verified:
                        self._verified.add(block)
        os.fdatasync(self._fd)  # the old version's last blocks may not be flushed yet
        checksums.write(self.sums_path, self._sums.take_unwritten(), sync=True)
        state.save(self.state_path, self.identity, bitmap)
        self._persisted = bitmap.copy()

    def _same_version(self, remote: RemoteFile) -> bool:
        # Without a validator no version can be told apart; such a cache is never reused anyway.
        return remote.size == self.remote.size and remote.if_range == self.remote.if_range and bool(remote.if_range)

    def abort_fetches(self) -> None:
        """Cancel every fetch in flight for this file (their readers get an error)."""
        for scope in self._fetches:
            scope.cancel()

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
            if any(b not in self._bitmap() for b in range(first, stop)):
                return await self._read_uncached(offset, end, generation)
        elif readahead is not None and self.remote.accept_ranges:
            self._read_ahead(readahead, offset, end)
        try:
            await self.ensure(first, stop, generation)
            dropped, checked = await self._verify(first, stop)
            if dropped:
                await self.ensure(first, stop, generation)  # fetch again what failed its check
            elif checked is not None:  # the check read every byte this read needs: no second read
                self._check_version(generation)
                base = first * self.block_size
                return memoryview(checked)[offset - base : end - base]  # type: ignore[return-value]
        except CacheUnwritable:
            if self.cache.direct is None:
                raise
            self._unwritable()
            return await self._read_uncached(offset, end, generation)
        if slices and _PAGE_CACHE.cached(self._fd, offset, end - offset):
            self._check_version(generation)
            return self._fd, offset, end - offset
        try:
            data = await self._pread(end - offset, offset)
        except OSError:
            self._check_version(generation)  # a switch closed the descriptor it was reading
            raise
        self._check_version(generation)  # the version may have switched while we waited
        return data

    async def _verify(self, first: int, stop: int) -> tuple[bool, bytes | bytearray | None]:
        """Check the blocks not checked yet this session against their sum; drop those that fail.

        Returns whether any was dropped, and the bytes of blocks ``first .. stop`` when all of
        them were read for the check. A block fails when the data file was damaged or written
        behind our back, or when its sum was never saved (a sums file lost or cut short).
        """
        verified, generation = self._verified, self.generation
        if verified is None:
            return False, None
        todo = [b for b in range(first, stop) if b not in verified]
        if not todo:
            return False, None
        start = todo[0] * self.block_size
        size = min((todo[-1] + 1) * self.block_size, self.size) - start
        cached = self._read_if_cached(size, start)
        if cached is not None:  # in the page cache: checking here beats a hop to a worker thread
            data: bytes | bytearray = cached
            bad = self._check_blocks(todo, data)
        else:  # from the disk: read and check in a worker thread

            def read_and_check() -> tuple[bytes, set[int]]:
                read = os.pread(self._fd, size, start)
                return read, self._check_blocks(todo, read)

            data, bad = await trio.to_thread.run_sync(read_and_check)
        if self._verified is not verified:
            if self.generation == generation and self._verified is not None:
                return await self._verify(first, stop)  # distrusted meanwhile (a failed flush): check again
            return False, None  # the version switched meanwhile: the caller's version check decides
        bitmap = self._bitmap()
        for block in todo:
            if block in bad:
                bitmap.discard(block)
                self._dropped.add(block)  # a checkpoint running now must not claim it as flushed
                if self._persisted is not None:
                    self._persisted.discard(block)
            elif block in bitmap:
                verified.add(block)
        if bad:
            log.warning("%s: %d cached block(s) from %d failed their checksum; fetching them again",
                        self.identity.url, len(bad), min(bad))
            self._dirty = self._unsaved = True
        whole = not bad and todo[0] == first and todo[-1] == stop - 1
        return bool(bad), data if whole else None

    def _check_blocks(self, blocks: list[int], data: bytes | bytearray) -> set[int]:
        """The blocks whose bytes in ``data`` (blocks[0] .. blocks[-1] of the file) do not match their sum."""
        size, start = self.block_size, blocks[0] * self.block_size
        view = memoryview(data)
        return {
            block
            for block in blocks
            if block_sum(view[block * size - start : min((block + 1) * size, self.size) - start]) != self._sums[block]
        }

    def _unwritable(self) -> None:
        """The cache could not take a block: serve from the network for a while, and say so once."""
        if not self._warned_unwritable:
            self._warned_unwritable = True
            log.warning("%s: the cache cannot be written (disk full?); reading from the network without "
                        "caching, and trying the cache again every %.0fs", self.identity.url, _UNWRITABLE_RETRY)
        self._unwritable_until = time.monotonic() + _UNWRITABLE_RETRY

    async def _read_uncached(self, offset: int, end: int, generation: int) -> bytes:
        assert self.cache.direct is not None
        try:
            data = await self.cache.network(self.identity.url, self.cache.direct, self.remote, offset, end)
        except RemoteChanged:
            self._changed()
            raise
        self._check_version(generation)
        return data

    def _check_version(self, generation: int) -> None:
        if self.stale or generation != self.generation:
            raise RemoteChanged(f"{self.identity.url}: the remote file changed; reopen it to read the new version")

    async def _pread(self, size: int, offset: int) -> bytes | bytearray:
        """Read from the data file: on this thread when the page cache has it, else in a worker."""
        cached = self._read_if_cached(size, offset)
        if cached is not None:
            return cached
        return await trio.to_thread.run_sync(os.pread, self._fd, size, offset)

    def _read_if_cached(self, size: int, offset: int) -> bytearray | None:
        """Bytes of the data file if the page cache has them all, read without blocking; else None."""
        buffer = bytearray(size)
        try:
            if os.preadv(self._fd, [buffer], offset, os.RWF_NOWAIT) == size:
                return buffer
        except (BlockingIOError, OSError):
            pass  # not (all) in the page cache, or no RWF_NOWAIT here
        return None

    def _read_ahead(self, readahead: Readahead, offset: int, end: int) -> None:
        target = min(readahead.advise(offset, end - offset), self.size)
        start = max(readahead.frontier, end)
        # Fetch ahead in pieces of at least half the window: few large requests, not one per read.
        if target <= start or (target - start < readahead.window // 2 and target < self.size):
            return
        readahead.frontier = target
        if self._switching is not None:
            return
        bitmap = self._bitmap()
        first, stop = start // self.block_size, -(-target // self.block_size)
        blocks = [b for b in range(first, stop) if b not in bitmap and b not in self._inflight]
        for block in range(first, stop):  # fetches already under way for these blocks: this reader wants them too
            if block in self._inflight:
                self._inflight[block].prefetchers.add(id(readahead))
        for flight in self._claim(blocks):
            flight.prefetchers.add(id(readahead))
            if not self.cache.spawn(self._fetch, flight):
                self._fetches.discard(flight.scope)
                self._forget(flight)
                flight.finish(_Abandoned("no task group for prefetching"))

    async def ensure(self, first: int, stop: int, generation: int | None = None) -> None:
        """Return once blocks ``first <= b < stop`` are all present, fetching what is missing.

        Raises:
            RemoteChanged: the version is no longer ``generation``.
            RangefsError: a fetch this read needed failed.
        """
        interruptions = 0
        while True:
            if self._switching is not None:
                await self._switching.wait()
            if generation is not None:
                self._check_version(generation)
            # Looked up on every pass: a version switch replaces the bitmap while we wait.
            bitmap = self._bitmap()
            missing = [b for b in range(first, stop) if b not in bitmap]
            if not missing:
                return
            if self.cache.closing:
                raise CacheError(f"{self.identity.url}: unmounting")
            if not self.remote.accept_ranges:
                await self._stream_for(missing)
                continue
            flights = {b: self._flight_of(b) for b in missing}
            waits = {flight for flight in flights.values() if flight is not None}
            todo = [b for b in missing if flights[b] is None]
            mine = self._claim(todo + self._last_block_after(todo[-1], bitmap) if todo else [])
            await self._fetch_all(mine)
            for flight in mine:
                if isinstance(flight.error, FetchInterrupted) and interruptions < _MAX_INTERRUPTIONS:
                    interruptions += 1
                    break  # the next pass sees the new version, or fetches again
                if isinstance(flight.error, RangesIgnored):
                    break  # the next pass streams
                if flight.error is not None:
                    raise flight.error
            else:
                await self._wait_for(waits, missing)

    async def _stream_for(self, missing: list[int]) -> None:
        """Wait for ``missing`` from the file's stream, starting one if none runs (in the background:
        it serves every reader of the file, and outlives this one)."""
        running = self._stream
        if running is not None and any(self._flight_of(b) is None for b in missing):
            # Present when that stream started and dropped since (a failed check): it will not
            # bring them. Wait for it to end; the next pass starts a stream that will.
            await running.end()
            await trio.lowlevel.checkpoint()
            return
        if running is None:
            nblocks = self.identity.nblocks
            running = self._stream = _Flight(BlockRun(0, nblocks), self.generation, stream=True)
            running.blocks = _Absent(nblocks, self._bitmap().copy(), frozenset(self._inflight))
            self._fetches.add(running.scope)
            if not self.cache.spawn(self._fetch, running):
                await self._fetch(running)
        await self._wait_for({flight for b in missing if (flight := self._flight_of(b)) is not None}, missing)

    def _flight_of(self, block: int) -> _Flight | None:
        """The fetch that brings ``block``: a ranged one, or the stream."""
        flight = self._inflight.get(block)
        if flight is None and self._stream is not None and block in self._stream.blocks:
            return self._stream
        return flight

    def _last_block_after(self, block: int, bitmap: Bitmap) -> list[int]:
        """The file's last block, if it is the one right after ``block`` and missing: a reader that
        got this close to the end nearly always reads on to it (`ffprobe` reading an index at the
        end of an MP4 asked for both in two reads; fetched together they cost one request, one
        round trip less)."""
        last = self.identity.nblocks - 1
        return [last] if block == last - 1 and last not in bitmap and last not in self._inflight else []

    def _claim(self, blocks: list[int]) -> list[_Flight]:
        flights = [_Flight(run, self.generation) for run in plan_runs(blocks, self.cache.config.max_request_blocks)]
        for flight in flights:
            self._fetches.add(flight.scope)  # from the claim on, so closing waits for it
            for block in range(flight.run.first, flight.run.stop):
                self._inflight[block] = flight
        return flights

    async def _fetch_all(self, flights: list[_Flight]) -> None:
        """Run ``flights`` for a read and wait until they end.

        In the background task group when there is one, so that a read that is cancelled (its
        reader went away) leaves running the fetches that others still want, and only those.
        """
        if not self.cache.hosting:
            async with trio.open_nursery() as nursery:
                for flight in flights:
                    nursery.start_soon(self._fetch, flight)
            return
        for flight in flights:
            flight.readers += 1
            self.cache.spawn(self._fetch, flight)
        try:
            for flight in flights:
                await flight.end()
        finally:
            for flight in flights:
                flight.readers -= 1
                self._unwanted(flight)

    def _unwanted(self, flight: _Flight) -> None:
        """Cancel ``flight`` if no read waits for it and no open handle prefetches it.

        Not a stream: it serves every reader of the file, and ends with the file's last user.
        """
        if not flight.readers and not flight.prefetchers and not flight.stream:
            flight.scope.cancel()

    def _forget_prefetcher(self, readahead: Readahead) -> None:
        """A handle closed: the fetches only it prefetched are cancelled."""
        if not self.remote.accept_ranges:
            return  # streamed: no prefetches, and a stream claims every block (a long walk)
        for flight in {flight for flight in self._inflight.values() if id(readahead) in flight.prefetchers}:
            flight.prefetchers.discard(id(readahead))
            self._unwanted(flight)

    async def _wait_for(self, flights: set[_Flight], blocks: list[int]) -> None:
        """Wait for other readers' fetches of ``blocks``; re-raise their errors, not abandonment.

        This read wants each of ``flights`` until it is done with all of them, so that a fetch
        only it still wants goes on between the blocks it waits for."""
        for flight in flights:
            flight.readers += 1
        try:
            for flight in flights:
                for block in blocks:
                    if block in flight.blocks and block not in self._bitmap():
                        await flight.arrival(block)
                        if block not in self._bitmap() and not isinstance(
                            flight.error, (FetchInterrupted, RangesIgnored, type(None))
                        ):
                            raise flight.error
        finally:
            for flight in flights:
                flight.readers -= 1
                self._unwanted(flight)

    async def _fetch(self, flight: _Flight) -> None:
        """Fetch a claimed run; never raises (errors go to the flight's waiters), but Cancelled."""
        error: BaseException | None = _Abandoned("fetch abandoned")
        try:
            with flight.scope:
                if flight.stream:
                    bitmap = self._bitmap()
                    await self.cache.fetcher.stream_into(
                        self.remote, self._fd, bitmap.__contains__, self._mark_written(flight)
                    )
                else:
                    await self._reserve_sums(flight.run)
                    await self.cache.fetcher.fetch_into(
                        self.remote, flight.run, self._fd, self._mark_written(flight)
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
            self._forget(flight)
            flight.finish(error)
            self._fetches.discard(flight.scope)
            if not self._fetches:
                self._fetches_done.set()
                self._fetches_done = trio.Event()

    async def _reserve_sums(self, run: BlockRun) -> None:
        """Make room for the run's sums first (once per page of sums): on a disk that fills up,
        a block written must not be left unclaimable for want of room for its sum."""
        pages = self._sums.unreserved(run.first, run.stop)
        if pages:
            sums = self._sums
            await trio.to_thread.run_sync(checksums.reserve, self.sums_path, pages)
            sums.reserved(pages)

    def _ranges_ignored(self) -> None:
        """The server sent the whole file to a ranged GET: from now on stream it instead."""
        if self.remote.accept_ranges:
            log.warning("%s: the server ignores Range requests; streaming the file from its start into "
                        "the cache (reads far into it wait for the stream)", self.identity.url)
            self.remote = dataclasses.replace(self.remote, accept_ranges=False)

    def _log_failure(self, exc: RangefsError) -> None:
        message = str(exc)
        log.warning("%s", message if message.startswith(self.identity.url) else f"{self.identity.url}: {message}")

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

    def _forget(self, flight: _Flight) -> None:
        if isinstance(flight.blocks, _Absent):  # a stream: never in _inflight
            if self._stream is flight:
                self._stream = None
            return
        for block in flight.blocks:
            if self._inflight.get(block) is flight:
                del self._inflight[block]

    def _mark_written(self, flight: _Flight) -> WrittenSink:
        async def mark(first: int, stop: int, sums: list[int]) -> None:
            if flight.generation != self.generation:
                return  # a fetch of a version that is gone (it is being cancelled): claim nothing
            bitmap = self._bitmap()
            self._sums.set_run(first, sums)
            for block in range(first, stop):
                bitmap.add(block)
                if self._verified is not None:
                    self._verified.add(block)
                flight.delivered(block)  # a stream also passes blocks it did not rewrite: no-op
            self._written(stop - first)

        return mark

    def _written(self, blocks: int) -> None:
        """Progress to save: soon, and at once when much is unsaved."""
        self._dirty = self._unsaved = True
        self._added += blocks
        self._unsaved_blocks += blocks
        self.cache.dirtied(self)
        if self._unsaved_blocks * self.block_size >= SAVE_BYTES:
            self.save_soon()

    def save_soon(self) -> None:
        """Start a save in the background unless one waits to start (a save of one file must not
        hold up another's: a version switch holds the file's locks while it asks the server)."""
        if not self._save_spawned:
            self._save_spawned = self.cache.spawn(self.save)

    async def save(self) -> None:
        """Claim every block written so far in the state file, without flushing the data first.

        Each claimed block's sum is written before the state file, and a block is checked against
        its sum before first use in a session: a claim that outlives the block's bytes (a power
        cut) costs a refetch, never a wrong byte. Survives a kill -9, not a power cut (no fsync).
        """
        async with self._save_lock:
            self._save_spawned = False
            with trio.CancelScope(shield=True):  # a cancelled save would leave its progress unmarked
                if self._unsaved and self._fd >= 0:
                    await self._write_state(synced=False)

    async def _write_state(self, *, synced: bool) -> bool:
        """Write the unwritten sums, then the state file claiming the bitmap (``_save_lock`` held).
        ``synced``: every claimed block was flushed; the save is then made durable too."""
        snapshot, identity = self._bitmap().copy(), self.identity
        pieces = self._sums.take_unwritten()
        self._unsaved, self._unsaved_blocks = False, 0

        def write() -> None:
            checksums.write(self.sums_path, pieces, sync=synced)
            state.save(self.state_path, identity, snapshot, synced=synced, durable=synced)

        try:
            await trio.to_thread.run_sync(write)
        except OSError as exc:  # the data is safe; only the record of it waits for the next try
            log.warning("%s: cannot save cache state: %s", self.identity.url, exc.strerror)
            self._sums.unwritten_again(pieces)
            self._unsaved = True
            return False
        return True

    async def checkpoint(self) -> None:
        """Claim the present blocks at once, then flush them and save the state as flushed."""
        await self.save()  # a flush after a large read takes seconds: claim first
        async with self._checkpoint_lock:
            # Shielded: cancelled half way (the mount stopping during a flush), it would have
            # taken the dirty marks without saving the state, and the unmount's own checkpoint
            # would find nothing to save.
            with trio.CancelScope(shield=True):
                if not self._dirty or self._fd < 0:
                    return
                snapshot, added = self._bitmap().copy(), self._added
                self._dropped.clear()
                self._dirty = False
                try:
                    await trio.to_thread.run_sync(os.fdatasync, self._fd)
                except OSError as exc:
                    await self._flush_failed(exc)
                    return
                async with self._save_lock:
                    self._unsaved = True  # the state is rewritten, marked synced or not
                    if not await self._write_state(synced=self._added == added):
                        self._dirty = True
                        return
                for block in self._dropped:  # found damaged during the flush: its rewrite may not be on disk
                    snapshot.discard(block)
                self._persisted = snapshot

    async def _flush_failed(self, exc: OSError) -> None:
        """After a failed fdatasync the kernel forgets the error: a later one succeeds without the
        lost pages. Forget every block written since the last good flush."""
        log.warning("%s: cannot flush the cache file: %s; refetching recent blocks", self.identity.url, exc.strerror)
        self.bitmap = (self._persisted or Bitmap(self.identity.nblocks)).copy()
        # A block flushed before may have been rewritten since, and that write lost (its pages
        # stay cached, clean, until evicted): drop the cached pages, then check every block
        # again, from the disk, against the sums of what was last written.
        await trio.to_thread.run_sync(_drop_page_cache, self._fd)
        self._verified = Bitmap(self.identity.nblocks)
        self._dirty = self._unsaved = True
        self.cache.dirtied(self)

    def _bitmap(self) -> Bitmap:
        if self.bitmap is None or self._fd < 0:
            raise CacheError(f"{self.identity.url}: cache file used while closed")
        return self.bitmap

    def _peek_bitmap(self) -> Bitmap | None:
        """The saved bitmap, if it is for this version, less blocks whose sum is lost (read once,
        without taking the lock)."""
        if not self.remote.if_range:
            return None
        saved = self._read_saved(quiet=True)
        if saved is None or saved.identity != self.identity:
            return None
        return self._with_sums(saved.bitmap)[0]

    # -- blocking helpers, run in worker threads --------------------------------------------

    def _read_saved(self, *, quiet: bool = False) -> state.Saved | None:
        """The newest save that can be trusted; when a torn one was passed over, only if the one
        used is for this version (a torn save costs one save's progress, not the cache)."""
        try:
            saved = state.read(self.state_path)
        except FileNotFoundError:
            return None
        except (OSError, state.StateCorrupt) as exc:
            if not quiet:
                log.warning("%s: cache state not trusted (%s); starting afresh", self.identity.url, exc)
            return None
        if saved.distrusted is None:
            return saved
        if not quiet:
            log.warning("%s: cache state not trusted (%s); using the save before it", self.identity.url,
                        saved.distrusted)
        return saved if saved.identity == self.identity else None

    def _with_sums(self, claimed: Bitmap) -> tuple[Bitmap, checksums.BlockSums]:
        """The blocks of ``claimed`` whose sum is on disk, and those sums; a block without one
        would fail its check anyway, and must not count as cached."""
        sums = checksums.read(self.sums_path, claimed.runs())
        for block in sums.missing(claimed.runs()):
            claimed.discard(block)
        return claimed, sums

    def _open_files(self) -> None:
        existed = safefs.exists(self.data_path)
        try:
            fd = safefs.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot open cache file {self.data_path}: {exc.strerror}") from None
        self._fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The lock is on an inode: if another process replaced the file (a reset) after our
            # open, we hold the lock of a file that has no name any more. Treat it as in use.
            if os.fstat(fd).st_ino != safefs.lstat(self.data_path).st_ino:
                raise BlockingIOError
            self.bitmap = self._load_bitmap(existed)  # may replace self._fd
            self._reserve_first_sums()
            # None is verified yet, unless the data file is as this session left it at its last
            # close (same inode, size, mtime and ctime): the blocks checked then need no new
            # check. Without it, every `cat` after the last close re-hashed the whole file.
            kept = self._verified if self._closed_as == _stamp(self._fd) else None
            nblocks = self.identity.nblocks
            self._verified = kept if kept is not None and kept.nblocks == nblocks else Bitmap(nblocks)
        except BaseException as exc:
            os.close(self._fd)
            self._fd = -1
            if isinstance(exc, BlockingIOError):
                raise CacheError(f"{self.identity.url}: cache in use by another rangefs process") from None
            if isinstance(exc, OSError):
                raise CacheError(f"{self.identity.url}: cannot prepare the cache: {exc.strerror}") from None
            raise

    def _load_bitmap(self, existed: bool) -> Bitmap:
        """The saved bitmap if it is for this version and the data file is whole; else a fresh cache."""
        safefs.unlink(self._legacy_sums_path)
        saved = self._read_saved()
        if not self.remote.if_range:
            log.warning("%s: the server names no validator (ETag, Last-Modified); the cache is not reused "
                        "across mounts", self.identity.url)
            return self._reset()
        size = os.fstat(self._fd).st_size
        stored = saved.identity if saved is not None else None
        if saved is not None and stored == self.identity and existed and size == self.size:
            bitmap, self._sums = self._with_sums(saved.bitmap)
            log.debug("%s: cache has %d of %d blocks", self.identity.url, len(bitmap), bitmap.nblocks)
            # Only a synced save's blocks are known to be on disk (what passthrough relies on);
            # the others are flushed and saved as synced by the next checkpoint.
            self._persisted = bitmap.copy() if saved.synced else Bitmap(bitmap.nblocks)
            self._dirty = self._unsaved = not saved.synced or len(bitmap) < len(saved.bitmap)
            return bitmap
        if (saved is not None and stored is not None and self.growing and existed
                and stored.url == self.identity.url and stored.size < self.size and size == stored.size):
            bitmap, self._sums = self._with_sums(saved.bitmap)
            self._grown_from = (stored, bitmap)  # acquire checks it over the network, then keeps or drops it
            return bitmap
        if stored is not None:
            log.info("%s: remote version or cache layout changed; dropping the cached blocks", self.identity.url)
        return self._reset()

    def _reserve_first_sums(self) -> None:
        """Room for the first page of sums now, so that the first fetches (and most of a small
        file's) need no extra step; on a full disk the fetch that needs it tries again."""
        try:
            checksums.reserve(self.sums_path, [0])
        except OSError:
            return
        self._sums.reserved([0])

    def _reset(self) -> Bitmap:
        """An empty cache: the old state goes first, so it can never pair with new data.

        A new, empty data file takes the old one's name, and ``_fd`` moves to it: the old file is
        never changed. The kernel may still read it for passthrough opens and mappings (an mmap
        outlives its handle), and must go on seeing the old version there, whole.
        """
        state.remove(self.state_path)
        safefs.unlink(self.sums_path)
        self._sums = checksums.BlockSums()
        self._verified = Bitmap(self.identity.nblocks)
        fresh_path = safefs.temp_path(self.data_path)
        fd = safefs.open(fresh_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, self.size)  # a new file (O_EXCL): sparse, no old byte in it
            safefs.replace(fresh_path, self.data_path)
        except BaseException:
            os.close(fd)
            safefs.unlink(fresh_path)
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        bitmap = Bitmap(self.identity.nblocks)
        state.save(self.state_path, self.identity, bitmap)
        self._persisted = bitmap.copy()
        return bitmap

    def _close_files(self) -> None:
        if self._fd >= 0:
            try:
                self._closed_as = _stamp(self._fd)
            except OSError:
                self._closed_as = None
            os.close(self._fd)  # also drops the flock
            self._fd = -1
            self._dirty = self._unsaved = False
            self._sums.take_unwritten()


def _drop_page_cache(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        log.debug("cannot drop the cached pages of a cache file: %s", exc.strerror)


def _stamp(fd: int) -> tuple[int, ...]:
    """What changes when anyone writes to or replaces the file."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Cache:
    """All cached files of one mount, and the task that checkpoints them."""

    def __init__(
        self,
        config: CacheConfig,
        fetcher: BlockFetcher,
        probe: Callable[[str], Awaitable[RemoteFile]] | None = None,
        direct: Callable[[RemoteFile, int, int], Awaitable[bytes]] | None = None,
    ) -> None:
        """``probe(url)`` asks the server for the current version (for ``revalidate``);
        ``direct(remote, start, stop)`` fetches bytes without caching them (when the cache
        cannot be written). None: not available."""
        self.config = config
        self.fetcher = fetcher
        self.probe = probe
        self.direct = direct
        self.files_dir = config.cache_dir / "files"
        self._files: dict[str, CachedFile] = {}
        self._dirtied = trio.Event()  # set by the first unsaved write since the last checkpoint round
        self._first_unsaved: float | None = None  # trio time of that write
        self._save_due = trio.Event()  # set by the first write since the last save round
        self._unsaved: set[CachedFile] = set()  # files with writes their state file does not claim yet
        self._nursery: trio.Nursery | None = None
        self._calls: set[trio.CancelScope] = set()  # network calls in progress besides the fetches (see network)
        self.closing = False

    @staticmethod
    def prepare(cache_dir: Path) -> None:
        """Create the cache directory, check it is ours alone and writable (called before mounting).

        Raises:
            CacheError: it cannot be created or written, or others could write it.
        """
        try:
            safefs.open_cache_dir(cache_dir)  # refuses one that others could plant links in
            probe = safefs.temp_path(cache_dir / safefs.FILES / ".probe")
            os.close(safefs.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            safefs.unlink(probe)
            safefs.remove_stale_temps(cache_dir / safefs.FILES, _STALE_TEMP_AGE)
        except OSError as exc:
            raise CacheError(f"cache directory '{cache_dir}' is not writable: {exc.strerror}") from None

    def file(self, url: str, remote: RemoteFile, growing: bool = False) -> CachedFile:
        """The cache of ``url``; creating the object touches no file."""
        cached = self._files.get(url)
        if cached is None:
            cached = self._files[url] = CachedFile(self, url, remote, growing)
        return cached

    def __iter__(self) -> Iterator[CachedFile]:
        return iter(self._files.values())

    def abort(self) -> None:
        """Unmounting: fail reads that still need the network and cancel every fetch and network call."""
        self.closing = True
        for cached in self._files.values():
            cached.abort_fetches()
        for scope in self._calls:
            scope.cancel()

    async def network(self, name: str, call: Callable[..., Awaitable[_T]], *args: object) -> _T:
        """``await call(*args)``: a request of the cache that is not a fetch (a probe, a read past
        the cache), cancelled by ``abort``. The unmount waits for every request handler to
        return, and against a stuck server such a call retries for minutes.

        Raises:
            CacheError: unmounting (``name``: the file it was for).
        """
        if not self.closing:
            with trio.CancelScope() as scope:
                self._calls.add(scope)
                try:
                    return await call(*args)
                finally:
                    self._calls.discard(scope)
        raise CacheError(f"{name}: unmounting")

    def dirtied(self, cached: CachedFile) -> None:
        """A file has progress to save: a save comes ``SAVE_DELAY`` seconds later, a checkpoint
        ``checkpoint_interval`` seconds later."""
        self._unsaved.add(cached)
        self._save_due.set()
        if self._first_unsaved is None:
            self._first_unsaved = trio.current_time()
            self._dirtied.set()

    async def checkpoint_all(self) -> None:
        for cached in list(self._files.values()):
            await cached.checkpoint()

    @property
    def hosting(self) -> bool:
        """Whether background tasks can be started (``run`` is running)."""
        return self._nursery is not None

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> bool:
        """Run ``fn(*args)`` in the background task group; False when there is none (not running)."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the background fetches and checkpoint dirty files until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._run_saves)
            task_status.started()
            try:
                await self._run_checkpoints()
            finally:
                self._nursery = None

    async def _run_saves(self) -> None:
        """Save (claim without flushing) what files wrote, ``SAVE_DELAY`` after the first write."""
        while True:
            await self._save_due.wait()
            await trio.sleep(SAVE_DELAY)
            self._save_due = trio.Event()
            files, self._unsaved = self._unsaved, set()
            for cached in files:
                cached.save_soon()

    async def _run_checkpoints(self) -> None:
        """Checkpoint dirty files ``checkpoint_interval`` seconds after the first unsaved write
        (and at least that often, for files made dirty other than by a write). A write is saved
        by its time + the interval (or the end of a round still running then) + one round."""
        interval = self.config.checkpoint_interval
        while True:
            with trio.move_on_after(interval):
                await self._dirtied.wait()
            if self._first_unsaved is not None:
                await trio.sleep_until(self._first_unsaved + interval)
            # Before the round: a write during it starts the next one's clock.
            self._dirtied, self._first_unsaved = trio.Event(), None
            started = time.monotonic()
            await self.checkpoint_all()
            log.debug("checkpoint took %.3fs", time.monotonic() - started)
