"""Cache limits: keep the cache directory under --cache-max-size and its filesystem above --cache-min-free.

Imports rangefs.safefs (every path), state, status (``allocated_bytes``), bitmap, flights (``Abandoned``) and fetcher
(``plan_runs``); sees rangefs.cache and cachedfile for typing only; never pyfuse3. ``Evictor.run``
is a task of ``Cache.serve``; everything here runs on the trio thread except the blocking work
(``allocated_bytes``, ``_scan``, ``_punch``, ``_evict_closed``, ``_touch``), which runs in worker
threads and touches no field but ``_punch``'s two flags (single bools, read on the trio thread).

Eviction frees the least recently used chunks (``CHUNK_BYTES``, 4 MiB of a file) first:

- Use is tracked per chunk in memory (``Lru``: reads and writes of this mount, bounded); chunks
  cached before this mount count as used at the file's persisted last use (the newest mtime of
  its data and state files; ``_touch`` moves the state file's forward as files are read).
- A chunk of an open file is evicted in this order, and the order matters: the evictor claims its
  blocks in the file's flight table (a read that needs one waits, then fetches it again; no fetch
  writes into it), clears their bits, saves the state (``Journal.record``), and only once that
  save is written punches the hole. A kill -9 at any point leaves no state recording a punched
  block. A failed save punches nothing.
- Never evicted: blocks in flight or being read (``Reading``), any block of a file with
  passthrough handles or passed through in this mount (a mapping outlives its handle and reads
  the data file itself), of a file streamed without ranges, switching version or busy opening
  or closing (its ``lock`` held).
- A file not open in this mount is evicted under its flock (skipped if another process holds it),
  the same way, from its state on disk; when no block remains, its state, sums and data files go,
  state first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from rangefs import safefs, state
from rangefs.bitmap import Bitmap
from rangefs.fetcher import plan_runs
from rangefs.flights import Abandoned
from rangefs.status import allocated_bytes

if TYPE_CHECKING:
    from rangefs.cache import Cache
    from rangefs.cachedfile import CachedFile

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024  # the unit of eviction
_LRU_ENTRIES = 1 << 16  # chunks whose use is remembered (of 4 MiB: 256 GiB); older ones count as cold
_CHECK_INTERVAL = 1.0  # seconds between checks of free space
_RESYNC_INTERVAL = 10.0  # seconds between counts of the cache directory's allocated bytes (du)
_STATVFS_BYTES = 16 * 1024 * 1024  # written bytes after which free space is checked again
_TOUCH_INTERVAL = 30.0  # seconds between moves of a used file's persisted last use
_SUMMARY_INTERVAL = 60.0  # seconds between info lines about what was evicted
_MAX_MARGIN = 16 * 1024 * 1024  # fewer, larger rounds: each costs a state save, a punch and a count of the directory
_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

_libc = ctypes.CDLL(None, use_errno=True)  # Python has no fallocate(2) with flags
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch(fd: int, offset: int, length: int) -> None:
    """Deallocate ``length`` bytes at ``offset`` of ``fd`` (they read as zeros; the size stays).

    Raises:
        OSError: the filesystem cannot (EOPNOTSUPP) or the disk failed.
    """
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, _PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Reading:
    """The block ranges of one file that reads are using right now (from before they make sure
    the blocks are present until they return their bytes)."""

    def __init__(self) -> None:
        self._ranges: dict[int, tuple[int, int]] = {}
        self._next = 0

    @contextlib.contextmanager
    def hold(self, first: int, stop: int) -> Iterator[None]:
        token, self._next = self._next, self._next + 1
        self._ranges[token] = (first, stop)
        try:
            yield
        finally:
            del self._ranges[token]

    def overlaps(self, first: int, stop: int) -> bool:
        return any(first < b and a < stop for a, b in self._ranges.values())


class Lru:
    """When each chunk was last used, for a bounded number of chunks, least recent first."""

    def __init__(self, entries: int = _LRU_ENTRIES) -> None:
        self._entries = entries
        self._used: OrderedDict[tuple[str, int], float] = OrderedDict()

    def touch(self, key: str, first_chunk: int, stop_chunk: int, now: float) -> None:
        used = self._used
        for chunk in range(first_chunk, stop_chunk):
            used[key, chunk] = now
            used.move_to_end((key, chunk))
        while len(used) > self._entries:
            used.popitem(last=False)

    def forget(self, key: str, chunks: list[int]) -> None:
        for chunk in chunks:
            self._used.pop((key, chunk), None)

    def tracked(self, key: str) -> set[int]:
        return {chunk for (k, chunk) in self._used if k == key}

    def oldest(self) -> Iterator[tuple[float, str, int]]:
        for (key, chunk), used in self._used.items():
            yield used, key, chunk

    def __len__(self) -> int:
        return len(self._used)


@dataclass(frozen=True)
class Unit:
    """A candidate for eviction: a chunk of a file (``chunk``), or all its chunks not tracked
    in memory (``chunk`` None), last used at ``used``."""

    used: float
    key: str
    chunk: int | None


def order(lru: Lru, persisted: dict[str, float], started: float) -> list[Unit]:
    """Every candidate, least recently used first: the tracked chunks at their time, each file's
    untracked chunks (cached before this mount) at its persisted last use, at most ``started``."""
    units = [Unit(used, key, chunk) for used, key, chunk in lru.oldest()]
    units += [Unit(min(used, started), key, None) for key, used in persisted.items()]
    units.sort(key=lambda unit: unit.used)  # stable: the tracked ones keep their order
    return units


def evictable(blocks: range, present: Bitmap, busy: Callable[[int], bool]) -> list[int]:
    """The blocks of ``blocks`` that are present and not ``busy`` (in flight)."""
    return [b for b in blocks if b in present and not busy(b)]


def untracked_chunks(present: Bitmap, per: int, tracked: set[int], limit: int) -> list[int]:
    """Up to ``limit`` chunks (of ``per`` blocks) holding present blocks and not in ``tracked``, in
    file order."""
    found: list[int] = []
    for first, stop in present.runs():
        for chunk in range(first // per, (stop - 1) // per + 1):
            if chunk not in tracked and (not found or found[-1] != chunk):
                found.append(chunk)
                if len(found) >= limit:
                    return found
    return found


@dataclass
class _DiskFile:
    key: str
    used: float  # persisted last use


class Evictor:
    """Keeps the running count of the cache's allocated bytes and frees them when over a limit."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        config = cache.config
        self._max = config.max_bytes
        self._margin = _MAX_MARGIN if self._max is None else min(_MAX_MARGIN, self._max // 8)
        # Room kept for fetches in flight: written to the disk before they are counted (at most
        # a reader's prefetch window each), they would otherwise pass the limit by that much.
        self._reserve = 0 if self._max is None else min(config.readahead_max, self._max // 4)
        self.allocated: int | None = None  # bytes the cache directory holds (None: not counted yet)
        self.lru = Lru()
        self._started = time.time()
        self._wake = trio.Event()
        self._since_statvfs = 0
        self._used_keys: dict[str, float] = {}  # key -> last use not yet persisted (touched)
        self._touched: dict[str, float] = {}
        self._evicted_bytes = self._evicted_chunks = 0
        self._punch_failed = False  # the filesystem cannot punch holes
        self._punch_warned = False
        self._save_failed = False
        self._failed = False

    # -- hooks of the read path: cheap, on the trio thread --------------------------------

    def chunk_span(self, file: CachedFile, first: int, stop: int) -> tuple[int, int]:
        per = max(1, CHUNK_BYTES // file.block_size)
        return first // per, -(-stop // per)

    def used(self, file: CachedFile, first: int, stop: int) -> None:
        """A read used blocks ``first .. stop``."""
        now = time.time()
        self.lru.touch(file.key, *self.chunk_span(file, first, stop), now)
        self._used_keys[file.key] = now

    def wrote(self, file: CachedFile, first: int, stop: int) -> None:
        """A fetch wrote blocks ``first .. stop``: more bytes allocated."""
        self.used(file, first, stop)
        added = (stop - first) * file.block_size
        self._since_statvfs += added
        if self.allocated is not None:
            self.allocated += added
        if self._over() or self._since_statvfs >= _STATVFS_BYTES:
            self._wake.set()

    def full(self) -> bool:
        """The cache holds more than its limit: eviction lags behind the fetches, and prefetches
        wait for it (a read still fetches what it needs), so that what passes the limit stays
        bounded by what is in flight."""
        return self._max is not None and self.allocated is not None and self.allocated > self._max

    def _over(self) -> bool:
        return (self._max is not None and self.allocated is not None
                and self.allocated + self._reserve > self._max - self._margin)

    # -- the task -------------------------------------------------------------------------

    async def run(self) -> None:
        """Check the limits when writes add bytes and every ``_CHECK_INTERVAL``; evict when over."""
        cache_dir = self._cache.config.cache_dir
        self.allocated = await trio.to_thread.run_sync(allocated_bytes, cache_dir)
        synced = summary = trio.current_time()
        while True:
            with trio.move_on_after(_CHECK_INTERVAL):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            if now - synced >= _RESYNC_INTERVAL or self._over():
                # Counted from the disk before any eviction: the running count is an estimate (it
                # misses fetches in flight and counts rewritten blocks again).
                self.allocated, synced = await trio.to_thread.run_sync(allocated_bytes, cache_dir), now
            try:
                need = await self._need()
                if need > 0:
                    started = time.monotonic()
                    freed = await self.evict(need)
                    log.debug("eviction round: %d of %d bytes freed in %.3fs", freed, need,
                              time.monotonic() - started)
                await self._touch_used()
            except Exception:  # a bug must not stop the mount: the cache only grows past its limits
                if not self._failed:
                    self._failed = True
                    log.exception("cache eviction failed; the cache limits may be passed")
            if now - summary >= _SUMMARY_INTERVAL and self._evicted_chunks:
                log.info("evicted %.1f MiB (%d chunks) from the cache; it holds %.1f MiB",
                         self._evicted_bytes / 2**20, self._evicted_chunks, (self.allocated or 0) / 2**20)
                self._evicted_bytes = self._evicted_chunks = 0
                summary = now

    async def _need(self) -> int:
        """Bytes to free now (0: none), to get back under the limits by a margin."""
        self._since_statvfs = 0
        cache_dir = self._cache.config.cache_dir
        try:
            st = await trio.to_thread.run_sync(os.statvfs, cache_dir)
        except OSError:
            free_short = 0
        else:
            floor = self._cache.config.min_free_for(st.f_blocks * st.f_frsize)
            free_short = floor - st.f_bavail * st.f_frsize
        over = 0
        if self._max is not None and self.allocated is not None:
            over = self.allocated + self._reserve - (self._max - self._margin)
        need = max(over, free_short)
        return need + self._margin if need > 0 else 0

    async def evict(self, need: int) -> int:
        """Free at least ``need`` bytes if possible, least recently used first; the bytes freed."""
        files_dir = self._cache.files_dir
        disk = await trio.to_thread.run_sync(_scan, files_dir)
        open_files = {f.key: f for f in self._cache if f.data.fd >= 0}
        known = {f.key: f for f in self._cache}
        persisted = {d.key: d.used for d in disk}
        units = order(self.lru, persisted, self._started)
        i, total = 0, 0
        while need > 0 and i < len(units):
            unit = units[i]
            # Consecutive chunks of the same file go together (one save, one thread), as many as
            # the need calls for; a file's untracked chunks go alone, as many as the need calls for.
            chunks: list[int] = []
            untracked = 0
            if unit.chunk is None:
                untracked, i = -(-need // CHUNK_BYTES), i + 1
            while not untracked and i < len(units) and units[i].key == unit.key and len(chunks) * CHUNK_BYTES < need:
                chunk = units[i].chunk
                if chunk is None:
                    break
                chunks.append(chunk)
                i += 1
            file = open_files.get(unit.key)
            if file is not None:
                freed = await self._evict_open(file, chunks, untracked)
            else:
                freed = await self._evict_closed(unit.key, known.get(unit.key), chunks, untracked)
            need -= freed
            total += freed
            if self.allocated is not None:
                self.allocated -= freed
        return total

    # -- open files -----------------------------------------------------------------------

    async def _evict_open(self, file: CachedFile, chunks: list[int], untracked: int) -> int:
        """Evict ``chunks`` of an open file, and up to ``untracked`` of those not tracked."""
        bitmap = file.bitmap
        if bitmap is None or not _evictable(file) or self._punch_failed:
            return 0
        per = max(1, CHUNK_BYTES // file.block_size)
        nblocks = file.identity.nblocks
        wanted = set(chunks)
        if untracked:
            wanted.update(untracked_chunks(bitmap, per, self.lru.tracked(file.key), untracked))
        reading, flights = file.reading, file.flights
        blocks: list[int] = []
        gone: list[int] = []  # chunks left with nothing cached: no longer tracked
        for chunk in sorted(wanted):
            first, stop = chunk * per, min((chunk + 1) * per, nblocks)
            if reading.overlaps(first, stop):
                continue
            free = evictable(range(first, stop), bitmap, flights.__contains__)
            blocks += free
            if not any(b in bitmap and b not in free for b in range(first, stop)):
                gone.append(chunk)
        self.lru.forget(file.key, gone)
        if not blocks:
            return 0
        generation, journal = file.generation, file.journal
        # From here to the punch, the blocks are claimed: a read that needs one waits for these
        # "flights" to end, then fetches it again; no fetch writes into them meanwhile.
        claimed = flights.claim(blocks, generation, nblocks)
        try:
            for block in blocks:
                bitmap.discard(block)
                if file.verifier.verified is not None:
                    file.verifier.verified.discard(block)
            journal.discarded(set(blocks))
            if not await journal.record():  # the state must no longer record them before the hole
                if not self._save_failed:
                    self._save_failed = True
                    log.warning("%s: cannot save the cache state; eviction punches nothing until it can",
                                file.identity.url)
                return 0
            if file.generation != generation or file.data.fd < 0 or not _evictable(file, punching=True):
                return 0  # a stream started meanwhile writes every block it finds missing: leave them
            runs = [(f.run.first * file.block_size, min(f.run.stop * file.block_size, file.size)) for f in claimed]
            freed = await trio.to_thread.run_sync(self._punch, file.data.fd, runs, file.identity.url)
        finally:
            for flight in claimed:
                flights.finish(flight, Abandoned("evicted"))
        self._evicted_bytes += freed
        self._evicted_chunks += len(gone)
        log.debug("%s: evicted %d blocks (%d bytes)", file.identity.url, len(blocks), freed)
        return freed

    def _punch(self, fd: int, runs: list[tuple[int, int]], url: str) -> int:
        """Punch ``runs`` (byte ranges) out of ``fd``; the allocated bytes freed (worker thread)."""
        try:
            before = os.fstat(fd).st_blocks
            for start, end in runs:
                punch(fd, start, end - start)
            return max(0, before - os.fstat(fd).st_blocks) * 512
        except OSError as exc:
            # The blocks are recorded as gone and their bytes are intact: no harm but the space.
            # Fields set from a worker thread: single bools, read on the trio thread.
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._punch_failed = True
            if not self._punch_warned:
                self._punch_warned = True
                log.warning("%s: cannot free cache space by punching holes (%s)%s", url, exc.strerror,
                            "; only files not open will be evicted" if self._punch_failed else "")
            return 0

    # -- files not open -------------------------------------------------------------------

    async def _evict_closed(self, key: str, file: CachedFile | None, chunks: list[int], untracked: int) -> int:
        """Evict ``chunks`` of a file not open here, and up to ``untracked`` of those not tracked."""
        tracked = self.lru.tracked(key) if untracked else set()
        wanted = set(chunks)
        if file is None:
            freed, gone = await trio.to_thread.run_sync(_evict_closed, self._cache.files_dir, key, wanted,
                                                        tracked, untracked, self._punch_failed)
        else:
            if file.passed_through or file.lock.locked():
                return 0
            async with file.lock:
                if file.data.fd >= 0:
                    return 0  # opened meanwhile: the next round sees it open
                freed, gone = await trio.to_thread.run_sync(_evict_closed, self._cache.files_dir, key, wanted,
                                                            tracked, untracked, self._punch_failed)
                file.unload()  # its cached bytes are read from the state file again
        self.lru.forget(key, gone)
        if freed:
            self._evicted_bytes += freed
            self._evicted_chunks += max(1, len(gone))
            log.debug("cache file %s (closed): evicted %d bytes", key, freed)
        return freed

    async def _touch_used(self) -> None:
        """Persist the last use of files read lately (their state file's mtime), at most every
        ``_TOUCH_INTERVAL`` per file."""
        now = time.time()
        due = [key for key, used in self._used_keys.items() if used - self._touched.get(key, 0.0) >= _TOUCH_INTERVAL
               or now - used >= _CHECK_INTERVAL * 2]
        if not due:
            return
        for key in due:
            self._touched[key] = self._used_keys.pop(key)
        await trio.to_thread.run_sync(_touch, self._cache.files_dir, due)


def _evictable(file: CachedFile, *, punching: bool = False) -> bool:
    """Whether blocks of an open file may be evicted now. Never while the kernel may read its data
    file itself (passthrough handles, or mappings made through them), while it is streamed (a
    stream writes every block it finds missing), or while it opens, closes or switches version."""
    return not (file.passthrough_handles or file.passed_through or file.flights.stream is not None
                or not file.remote.accept_ranges or file.switching is not None or file.bitmap is None
                or (file.lock.locked() and not punching))


def _scan(files_dir: Path) -> list[_DiskFile]:
    """The cache files on disk, by key, with their persisted last use (worker thread)."""
    found: dict[str, _DiskFile] = {}
    try:
        with safefs.directory(files_dir) as dir_fd:
            names = os.listdir(dir_fd)
            for name in names:
                key, dot, suffix = name.partition(".")
                if not dot or suffix not in ("data", "state", "state.prev", "xxh"):
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                entry = found.setdefault(key, _DiskFile(key, 0.0))
                if suffix in ("data", "state"):
                    entry.used = max(entry.used, st.st_mtime)
    except OSError as exc:
        log.warning("cannot list the cache directory %s: %s", files_dir, exc.strerror)
    return list(found.values())


def _evict_closed(
    files_dir: Path, key: str, chunks: set[int], tracked: set[int], untracked: int, whole_only: bool = False
) -> tuple[int, list[int]]:
    """Evict ``chunks``, and up to ``untracked`` chunks not in ``tracked``, of a file no one here
    has open: under its flock, clear them in its state, save it, then punch; a file left with
    nothing goes whole, state first. ``whole_only``: only that (holes cannot be punched). The
    allocated bytes freed, and the chunks evicted (worker thread)."""
    base = files_dir / key
    data_path, state_path, sums_path = base.with_suffix(".data"), base.with_suffix(".state"), base.with_suffix(".xxh")
    try:
        fd = safefs.open(data_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # gone (removed under us), or not ours: the state alone may remain
        return _remove(state_path, sums_path, None), []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0, []  # another rangefs process has it open
        try:
            saved = state.read(state_path)
        except (OSError, state.StateCorrupt):
            saved = None
        before = os.fstat(fd).st_blocks * 512
        if saved is None or saved.identity.nblocks == 0:
            return _remove(state_path, sums_path, data_path) + before, []
        identity, bitmap = saved.identity, saved.bitmap
        per = max(1, CHUNK_BYTES // identity.block_size)
        wanted = chunks | set(untracked_chunks(bitmap, per, tracked, untracked)) if untracked else chunks
        drop = [b for first, stop in bitmap.runs() for b in range(first, stop) if b // per in wanted]
        for block in drop:
            bitmap.discard(block)
        if not len(bitmap):
            return _remove(state_path, sums_path, data_path) + before, sorted(wanted)
        if not drop or whole_only:
            return 0, sorted(wanted) if not drop else []
        state.save(state_path, identity, bitmap, synced=saved.synced, durable=False)  # before any hole
        for run in plan_runs(drop, math.inf):  # type: ignore[arg-type]
            start = run.first * identity.block_size
            punch(fd, start, min(run.stop * identity.block_size, identity.size) - start)
        return max(0, before - os.fstat(fd).st_blocks * 512), sorted(wanted)
    except OSError as exc:
        log.debug("cannot evict from cache file %s: %s", key, exc.strerror)
        return 0, []
    finally:
        os.close(fd)  # drops the flock


def _remove(state_path: Path, sums_path: Path, data_path: Path | None) -> int:
    """Remove a file's state (first: it must never claim data that is gone), sums and data; the
    bytes of the state and sums files freed."""
    freed = 0
    for path in (state_path, state.previous(state_path), sums_path):
        with contextlib.suppress(OSError):
            freed += safefs.lstat(path).st_blocks * 512
    state.remove(state_path)
    safefs.unlink(sums_path)
    if data_path is not None:
        safefs.unlink(data_path)
    return freed


def _touch(files_dir: Path, keys: list[str]) -> None:
    """Set the state files' mtime of ``keys`` to now: their last use, for the next mount's order."""
    for key in keys:
        try:
            fd = safefs.open((files_dir / key).with_suffix(".state"), os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.utime(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
