"""The files of one cached URL on disk: the sparse data file, its state file and its sums file.

Imports rangefs.safefs (every file opened here goes through it), state, checksums, bitmap,
fetcher (``BlockRun``) and errors; never the other cache modules. Most methods block and run in
worker threads. On the trio thread: ``pread``, ``read_if_in_page_cache`` and ``reserve_sums``
(which hop to a thread when they must wait), and ``peek``, which reads the state and sums files
of a file not opened yet, blocking, to tell its cached bytes (getattr, getxattr).

Fields written off the trio thread: ``fd``, ``sums`` (the object) and ``_closed_as``, by
``opened``, ``load``, ``reset`` and ``close``, which the cached file runs with no fetch running,
while it holds both of its journal's locks (``Journal.files_locked``), or, for the checks of a
file that grew and their cleanup in ``CachedFile.acquire``, its ``lock`` before the first user
comes, with nothing to save (no save or checkpoint touches the files then). The sums in ``sums``
are set on the trio thread as blocks arrive; ``grow`` (both locks held) and the journal's saves
(``_save_lock`` held) take the unwritten ones. The trio thread reads ``fd`` without a lock: a
descriptor it reads from may be replaced by a version switch, so every read checks the version
after it (see CachedFile.read).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from rangefs import checksums, safefs, state
from rangefs.bitmap import Bitmap
from rangefs.errors import CacheError
from rangefs.fetcher import BlockRun

log = logging.getLogger(__name__)


def cache_key(url: str) -> str:
    """The name of a URL's cache files: a hash, so no credential or odd character reaches a path."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def stamp(fd: int) -> tuple[int, ...]:
    """What changes when anyone writes to or replaces the file."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class Loaded:
    """A saved bitmap found fit for the version being opened (``DataFile.load``)."""

    bitmap: Bitmap  # the blocks recorded whose sum is on disk
    synced: bool  # the save was made after a flush: its blocks are on disk
    lost: bool  # some recorded blocks had no sum and are not counted
    grown_from: state.Identity | None  # the smaller version it was saved for, when the file may have grown


class DataFile:
    """The data file's descriptor, the paths of the three files, and the block sums in memory."""

    def __init__(self, files_dir: Path, key: str) -> None:
        base = files_dir / key
        self.path = base.with_suffix(".data")
        self.state_path = base.with_suffix(".state")
        # block_sum() of each block as received (see rangefs.checksums). Written at saves before
        # the state file, so a block the state records has its sum. A legacy ".sums" file (CRC-32s) is
        # deleted and its blocks are fetched again.
        self.sums_path = base.with_suffix(".xxh")
        self._legacy_sums_path = base.with_suffix(".sums")
        self.sums = checksums.BlockSums()
        self.fd = -1
        self._closed_as: tuple[int, ...] | None = None  # the file's stamp when this session last closed it

    @contextmanager
    def opened(self, url: str) -> Iterator[bool]:
        """Open and lock the data file for the body (which loads it); yield whether it existed.
        If the body fails, the file is closed again.

        Raises:
            CacheError: it cannot be opened, another rangefs process uses it, or it cannot be
                prepared (an OSError of the body).
        """
        existed = safefs.exists(self.path)
        try:
            fd = safefs.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot open cache file {self.path}: {exc.strerror}") from None
        self.fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The lock is on an inode: if another process replaced the file (a reset) after our
            # open, we hold the lock of a file that has no name any more. Treat it as in use.
            if os.fstat(fd).st_ino != safefs.lstat(self.path).st_ino:
                raise BlockingIOError
            yield existed
        except BaseException as exc:
            os.close(self.fd)
            self.fd = -1
            if isinstance(exc, BlockingIOError):
                raise CacheError(f"{url}: cache in use by another rangefs process") from None
            if isinstance(exc, OSError):
                raise CacheError(f"{url}: cannot prepare the cache: {exc.strerror}") from None
            raise

    def unchanged_since_close(self) -> bool:
        """The open data file is as this session left it at its last close (same inode, size,
        mtime and ctime)."""
        return self._closed_as == stamp(self.fd)

    def load(self, identity: state.Identity, existed: bool, growing: bool, validated: bool) -> Loaded | None:
        """The saved bitmap if it is for ``identity`` and the data file is whole, or for a smaller
        version of a file that may grow; None when the cache must start afresh (``reset``).
        ``validated``: the server names a validator; without one the cache is never reused."""
        safefs.unlink(self._legacy_sums_path)
        saved = self.read_saved(identity)
        if not validated:
            log.warning("%s: the server names no validator (ETag, Last-Modified); the cache is not reused "
                        "across mounts", identity.url)
            return None
        size = os.fstat(self.fd).st_size
        stored = saved.identity if saved is not None else None
        if saved is not None and stored == identity and existed and size == identity.size:
            recorded = len(saved.bitmap)  # with_sums takes the blocks without a sum out of it
            bitmap, self.sums = self.with_sums(saved.bitmap)
            log.debug("%s: cache has %d of %d blocks", identity.url, len(bitmap), bitmap.nblocks)
            return Loaded(bitmap, saved.synced, len(bitmap) < recorded, None)
        if (saved is not None and stored is not None and growing and existed
                and stored.url == identity.url and stored.size < identity.size and size == stored.size):
            bitmap, self.sums = self.with_sums(saved.bitmap)
            return Loaded(bitmap, saved.synced, False, stored)
        if stored is not None:
            log.info("%s: remote version or cache layout changed; dropping the cached blocks", identity.url)
        return None

    def peek(self, identity: state.Identity) -> Bitmap | None:
        """The saved bitmap, if it is for ``identity``, less blocks whose sum is lost (read
        without opening the data file)."""
        saved = self.read_saved(identity, quiet=True)
        if saved is None or saved.identity != identity:
            return None
        return self.with_sums(saved.bitmap)[0]

    def read_saved(self, identity: state.Identity, *, quiet: bool = False) -> state.Saved | None:
        """The newest save that can be trusted; when a torn one was passed over, only if the one
        used is for ``identity`` (a torn save costs one save's progress, not the cache)."""
        try:
            saved = state.read(self.state_path)
        except FileNotFoundError:
            return None
        except (OSError, state.StateCorrupt) as exc:
            if not quiet:
                log.warning("%s: cache state not trusted (%s); starting afresh", identity.url, exc)
            return None
        if saved.distrusted is None:
            return saved
        if not quiet:
            log.warning("%s: cache state not trusted (%s); using the save before it", identity.url,
                        saved.distrusted)
        return saved if saved.identity == identity else None

    def with_sums(self, recorded: Bitmap) -> tuple[Bitmap, checksums.BlockSums]:
        """The blocks of ``recorded`` whose sum is on disk, and those sums; a block without one
        would fail its check anyway, and must not count as cached."""
        sums = checksums.read(self.sums_path, recorded.runs())
        for block in sums.missing(recorded.runs()):
            recorded.discard(block)
        return recorded, sums

    def reserve_first_sums(self) -> None:
        """Room for the first page of sums now, so that the first fetches (and most of a small
        file's) need no extra step; on a full disk the fetch that needs it tries again."""
        try:
            checksums.reserve(self.sums_path, [0])
        except OSError:
            return
        self.sums.reserved([0])

    async def reserve_sums(self, run: BlockRun) -> None:
        """Make room for the run's sums first (once per page of sums): on a disk that fills up,
        a block written must not be left unrecordable for want of room for its sum."""
        pages = self.sums.unreserved(run.first, run.stop)
        if pages:
            sums = self.sums  # a reset meanwhile brings new sums, which this reservation is not for
            await trio.to_thread.run_sync(checksums.reserve, self.sums_path, pages)
            sums.reserved(pages)

    def reset(self, identity: state.Identity) -> Bitmap:
        """An empty cache for ``identity``: the old state goes first, so it can never pair with new data.

        A new, empty data file takes the old one's name, and ``fd`` moves to it: the old file is
        never changed. The kernel may still read it for passthrough opens and mappings (an mmap
        outlives its handle), and must go on seeing the old version there, whole.
        """
        state.remove(self.state_path)
        safefs.unlink(self.sums_path)
        self.sums = checksums.BlockSums()
        fresh_path = safefs.temp_path(self.path)
        fd = safefs.open(fresh_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, identity.size)  # a new file (O_EXCL): sparse, no old byte in it
            safefs.replace(fresh_path, self.path)
        except BaseException:
            os.close(fd)
            safefs.unlink(fresh_path)
            raise
        old, self.fd = self.fd, fd
        os.close(old)
        bitmap = Bitmap(identity.nblocks)
        state.save(self.state_path, identity, bitmap)
        return bitmap

    def grow(self, identity: state.Identity, bitmap: Bitmap) -> None:
        """Keep ``bitmap`` (the old version's whole blocks) for ``identity``, a larger version: the
        data file takes the new size, and everything is flushed and saved as synced."""
        os.ftruncate(self.fd, identity.size)
        os.fdatasync(self.fd)  # the old version's last blocks may not be flushed yet
        checksums.write(self.sums_path, self.sums.take_unwritten(), sync=True)
        state.save(self.state_path, identity, bitmap)

    def close(self) -> None:
        """Close the data file (which drops its flock), remembering its stamp."""
        if self.fd >= 0:
            try:
                self._closed_as = stamp(self.fd)
            except OSError:
                self._closed_as = None
            os.close(self.fd)
            self.fd = -1
            self.sums.take_unwritten()

    async def pread(self, size: int, offset: int) -> bytes | bytearray:
        """Read from the data file: on this thread when the page cache has it, else in a worker."""
        resident = self.read_if_in_page_cache(size, offset)
        if resident is not None:
            return resident
        return await trio.to_thread.run_sync(os.pread, self.fd, size, offset)

    def read_if_in_page_cache(self, size: int, offset: int) -> bytearray | None:
        """Bytes of the data file if the page cache has them all, read without blocking; else None."""
        buffer = bytearray(size)
        try:
            if os.preadv(self.fd, [buffer], offset, os.RWF_NOWAIT) == size:
                return buffer
        except (BlockingIOError, OSError):
            pass  # not (all) in the page cache, or no RWF_NOWAIT here
        return None

    def evict_page_cache(self) -> None:
        """Make the kernel forget the data file's cached pages, so the next reads come from the disk."""
        try:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            log.debug("cannot evict a cache file's pages from the page cache: %s", exc.strerror)
