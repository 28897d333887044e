"""The registry of a mount's cached files, and the tasks that save and checkpoint them.

Imports rangefs.cachedfile (the cache of one file), datafile (``cache_key``), journal
(``SAVE_DELAY``), prefetch, fetcher, origin, errors and safefs; never pyfuse3. Everything here
runs on the trio thread. ``Cache.serve`` hosts the background task group: every fetch not
waited for by its reader, every save started by a file, and the two loops below.
``_dirtied``, ``_first_unsaved``, ``_save_due`` and ``_unsaved`` are written by files'
progress (``dirtied``) and by the loops.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from rangefs import safefs
from rangefs.cachedfile import CachedFile, FileSlice
from rangefs.datafile import cache_key
from rangefs.errors import CacheError
from rangefs.evict import Evictor
from rangefs.fetcher import BlockFetcher
from rangefs.journal import SAVE_DELAY
from rangefs.origin import RemoteFile
from rangefs.prefetch import Readahead

__all__ = ["DEFAULT_BLOCK_SIZE", "Cache", "CacheConfig", "CachedFile", "FileSlice", "cache_key"]

log = logging.getLogger(__name__)

# Small blocks make a random read or `tail -c 1000` fetch little, while sequential reads are
# unaffected: their request size is set separately (max_request_bytes). Chosen with `make bench`
# (docs/experiments.md, 'Block size').
DEFAULT_BLOCK_SIZE = 64 * 1024

# A temp file unchanged this long is a crash's leftover, not another mount's write in progress.
_STALE_TEMP_AGE = 3600.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class CacheConfig:
    """Where the cache lives and how often progress is made durable."""

    cache_dir: Path
    block_size: int = DEFAULT_BLOCK_SIZE
    # Seconds from the first unflushed write to the checkpoint that flushes it (or to the end of
    # one running then, whichever is later): what a power cut can cost (a kill -9 costs at most
    # what the last save missed: see rangefs.journal.SAVE_BYTES). By time only, not also by
    # volume: a flush while a long cold read runs makes that read pay for the disk writes
    # (docs/experiments.md, 'Checkpoint by time only'). The kernel writes back dirty pages on its
    # own; a read that lasts longer pays one flush per interval.
    checkpoint_interval: float = 5.0
    max_request_bytes: int = 16 * 1024 * 1024  # longest Range request (a prefetch of a sequential reader)
    # Prefetch window of a sequential reader, counted from the reader (rangefs.prefetch): it starts
    # small, as a short read after a seek should fetch little beyond the kernel's own readahead,
    # and grows to 32 MiB, which keeps two 16 MiB requests in flight.
    readahead_initial: int = 512 * 1024
    readahead_max: int = 32 * 1024 * 1024
    # Kernel readahead sends concurrent reads slightly out of order; this much disorder (one
    # kernel read) is still sequential, while random reads rarely land this close.
    readahead_tolerance: int = 1024 * 1024
    # An open asks the server again whether the file changed once this long has passed since
    # the last answer (0: at every open); a change seen by a fetch forces it at the next open.
    revalidate_interval: float = 60.0

    # Range requests in flight at once per origin over the whole mount (--max-connections; aria2's
    # -x has the same default): what a sequential reader's prefetch may spread over when one
    # connection is slower than the reader (rangefs.spread), and what protects a server from us.
    max_connections: int = 8
    # A prefetch cut for several connections gives each piece at least this much: smaller ones
    # would spend their time on round trips and slow-start rather than on the body, and above
    # the daemon's own fetches (mount._MAX_NEAR_BYTES), the pieces go to the helper.
    min_piece_bytes: int = 2 * 1024 * 1024
    # More connections are tried only while one brings less than this per second: a faster one
    # is not the reader's limit, and on loopback more of them made cold reads slower
    # (docs/experiments.md, 'Parallel ranges on an unthrottled server').
    spread_below_rate: int = 64 * 1024 * 1024
    # Cache limits (--cache-max-size, --cache-min-free): the cache directory's allocated bytes stay
    # under max_bytes (None: no bound), and its filesystem keeps min_free_bytes free, or, when that
    # is None, min_free_percent of its size.
    max_bytes: int | None = None
    min_free_bytes: int | None = None
    min_free_percent: float = 5.0

    def min_free_for(self, filesystem_bytes: int) -> int:
        """The free-space floor in bytes on a filesystem of this size."""
        if self.min_free_bytes is not None:
            return self.min_free_bytes
        return int(filesystem_bytes * self.min_free_percent / 100)

    @property
    def max_request_blocks(self) -> int:
        return max(1, self.max_request_bytes // self.block_size)

    def readahead(self) -> Readahead:
        """A fresh sequential-access detector for one open handle."""
        return Readahead(self.readahead_initial, self.readahead_max, self.readahead_tolerance)


class Cache:
    """All cached files of one mount, and the background tasks that fetch, save and checkpoint them."""

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
        self._unsaved: set[CachedFile] = set()  # files with writes their state file does not record yet
        self._nursery: trio.Nursery | None = None
        self._calls: set[trio.CancelScope] = set()  # network calls in progress besides the fetches (see network)
        self.closing = False
        self.evictor = Evictor(self)  # keeps the cache under its limits (--cache-max-size, --cache-min-free)

    @property
    def allocated_bytes(self) -> int | None:
        """The cache directory's allocated bytes as last counted (None: not counted yet)."""
        return self.evictor.allocated

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
            safefs.remove_stale_temps(cache_dir, _STALE_TEMP_AGE)  # the catalog's
        except OSError as exc:
            raise CacheError(f"cache directory '{cache_dir}' is not writable: {exc.strerror}") from None

    def file(self, url: str, remote: RemoteFile, growing: bool = False) -> CachedFile:
        """The cache of ``url``; creating the object touches no file."""
        file = self._files.get(url)
        if file is None:
            file = self._files[url] = CachedFile(self, url, remote, growing)
        return file

    def __iter__(self) -> Iterator[CachedFile]:
        return iter(self._files.values())

    def abort(self) -> None:
        """Unmounting: fail reads that still need the network and cancel every fetch and network call."""
        self.closing = True
        for file in self._files.values():
            file.abort_fetches()
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

    def dirtied(self, file: CachedFile) -> None:
        """A file has progress to save: a save comes ``SAVE_DELAY`` seconds later, a checkpoint
        ``checkpoint_interval`` seconds later."""
        self._unsaved.add(file)
        self._save_due.set()
        if self._first_unsaved is None:
            self._first_unsaved = trio.current_time()
            self._dirtied.set()

    async def checkpoint_all(self) -> None:
        for file in list(self._files.values()):
            await file.checkpoint()

    @property
    def hosting(self) -> bool:
        """Whether background tasks can be started (``serve`` is running)."""
        return self._nursery is not None

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> bool:
        """Run ``fn(*args)`` in the background task group; False when there is none (not running)."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the background fetches and saves, and save and checkpoint dirty files, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._save_loop)
            nursery.start_soon(self.evictor.run)
            task_status.started()
            try:
                await self._checkpoint_loop()
            finally:
                self._nursery = None

    async def _save_loop(self) -> None:
        """Save (record without flushing) what files wrote, ``SAVE_DELAY`` after the first write."""
        while True:
            await self._save_due.wait()
            await trio.sleep(SAVE_DELAY)
            self._save_due = trio.Event()
            files, self._unsaved = self._unsaved, set()
            for file in files:
                file.journal.save_soon()

    async def _checkpoint_loop(self) -> None:
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
